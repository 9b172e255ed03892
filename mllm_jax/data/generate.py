"""``mllm-jax generate``: prior -> (random-forest filter pool) -> task shards + manifest.

Process ``P`` of ``C`` generates the ``P``-th contiguous slice of the index range
``[start, start + count)`` into the shared corpus directory (shard and manifest names
carry ``P``), so the processes' outputs together are the corpus one process would write:
the same tasks, in the same order, byte for byte. Tasks whose prior attempts all failed
(``TaskBatch.valid`` False) and tasks the filter rejects are counted in the manifest
(the invalid ones by index), never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mllm_jax import __version__
from mllm_jax.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ShardWriter,
    journal_name,
    manifest_name,
    remove_process_files,
)
from mllm_jax.filtering.config import FilterConfig
from mllm_jax.filtering.report import FilterReport
from mllm_jax.filtering.run import FilterErrorRateError, filter_into
from mllm_jax.foundation.config import ConfigError, apply_overrides, from_dict
from mllm_jax.foundation.directories import make_directory_problem
from mllm_jax.foundation.distributed import initialize
from mllm_jax.foundation.files import atomic_write_json
from mllm_jax.foundation.tasks import Task
from mllm_jax.prior import iter_task_batches
from mllm_jax.prior.config import PriorConfig
from mllm_jax.prior.workers import CoreWorkers


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

    return {
        "mllm_jax": __version__,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "numpy": numpy.__version__,
        "scikit_learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def _write_unfiltered(
    tasks: _ValidTasks, writer: ShardWriter, total: int, progress: bool, counts: dict[str, Any]
) -> dict[str, Any]:
    """Writes every valid task; ``counts["tasks_seen"]`` goes on from a resumed run's."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    started = time.perf_counter()
    before = counts["tasks_seen"]
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
                counts["tasks_seen"] += 1
                writer.add(task)
            bar.update(bar_id, completed=counts["tasks_seen"] - before + len(tasks.invalid))
    wall = time.perf_counter() - started
    seen = counts["tasks_seen"]
    return {
        "tasks_seen": seen,
        "accepted": seen,
        "rejected": 0,
        "rejected_by_reason": {},
        "wall_seconds": round(wall, 3),
        "tasks_per_second": (seen - before) / wall if wall > 0 else None,
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
    A complete earlier output (its manifest exists) is refused unless
    ``config.overwrite``. An interrupted earlier run of the same settings (killed, Ctrl-C,
    an error) is resumed after its last complete shard, which its journal
    (``.journal-pP.json``, rewritten after every shard) records with the counts up to it:
    the shards equal an uninterrupted run's, byte for byte. Files of an interrupted run
    with other settings are removed (and said so) before starting over.
    """
    if batches is not None:
        return _generate(config, out, progress, batches)
    if config.prior_processes:
        with CoreWorkers(config.prior_processes) as prior_workers:
            return _generate(
                config, out, progress, prior_workers.iter_task_batches, prior_compiles=True
            )
    import functools

    import jax

    # This host's devices only: under jax.distributed, jax.devices() lists every host's,
    # and the prior's tasks do not depend on the devices.
    batches = functools.partial(iter_task_batches, devices=jax.local_devices())
    return _generate(config, out, progress, batches, prior_compiles=True)


def _generate(
    config: GenerateConfig,
    out: Path,
    progress: bool,
    batches: Callable[..., Iterable[Any]],
    *,
    prior_compiles: bool = False,
) -> dict[str, Any]:
    out = Path(out)
    _make_writable_directory(out)
    manifest_path = out / manifest_name(config.process_index)
    if manifest_path.exists() and not config.overwrite:
        raise GenerateError(
            f"{manifest_path} exists: process {config.process_index} already generated this "
            "corpus (pass --overwrite to replace it)"
        )
    _check_other_processes(out, config)
    journal_path = out / journal_name(config.process_index)
    identity = _identity(config)
    resumed = None if config.overwrite else _read_journal(journal_path, identity)
    if resumed is None:
        remove_process_files(out, config.process_index)
    else:
        keep = {shard["file"] for shard in resumed["shards"]}
        remove_process_files(out, config.process_index, keep=keep | {journal_path.name})
    indices = config.indices
    first = indices.start if resumed is None else resumed["next_index"]
    # One line before the first batch: the real prior compiles its programs first and a
    # log that is not a terminal (no progress bar) would otherwise stay silent for minutes.
    wait = " (the prior compiles its programs first: minutes on a CPU)" if prior_compiles else ""
    if resumed is None:
        _say(f"process {config.process_index}: generating tasks {first}..{indices.stop - 1}{wait}")
    else:
        _say(
            f"process {config.process_index}: resuming at task {first} of "
            f"{indices.start}..{indices.stop - 1} after {len(resumed['shards'])} complete "
            f"shards ({sum(s['tasks'] for s in resumed['shards'])} tasks) of an interrupted "
            f"run{wait}"
        )
    started = time.perf_counter()
    remaining = indices.stop - first
    tasks = _ValidTasks(
        batches(config.seed, first, remaining, config.prior, config.batch_size)
        if remaining > 0
        else []
    )
    tasks.invalid = [] if resumed is None else list(resumed["invalid_indices"])
    counts = _start_counts(config, resumed)
    finished = False

    def journal(shard: dict[str, Any]) -> None:
        last = indices.stop - 1 if finished else shard["last_index"]
        atomic_write_json(
            journal_path,
            {
                "identity": identity,
                "next_index": last + 1,
                "shards": writer.shards,
                "invalid_indices": [i for i in tasks.invalid if i <= last],
                "counts": dict(counts) if isinstance(counts, dict) else counts.snapshot(),
            },
        )

    writer = ShardWriter(
        out,
        config.shard_size,
        process_index=config.process_index,
        shards=[] if resumed is None else resumed["shards"],
        on_shard=journal,
        keep_completed=True,
    )
    with writer:
        if config.filter is None:
            report = _write_unfiltered(tasks, writer, remaining, progress, counts)
        else:
            try:
                report = filter_into(
                    tasks,
                    writer.add,
                    config.filter,
                    workers=config.workers,
                    total=remaining,
                    progress=progress,
                    report=counts,
                )
            except FilterErrorRateError as error:
                raise GenerateError(str(error)) from error
            report.pop("config", None)  # recorded once, under "filter"
        finished = True
        writer.close()
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
        "resumed_at": None if resumed is None else first,
        "report": {
            **report,
            "end_to_end_seconds": round(wall, 3),
            "end_to_end_tasks_per_second": remaining / wall if wall > 0 else None,
        },
        "prior": config.prior.to_dict(),
        "filter": None if config.filter is None else asdict(config.filter),
        "prior_sha256": config_sha256(config.prior.to_dict()),
        "filter_sha256": None if config.filter is None else config_sha256(asdict(config.filter)),
        "shard_size": config.shard_size,
        "batch_size": config.batch_size,
        "prior_processes": config.prior_processes,
        "versions": _versions(),
    }
    counted = manifest["tasks_written"] + manifest["invalid"] + manifest["rejected"]
    if counted != len(indices):  # every index is written, invalid or rejected
        raise RuntimeError(f"generate accounted for {counted} of {len(indices)} tasks")
    atomic_write_json(manifest_path, manifest)
    journal_path.unlink(missing_ok=True)
    return manifest


def _make_writable_directory(out: Path) -> None:
    """Creates the corpus directory; a place that is not a directory or cannot be written
    is a GenerateError naming it (was a traceback from mkdir or the shard writer)."""
    problem = make_directory_problem(out)
    if problem is not None:
        raise GenerateError(f"--out {out}: {problem}")


def config_sha256(settings: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys): equal settings, equal hash."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# What the processes sharing one corpus directory must agree on.
_SHARED = ("seed", "corpus_start", "corpus_count", "process_count", "prior", "filter")


def _check_other_processes(out: Path, config: GenerateConfig) -> None:
    """Refuses to add this process's slice to a corpus whose finished processes were run
    with another split, range, seed, prior or filter (their tasks would be duplicated or
    missing, and the corpus unreadable)."""
    mine = {
        "seed": config.seed,
        "corpus_start": config.start,
        "corpus_count": config.count,
        "process_count": config.process_count,
        "prior": config.prior.to_dict(),
        "filter": None if config.filter is None else asdict(config.filter),
    }
    for path in sorted(out.glob("manifest-p*.json")):
        if path.name == manifest_name(config.process_index):
            continue
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise GenerateError(f"{path}: unreadable manifest ({error})") from error
        differ = [key for key in _SHARED if theirs.get(key) != mine[key]]
        if differ:
            shown = ", ".join(
                f"{key} {theirs.get(key)!r} there, {mine[key]!r} here"
                for key in differ
                if key not in ("prior", "filter")
            )
            shown += "".join(
                f"; the {key} config differs" for key in differ if key in ("prior", "filter")
            )
            raise GenerateError(
                f"{out} holds a corpus generated with other settings ({path.name}: {shown}); "
                "write this run into another directory"
            )


def _identity(config: GenerateConfig) -> dict[str, Any]:
    """What decides the bytes of a process's shards: a journal of other settings is not
    continued."""
    return {
        "seed": config.seed,
        "corpus_start": config.start,
        "corpus_count": config.count,
        "process_index": config.process_index,
        "process_count": config.process_count,
        "prior": config.prior.to_dict(),
        "filter": None if config.filter is None else asdict(config.filter),
        "shard_size": config.shard_size,
        "prior_processes": config.prior_processes,
        "mllm_jax": __version__,
    }


def _read_journal(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """An interrupted run's journal when it is of these settings and its shards are all on
    disk; None (and a line saying why, if there was one) otherwise."""
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
        recorded = journal["identity"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        _say(f"{path}: unreadable journal ({error}); starting over")
        return None
    if recorded != identity:
        changed = sorted(
            k for k in identity.keys() | recorded.keys() if identity.get(k) != recorded.get(k)
        )
        _say(
            f"{path}: an interrupted run with other settings ({', '.join(changed)} differ); "
            "starting over"
        )
        return None
    missing = [s["file"] for s in journal["shards"] if not (path.parent / s["file"]).is_file()]
    if missing:
        _say(f"{path}: shards {missing} of the interrupted run are gone; starting over")
        return None
    return journal


def _start_counts(config: GenerateConfig, resumed: dict[str, Any] | None) -> Any:
    """The running counts a journal records, from a resumed run's: the FilterReport that
    ``filter_into`` adds to when filtering, else a dict of tasks seen."""
    counts = None if resumed is None else resumed["counts"]
    if config.filter is None:
        return {"tasks_seen": 0} if counts is None else dict(counts)
    return FilterReport() if counts is None else FilterReport.from_snapshot(counts)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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
        # typed like the filter's (PriorConfig.from_dict checks no types: 'abc' for an
        # integer was a TypeError traceback from the validation)
        prior = from_dict(PriorConfig, data["prior"], where="prior")
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
