"""Stage data: a `DataConfig` -> an iterator of this process's training batches.

The trainer takes any iterator of batch dicts (see `mllm_jax.train.batches`); iterators
with `get_state()`/`set_state()` (grain's, `SyntheticBatches`) are checkpointed and
resumed exactly. A run can also be given its own `DataFactory`.

Multi-host: every iterator yields *process-local* batches, the rows of the global batch
that this process's devices hold. The global batch is the processes' batches stacked in
process order (`check_process_rows` proves the mesh puts them there), so the global
batch size is the local one times `jax.process_count()`.

- Task shards (grain): each process reads its own tasks (`index::count`) and packs
  its own rows; `pipeline.batch_size` is per process. The iterator position is per
  process: a checkpoint stores every process's position, and resuming with another
  process count is refused (`restore_positions`).
- Synthetic: `synthetic.batch_size` is the global batch; every process draws the same
  global batch (a pure function of seed and index) and keeps its block of rows
  (`ProcessRows`), so the data of a step does not depend on the process count and the
  position (the batch index) restores on any number of processes.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mllm_jax.data.pipeline import PipelineConfig, build_pipeline
from mllm_jax.data.shards import CorpusError, check_disjoint, list_corpus_shards
from mllm_jax.foundation.config import ConfigError, from_dict
from mllm_jax.runs.checkpoint import CheckpointMismatchError
from mllm_jax.runs.config import DataConfig
from mllm_jax.train.batches import BatchError, batch_sharding
from mllm_jax.train.synthetic import SyntheticBatches

Batches = Iterator[Mapping[str, Any]]
# (data selection, what it is for, e.g. "stage 'warmup'" or "validation") -> batches
DataFactory = Callable[[DataConfig, str], Batches]

# An iterator whose `get_state()` is the same on every process and means the same data on
# any number of processes sets this attribute to True (see `restore_positions`).
GLOBAL_POSITION = "position_is_global"


def expand_shards(patterns: list[str], where: str) -> list[str]:
    """Shard paths from corpus directories, paths and glob patterns, in the given order
    (each glob sorted). A directory is a corpus `mllm-jax generate` wrote: its shards come
    from the manifests, and a corpus some process has not finished is refused."""
    paths: list[str] = []
    for pattern in patterns:
        if Path(pattern).is_dir():
            try:
                paths.extend(str(p) for p in list_corpus_shards(Path(pattern)))
            except CorpusError as err:
                raise FileNotFoundError(f"{where}: {err}") from err
            continue
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"{where}: no task shard matches {pattern!r}")
        paths.extend(matches)
    return paths


def check_task_overlap(config: Any) -> None:
    """Refuses a run whose task shards repeat tasks within a stage or between a stage and
    the validation set (`mllm_jax.data.shards.check_disjoint`; corpora with manifests).

    Raises CorpusOverlapError naming the corpora and the shared index range.
    """
    groups: dict[str, list[str]] = {}
    for stage in config.stages:
        if stage.data.kind == "shards":
            where = f"stage {stage.name!r} data"
            groups[where] = expand_shards(stage.data.shards, where)
    validation = config.validation
    if validation.every and validation.data is not None and validation.data.kind == "shards":
        groups["validation data"] = expand_shards(validation.data.shards, "validation data")
        across = [(name, "validation data") for name in groups if name != "validation data"]
    else:
        across = []
    check_disjoint(groups, across=across)


def process_block(
    global_rows: int,
    where: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> slice:
    """This process's rows of a global batch of `global_rows`: the `process_index`-th of
    `process_count` equal blocks (defaults: the running job's)."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if global_rows % count:
        raise BatchError(
            f"{where}: global batch size {global_rows} is not divisible by the {count} processes"
        )
    size = global_rows // count
    return slice(index * size, (index + 1) * size)


class ProcessRows:
    """This process's block of rows of every batch of a global-batch iterator.

    Batches are dicts of arrays with the batch on axis 0. The position is the wrapped
    iterator's, identical on every process (`position_is_global`).
    """

    position_is_global = True

    def __init__(self, batches: Iterator[Mapping[str, Any]], rows: slice):
        self.batches = batches
        self.rows = rows

    def __iter__(self) -> ProcessRows:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v)[self.rows] for k, v in next(self.batches).items()}

    def get_state(self) -> Any:
        return self.batches.get_state()  # type: ignore[attr-defined]

    def set_state(self, state: Any) -> None:
        self.batches.set_state(state)  # type: ignore[attr-defined]


def default_data(data: DataConfig, purpose: str) -> Batches:
    """This process's batches of `data`: its rows of the synthetic task's global batches,
    or its share of the task shards through the grain pipeline."""
    if data.kind == "synthetic":
        rows = process_block(data.synthetic.batch_size, f"{purpose} data (synthetic)")
        return ProcessRows(SyntheticBatches(data.synthetic, data.seed), rows)
    try:
        pipeline = from_dict(PipelineConfig, data.pipeline, where="pipeline")
    except ConfigError as err:
        raise ConfigError(f"{purpose} data: {err}") from err
    dataset = build_pipeline(
        expand_shards(data.shards, f"{purpose} data"), pipeline, seed=data.seed
    )
    return iter(dataset)


def check_process_rows(
    local_rows: int,
    mesh: Mesh,
    where: str,
    *,
    process_of: Callable[[Any], int] | None = None,
    process_count: int | None = None,
) -> None:
    """Refuses a batch layout the trainer cannot build from process-local batches.

    The global batch has `local_rows * process_count` rows, sharded over the mesh's
    (data, fsdp) axes: they must divide it, and each process's devices must hold exactly
    its own block of rows, in process order. A mesh that replicates the batch across
    processes would need every process to supply the same rows (silently wrong with
    per-process data), so it is an error, as are blocks out of process order.
    `process_of` (device -> process, default `device.process_index`) and `process_count`
    default to the running job's.
    """
    count = jax.process_count() if process_count is None else process_count
    process_of = process_of or (lambda device: device.process_index)
    total = local_rows * count
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if total % ways:
        raise BatchError(
            f"{where}: global batch size {total} ({local_rows} rows x {count} processes) "
            f"is not divisible by the mesh's data x fsdp = {ways} devices"
        )
    held: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((1, total, 1)).items():
        start, stop, _ = index[1].indices(total)
        held.setdefault(process_of(device), set()).update(range(start, stop))
    for process in range(count):
        want = set(range(process * local_rows, (process + 1) * local_rows))
        got = held.get(process, set())
        if got != want:
            raise BatchError(
                f"{where}: the mesh {dict(mesh.shape)} puts rows {_spans(got)} of the global "
                f"batch on process {process}, but process-local batches need rows "
                f"{_spans(want)} there; shard the batch across processes (data/fsdp over "
                "hosts, tensor within a host) with the devices in process order"
            )


def _spans(rows: set[int]) -> str:
    ordered = sorted(rows)
    if not ordered:
        return "none"
    spans, start = [], ordered[0]
    for a, b in zip(ordered, [*ordered[1:], None], strict=True):
        if b != a + 1:
            spans.append(f"{start}..{a}" if a != start else str(start))
            start = b
    return ", ".join(spans)


# ------------------------------------------------------------------ data positions


def data_position(iterator: Any) -> Any:
    """The iterator's `get_state()` (this process's position), or None without one."""
    get_state = getattr(iterator, "get_state", None)
    return get_state() if callable(get_state) else None


def restore_positions(
    iterator: Any,
    positions: Sequence[Any],
    where: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> None:
    """Moves `iterator` to this process's position among `positions` (one per process of
    the run that saved them).

    Same process count: each process takes its own. Another count: allowed only for an
    iterator whose position is global (`position_is_global`, e.g. the synthetic task,
    whose batch index means the same global batch for any number of processes) and
    identical on every saving process; a per-process position (grain: which tasks this
    host read, its packer's state) is refused with CheckpointMismatchError, since it
    cannot be re-split over another number of hosts. `process_index`/`process_count`
    default to the running job's.
    """
    set_state = getattr(iterator, "set_state", None)
    if any(p is None for p in positions) or not callable(set_state):
        raise CheckpointMismatchError(
            f"{where}: cannot resume mid-stage: the data iterator "
            + (
                "state was not saved (iterator without get_state)"
                if any(p is None for p in positions)
                else "has no set_state"
            )
        )
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if len(positions) == count:
        set_state(positions[index])
        return
    if getattr(iterator, GLOBAL_POSITION, False) and all(p == positions[0] for p in positions):
        set_state(positions[0])
        return
    raise CheckpointMismatchError(
        f"{where} was written by {len(positions)} processes and this run has {count}: "
        "the data iterator's position is per process (grain reads a different share of "
        "the tasks on each process) and cannot be re-split; resume with "
        f"{len(positions)} processes (model and optimizer state reshard to any mesh); a "
        "checkpoint at a stage's end resumes with any process count"
    )
