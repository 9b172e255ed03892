"""``mllm-jax generate``: prior -> (random-forest filter pool) -> task shards + manifest.

Process ``P`` of ``C`` generates the ``P``-th contiguous slice of the index range
``[start, start + count)`` into the shared corpus directory (shard and manifest names
carry ``P``), so the processes' outputs together are the corpus one process would write:
the same tasks, in the same order, byte for byte. Tasks whose prior attempts all failed
(``TaskBatch.valid`` False) and tasks the filter rejects are counted in the manifest
(the invalid ones by index), never silently dropped.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mllm_jax.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ShardWriter,
    manifest_name,
    remove_process_files,
    write_json_atomic,
)
from mllm_jax.data.tasks import Task
from mllm_jax.filtering.config import FilterConfig
from mllm_jax.prior.config import PriorConfig


class GenerateError(ValueError):
    """Bad generate settings or an output directory that would be overwritten."""


def process_slice(start: int, count: int, process_index: int, process_count: int) -> range:
    """The contiguous indices of ``[start, start + count)`` that process ``process_index`` of
    ``process_count`` generates; the slices partition the range, sizes differ by <= 1."""
    if process_count < 1:
        raise GenerateError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise GenerateError(f"process_index {process_index} not in [0, {process_count})")
    lo = start + count * process_index // process_count
    hi = start + count * (process_index + 1) // process_count
    return range(lo, hi)


def default_process() -> tuple[int, int]:
    """(process index, process count) of the running job, joining it first the way
    ``mllm-jax train`` does (coordinator settings from the environment, or a detected TPU
    pod / SLURM / Open MPI cluster); (0, 1) for a single process. Without the join every
    pod worker would think it is process 0 and write the same slice."""
    import jax

    from mllm_jax.train.distributed import initialize

    initialize()
    return jax.process_index(), jax.process_count()


@dataclass(frozen=True)
class GenerateConfig:
    """One ``generate`` run of one process.

    Attributes:
        seed: corpus seed; task ``i`` is a pure function of (seed, i, prior).
        start, count: the corpus's index range ``[start, start + count)`` (all processes).
        prior: prior settings.
        filter: filter settings, or None to write every valid task unfiltered.
        shard_size: tasks per shard file.
        batch_size: tasks the prior generates per call (overlapped with filtering).
        process_index, process_count: this process's slot among those sharing the range.
        workers: filter worker processes (default one per core).
        overwrite: replace this process's earlier complete output instead of refusing.
        prior_processes: generate in this many single-device prior worker processes
            pinned one per core (``mllm_jax.prior.workers``; CPU hosts); 0 uses this
            process's JAX devices. Task bytes differ between the two (docs/prior.md).
    """

    seed: int
    start: int
    count: int
    prior: PriorConfig = field(default_factory=PriorConfig)
    filter: FilterConfig | None = None
    shard_size: int = 1024
    batch_size: int = 256
    process_index: int = 0
    process_count: int = 1
    workers: int | None = None
    overwrite: bool = False
    prior_processes: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise GenerateError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.start < 0 or self.count < 1:
            raise GenerateError(f"need start >= 0 and count >= 1, got {self.start}, {self.count}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise GenerateError(
                f"shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}"
            )
        if self.workers is not None and self.workers < 1:
            raise GenerateError(f"workers must be >= 1, got {self.workers}")
        if self.prior_processes < 0:
            raise GenerateError(f"prior_processes must be >= 0, got {self.prior_processes}")
        process_slice(self.start, self.count, self.process_index, self.process_count)

    @property
    def indices(self) -> range:
        return process_slice(self.start, self.count, self.process_index, self.process_count)


class _ValidTasks:
    """The prior's batches as lists of valid tasks; records the invalid indices."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.invalid: list[int] = []

    def __iter__(self) -> Iterator[list[Task]]:
        for batch in self.batches:
            self.invalid.extend(int(i) for i in batch.indices[~batch.valid])
            yield batch.to_tasks()


def _versions() -> dict[str, str]:
    import jax
    import numpy
    import sklearn

    from mllm_jax import __version__

    return {
        "mllm_jax": __version__,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "numpy": numpy.__version__,
        "scikit_learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def _write_unfiltered(
    tasks: _ValidTasks, writer: ShardWriter, total: int, progress: bool
) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    started = time.perf_counter()
    seen = 0
    bar = Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar:
        bar_id = bar.add_task("generating", total=total)
        for batch in tasks:
            for task in batch:
                writer.add(task)
            seen += len(batch)
            bar.update(bar_id, completed=seen + len(tasks.invalid))
    wall = time.perf_counter() - started
    return {
        "tasks_seen": seen,
        "accepted": seen,
        "rejected": 0,
        "rejected_by_reason": {},
        "wall_seconds": round(wall, 3),
        "tasks_per_second": seen / wall if wall > 0 else None,
    }


def generate(
    config: GenerateConfig,
    out: Path,
    *,
    progress: bool = True,
    batches: Callable[..., Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Generates (and filters) this process's slice of the corpus into ``out``.

    Args:
        config: the run.
        out: corpus directory (created; shared by the processes).
        progress: show a progress bar on stderr.
        batches: ``(seed, start, count, prior, batch_size) -> iterable of batches`` with
            ``indices``, ``valid`` and ``to_tasks()``; default the prior's
            ``iter_task_batches`` (tests pass a cheap stand-in).

    Returns the manifest, also written to ``out/manifest-pP.json`` after the last shard.
    Stale files of this process (an interrupted earlier run) are removed first; a complete
    earlier output (its manifest exists) is refused unless ``config.overwrite``. An
    exception or Ctrl-C removes this run's shards again.
    """
    if batches is not None:
        return _generate(config, out, progress, batches)
    if config.prior_processes:
        from mllm_jax.prior.workers import CoreWorkers

        with CoreWorkers(config.prior_processes) as prior_workers:
            return _generate(config, out, progress, prior_workers.iter_task_batches)
    import functools

    import jax

    from mllm_jax.prior import iter_task_batches

    # This host's devices only: under jax.distributed, jax.devices() lists every host's,
    # and the prior's tasks do not depend on the devices.
    batches = functools.partial(iter_task_batches, devices=jax.local_devices())
    return _generate(config, out, progress, batches)


def _generate(
    config: GenerateConfig, out: Path, progress: bool, batches: Callable[..., Iterable[Any]]
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / manifest_name(config.process_index)
    if manifest_path.exists() and not config.overwrite:
        raise GenerateError(
            f"{manifest_path} exists: process {config.process_index} already generated this "
            "corpus (pass --overwrite to replace it)"
        )
    remove_process_files(out, config.process_index)
    indices = config.indices
    started = time.perf_counter()
    tasks = _ValidTasks(
        batches(config.seed, indices.start, len(indices), config.prior, config.batch_size)
    )
    with ShardWriter(out, config.shard_size, process_index=config.process_index) as writer:
        if config.filter is None:
            report = _write_unfiltered(tasks, writer, len(indices), progress)
        else:
            from mllm_jax.filtering.run import FilterErrorRateError, filter_into

            try:
                report = filter_into(
                    tasks,
                    writer.add,
                    config.filter,
                    workers=config.workers,
                    total=len(indices),
                    progress=progress,
                )
            except FilterErrorRateError as error:
                raise GenerateError(str(error)) from error
            report.pop("config", None)  # recorded once, under "filter"
    wall = time.perf_counter() - started
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "seed": config.seed,
        "corpus_start": config.start,
        "corpus_count": config.count,
        "process_index": config.process_index,
        "process_count": config.process_count,
        "start": indices.start,
        "count": len(indices),
        "tasks_written": writer.count,
        "invalid": len(tasks.invalid),
        "invalid_indices": tasks.invalid,
        "rejected": report["rejected"],
        "rejected_by_reason": report["rejected_by_reason"],
        "shards": writer.shards,
        "filtered": config.filter is not None,
        "consensus": config.filter is not None and config.filter.consensus,
        "report": {
            **report,
            "end_to_end_seconds": round(wall, 3),
            "end_to_end_tasks_per_second": len(indices) / wall if wall > 0 else None,
        },
        "prior": config.prior.to_dict(),
        "filter": None if config.filter is None else asdict(config.filter),
        "shard_size": config.shard_size,
        "batch_size": config.batch_size,
        "prior_processes": config.prior_processes,
        "versions": _versions(),
    }
    counted = manifest["tasks_written"] + manifest["invalid"] + manifest["rejected"]
    if counted != len(indices):  # every index is written, invalid or rejected
        raise RuntimeError(f"generate accounted for {counted} of {len(indices)} tasks")
    write_json_atomic(manifest_path, manifest)
    return manifest


def build_config(
    *,
    seed: int,
    start: int,
    count: int,
    filter_tasks: bool,
    consensus: bool,
    overrides: list[str],
    process_index: int | None = None,
    process_count: int | None = None,
    **settings: Any,
) -> GenerateConfig:
    """A :class:`GenerateConfig` from command-line values.

    ``overrides`` are ``prior.<field>=value`` / ``filter.<field>=value`` strings (e.g.
    ``prior.rows=256``, ``filter.n_estimators=50``). The process slot defaults to
    :func:`default_process` when neither index nor count is given.
    """
    from mllm_jax.config import ConfigError, apply_overrides, from_dict

    if consensus and not filter_tasks:
        raise GenerateError("--consensus needs --filter (the mask comes from the forests)")
    if (process_index is None) != (process_count is None):
        raise GenerateError("give both --process-index and --process-count, or neither")
    if process_index is None or process_count is None:
        process_index, process_count = default_process()
    sections = {"prior": PriorConfig().to_dict(), "filter": asdict(FilterConfig())}
    for text in overrides:
        section = text.split(".", 1)[0]
        if section not in sections or "." not in text.split("=", 1)[0]:
            raise GenerateError(
                f"override {text!r}: expected prior.<field>=value or filter.<field>=value"
            )
    data = apply_overrides(sections, overrides)
    try:
        prior = PriorConfig.from_dict(data["prior"])
        data["filter"]["consensus"] = consensus
        filter_config = from_dict(FilterConfig, data["filter"], where="filter")
    except (ConfigError, ValueError) as err:  # PriorConfigError is a ValueError
        raise GenerateError(str(err)) from err
    return GenerateConfig(
        seed=seed,
        start=start,
        count=count,
        prior=prior,
        filter=filter_config if filter_tasks else None,
        process_index=process_index,
        process_count=process_count,
        **settings,
    )
