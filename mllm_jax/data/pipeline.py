"""The grain training pipeline: task shards -> packed, batched token rows.

    ArrayRecord task shards -> this host's slice (process_index::process_count)
      -> shuffle (reshuffled every epoch) -> repeat
      -> decode task, draw shots/queries, encode, tokenize (seeded per epoch and task)
      -> first-fit packing into seq_len rows -> batch -> worker processes (optional)

Every random choice is a pure function of (seed, epoch, task seed, task index), so a task
gives the same sequence in the same epoch however the data is sharded or how many
workers run. The iterator's state (a small JSON dict) restores the exact position:
save it next to the model (``iterator_state`` / ``restore_iterator_state``, or grain's
orbax handler ``grain.checkpoint.CheckpointSave(iterator)``) and a resumed run yields the
batches the uninterrupted one would have. Changing ``worker_count`` changes the order
(packing happens per worker), so resume with the same config.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import numpy as np

from mllm_jax.encoding.pack import pack_dataset, pad_dataset, sequence_features
from mllm_jax.encoding.sampling import OverBudgetError, SamplingConfig, TaskEncodingError
from mllm_jax.encoding.sequence import TaskSequenceEncoder
from mllm_jax.encoding.tokens import PromptTokenizer, load_backend_tokenizer
from mllm_jax.foundation.tasks import decode_task

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """The training data pipeline.

    Attributes:
        sampling: how a task becomes a sequence (shots, queries, token budget, ...).
        seq_len: length of a packed row; at least ``sampling.token_budget``.
        batch_size: rows per batch (per host).
        packing: pack several sequences into a row (first fit); False gives one sequence
            per row, padded (the reference's setting: batch 1 per device, no packing).
        packing_bins: rows filled at once by the first-fit packer.
        shuffle: shuffle the tasks (differently every epoch).
        num_epochs: passes over the shards; None repeats forever.
        worker_count: grain worker processes (0: encode in the calling process).
        worker_buffer_size: batches each worker prepares ahead.
        read_threads: threads encoding tasks inside each process.
        tokenizer_dir: a local checkpoint directory with tokenizer.json; None for the
            packaged Qwen2.5 tokenizer.
    """

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seq_len: int = 32768
    batch_size: int = 1
    packing: bool = True
    packing_bins: int = 8
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    tokenizer_dir: str | None = None

    def __post_init__(self) -> None:
        if self.seq_len < self.sampling.token_budget:
            raise ValueError(
                f"seq_len {self.seq_len} is shorter than the token budget "
                f"{self.sampling.token_budget}: a sequence could not fit a row"
            )
        for name in ("batch_size", "packing_bins", "worker_buffer_size", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {self.worker_count}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")


class EncodeTaskRecord:
    """(index, task record bytes) -> packable sequence arrays; picklable for workers.

    The RNG of element ``index`` is seeded by (seed, epoch, task.seed, task.index), with
    epoch = index // tasks per epoch on this host. A task that cannot fit the token budget
    even with ``min_shots`` shots and one query gives None (dropped by the pipeline with a
    warning naming it), so one long task never stops a training run; a whole epoch's
    worth of such tasks in a row is an error (the budget fits no task).
    """

    def __init__(
        self, tokenizer: PromptTokenizer, sampling: SamplingConfig, seed: int, epoch_length: int
    ) -> None:
        self.encoder = TaskSequenceEncoder(tokenizer, sampling)
        self.seed = seed
        self.epoch_length = epoch_length
        self.skipped_in_a_row = 0

    def rng(self, index: int, task_seed: int, task_index: int) -> np.random.Generator:
        epoch = index // self.epoch_length
        return np.random.default_rng([self.seed, epoch, task_seed, task_index])

    def __call__(self, index: int, record: bytes) -> dict[str, np.ndarray] | None:
        task = decode_task(record)
        try:
            sequence = self.encoder(task, self.rng(index, task.seed, task.index))
        except OverBudgetError as err:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.epoch_length:
                raise TaskEncodingError(
                    f"{self.skipped_in_a_row} tasks in a row fit no sequence of the token "
                    f"budget {self.encoder.config.token_budget} (the last: {err})"
                ) from err
            _log.warning("skipped a task that fits no training sequence: %s", err)
            return None
        self.skipped_in_a_row = 0
        return sequence_features(sequence, self.encoder.tokenizer.pad_id)


def _is_sequence(element: dict[str, np.ndarray] | None) -> bool:
    return element is not None


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _allow_grain_flags() -> None:
    # grain's worker processes read absl flags; outside an absl app nobody parses them and
    # grain fails with UnparsedFlagAccessError. Their defaults are what we want.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_pipeline(
    paths: Sequence[str | os.PathLike],
    config: PipelineConfig,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer: PromptTokenizer | None = None,
) -> grain.IterDataset:
    """The training pipeline over task shards.

    Args:
        paths: ArrayRecord task shards (one ``encode_task`` record per task), in a fixed
            order (the record order defines the dataset).
        config: pipeline settings.
        seed: data seed (shuffle order and every sampling choice), 0 <= seed < 2**32.
        process_index, process_count: this host's slot; default ``jax.process_index()``
            and ``jax.process_count()``. Host h reads tasks h, h + count, ...
        tokenizer: the fast tokenizer; default from ``config.tokenizer_dir``.

    Returns:
        A grain ``IterDataset``; ``iter()`` of it yields dicts of [batch_size, seq_len]
        arrays (see ``encoding.pack`` for the format) and has ``get_state``/``set_state``.
    """
    paths = [str(Path(p)) for p in paths]
    if not paths:
        raise ValueError("no task shards given")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"task shard not found: {missing[0]}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    index, count = _process_slot(process_index, process_count)
    if tokenizer is None:
        tokenizer = PromptTokenizer(load_backend_tokenizer(config.tokenizer_dir))

    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) < count:
        raise ValueError(f"{len(source)} tasks in the shards, fewer than the {count} hosts")
    tasks = grain.MapDataset.source(source)[index::count]
    if config.shuffle:
        tasks = tasks.shuffle(seed=seed)
    epoch_length = len(tasks)
    tasks = tasks.repeat(config.num_epochs)
    sequences = (
        tasks.map_with_index(EncodeTaskRecord(tokenizer, config.sampling, seed, epoch_length))
        .filter(_is_sequence)
        .to_iter_dataset(
            grain.ReadOptions(
                num_threads=config.read_threads, prefetch_buffer_size=2 * config.read_threads
            )
        )
    )
    if config.packing:
        rows = pack_dataset(
            sequences,
            seq_len=config.seq_len,
            pad_id=tokenizer.pad_id,
            num_packing_bins=config.packing_bins,
            seed=seed,
        )
    else:
        rows = pad_dataset(sequences, seq_len=config.seq_len, pad_id=tokenizer.pad_id)
    batches = rows.batch(config.batch_size, drop_remainder=True)
    if config.worker_count > 0:
        _allow_grain_flags()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count,
                per_worker_buffer_size=config.worker_buffer_size,
            )
        )
    return batches


def iterator_state(iterator: Any) -> bytes:
    """The iterator's position as JSON bytes (store it with the model checkpoint)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode()


def restore_iterator_state(iterator: Any, state: bytes) -> None:
    """Moves a fresh iterator of the same pipeline to a position saved by
    :func:`iterator_state`."""
    iterator.set_state(json.loads(state))
