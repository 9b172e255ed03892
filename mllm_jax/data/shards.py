"""Task corpora on disk: ArrayRecord shards of task records plus one manifest per process.

A corpus directory holds, for each generating process ``P`` (zero-padded)::

    tasks-pP-00000.array_record, tasks-pP-00001.array_record, ...   one encode_task record
                                                                     per task, index order
    manifest-pP.json                                                 written last

Shards are written under a hidden temporary name (``.tasks-...tmp``) and renamed when they
are complete; the manifest is written atomically after the last shard, so a process's
part of a corpus is complete exactly when its manifest exists. Sorting the shard names
gives index order across processes (process P holds a contiguous index range below
process P + 1's), so ``DIR/*.array_record`` globs (the training config's ``data.shards``)
read a complete corpus in order; :func:`list_corpus_shards` additionally checks that every
process finished and lists only the shards the manifests name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from mllm_jax.foundation.tasks import Task, encode_task

MANIFEST_FORMAT = "mllm_jax.task_corpus"
MANIFEST_VERSION = 1


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete or inconsistent."""


def shard_name(process_index: int, shard: int) -> str:
    return f"tasks-p{process_index:05d}-{shard:05d}.array_record"


def manifest_name(process_index: int) -> str:
    return f"manifest-p{process_index:05d}.json"


def journal_name(process_index: int) -> str:
    """An unfinished generate run's record of its complete shards (removed at the end)."""
    return f".journal-p{process_index:05d}.json"


class ShardWriter:
    """Writes tasks into consecutive ArrayRecord shards of ``shard_size`` records each.

    Records use ``group_size:1`` so grain can read any record on its own. A shard is
    written as ``.<name>.tmp`` and renamed to ``<name>`` when full or on :meth:`close`.
    Used as a context manager, an exception removes the open shard's temporary file and,
    unless ``keep_completed``, the shards this writer completed, so an interrupted run
    leaves nothing that looks finished. A resumable writer (``keep_completed``, as
    ``generate`` uses it) keeps its completed shards: its caller records them, through
    ``on_shard``, in a journal that a rerun continues from.

    Attributes:
        count: tasks written so far (those of ``shards`` given at construction included).
        shards: per completed shard: ``{"file", "tasks", "first_index", "last_index"}``.
    """

    def __init__(
        self,
        directory: Path,
        shard_size: int,
        *,
        process_index: int = 0,
        shards: Sequence[dict[str, Any]] = (),
        on_shard: Callable[[dict[str, Any]], None] | None = None,
        keep_completed: bool = False,
    ) -> None:
        """shards: completed shards of an interrupted run to continue after (their files
        must be in ``directory``); on_shard: called with each shard once it is renamed
        into place."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if process_index < 0:
            raise ValueError(f"process_index must be >= 0, got {process_index}")
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.process_index = process_index
        self.shards: list[dict[str, Any]] = [dict(shard) for shard in shards]
        self.count = sum(shard["tasks"] for shard in self.shards)
        self.on_shard = on_shard
        self.keep_completed = keep_completed
        self._writer: Any = None
        self._open: dict[str, Any] | None = None

    @property
    def paths(self) -> list[Path]:
        """The completed shards, in order."""
        return [self.directory / shard["file"] for shard in self.shards]

    def _temp_path(self, name: str) -> Path:
        return self.directory / f".{name}.tmp"

    def add(self, task: Task) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._open is None:
            name = shard_name(self.process_index, len(self.shards))
            self._writer = ArrayRecordWriter(str(self._temp_path(name)), "group_size:1")
            self._open = {"file": name, "tasks": 0, "first_index": task.index}
        self._writer.write(encode_task(task))
        self._open["tasks"] += 1
        self._open["last_index"] = task.index
        self.count += 1
        if self._open["tasks"] == self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._open is None:
            return
        self._writer.close()
        self._writer = None
        name = self._open["file"]
        os.replace(self._temp_path(name), self.directory / name)
        self.shards.append(self._open)
        self._open = None
        if self.on_shard is not None:
            self.on_shard(self.shards[-1])

    def close(self) -> None:
        """Completes the open shard (if any)."""
        self._finish_shard()

    def abort(self) -> None:
        """Removes the open shard's temporary file and, unless ``keep_completed``, every
        shard this writer completed."""
        if self._open is not None:
            self._writer.close()
            self._temp_path(self._open["file"]).unlink(missing_ok=True)
            self._writer, self._open = None, None
        if self.keep_completed:
            return
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.shards = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def remove_process_files(
    directory: Path, process_index: int, *, keep: Collection[str] = ()
) -> list[Path]:
    """Deletes process ``process_index``'s manifest, journal, shards and temporary files (a
    stale or interrupted earlier run), except the file names in ``keep``; returns what was
    removed."""
    directory = Path(directory)
    prefix = f"tasks-p{process_index:05d}-"
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        name = path.name
        stale = (
            name == manifest_name(process_index)
            or (name.startswith(prefix) and name.endswith(".array_record"))
            or name.startswith(f".{prefix}")
            or name.startswith(f".{manifest_name(process_index)}.")
            or name == journal_name(process_index)
            or name.startswith(f".{journal_name(process_index)}.")
        )
        if stale and name not in keep and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def read_manifests(directory: Path) -> list[dict[str, Any]]:
    """Every process manifest of a corpus directory, by process index.

    Raises:
        CorpusError: no directory, no manifest, a foreign or unreadable manifest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CorpusError(f"{directory}: no such corpus directory")
    manifests = []
    for path in sorted(directory.glob("manifest-p*.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CorpusError(f"{path}: unreadable manifest ({err})") from err
        if manifest.get("format") != MANIFEST_FORMAT:
            raise CorpusError(f"{path}: not a task corpus manifest")
        if manifest.get("version") != MANIFEST_VERSION:
            raise CorpusError(
                f"{path}: manifest version {manifest.get('version')}, this reader knows "
                f"{MANIFEST_VERSION}"
            )
        manifests.append(manifest)
    if not manifests:
        raise CorpusError(f"{directory}: no manifest-p*.json (generation not run or not finished)")
    return sorted(manifests, key=lambda m: m["process_index"])


def list_corpus_shards(directory: Path, *, require_all_processes: bool = True) -> list[Path]:
    """The complete shards of a corpus, in task index order.

    Args:
        directory: the corpus directory ``mllm-jax generate --out`` wrote.
        require_all_processes: refuse a corpus where some of the processes that share it
            have not finished (their manifest is missing).

    Raises:
        CorpusError: missing manifests, manifests of different corpora (seed, range,
            process count), or a shard a manifest lists that is not on disk.
    """
    directory = Path(directory)
    manifests = read_manifests(directory)
    first = manifests[0]
    identity = ("seed", "corpus_start", "corpus_count", "process_count")
    for manifest in manifests[1:]:
        for key in identity:
            if manifest[key] != first[key]:
                raise CorpusError(
                    f"{directory}: manifests disagree on {key} ({first[key]} in process "
                    f"{first['process_index']}, {manifest[key]} in process "
                    f"{manifest['process_index']})"
                )
    if require_all_processes:
        present = {m["process_index"] for m in manifests}
        missing = sorted(set(range(first["process_count"])) - present)
        if missing:
            raise CorpusError(
                f"{directory}: processes {missing} of {first['process_count']} have not "
                "finished (no manifest)"
            )
    paths = []
    for manifest in manifests:
        for shard in manifest["shards"]:
            path = directory / shard["file"]
            if not path.is_file():
                raise CorpusError(f"{path}: listed in its manifest but missing")
            paths.append(path)
    return paths


class CorpusOverlapError(CorpusError):
    """Two corpora read together hold the same tasks (same seed, prior and indices)."""


def _corpus_slices(paths: Sequence[str | Path]) -> dict[Path, list[dict[str, Any]]]:
    """For each corpus directory the paths come from and whose manifests list them: the
    listing processes' manifests (seed, prior, index range). Shards no manifest lists
    (e.g. files written by other tools) are left out: nothing is known of their prior."""
    by_dir: dict[Path, set[str]] = {}
    for path in paths:
        by_dir.setdefault(Path(path).parent.resolve(), set()).add(Path(path).name)
    slices: dict[Path, list[dict[str, Any]]] = {}
    for directory, names in by_dir.items():
        if not any(directory.glob("manifest-p*.json")):
            continue
        listing = [
            m for m in read_manifests(directory) if names & {shard["file"] for shard in m["shards"]}
        ]
        if listing:
            slices[directory] = listing
    return slices


def check_disjoint(
    groups: dict[str, Sequence[str | Path]], *, across: Sequence[tuple[str, str]] = ()
) -> None:
    """Refuses task shards that would show a model the same task twice.

    groups: named lists of shard paths (e.g. a training stage's, the validation set's).
    Within a group, a shard path given twice, or two corpus directories with the same
    seed and prior whose index ranges overlap, are refused; between the two groups of
    each pair in ``across`` (e.g. a stage and the validation set) the same holds.

    Raises:
        CorpusOverlapError: naming both corpora, the seed and the shared index range.
    """
    for name, paths in groups.items():
        seen: set[Path] = set()
        for path in paths:
            resolved = Path(path).resolve()
            if resolved in seen:
                raise CorpusOverlapError(f"{name}: shard {path} is listed twice")
            seen.add(resolved)
        _check_slices(_corpus_slices(paths), _corpus_slices(paths), name, name)
    for a, b in across:
        _check_slices(_corpus_slices(groups[a]), _corpus_slices(groups[b]), a, b)


def _check_slices(
    left: dict[Path, list[dict[str, Any]]],
    right: dict[Path, list[dict[str, Any]]],
    left_name: str,
    right_name: str,
) -> None:
    same_group = left_name == right_name
    for dir_a, slices_a in left.items():
        for dir_b, slices_b in right.items():
            if same_group and dir_a == dir_b:
                continue  # one corpus: its processes' ranges are disjoint by construction
            for a in slices_a:
                for b in slices_b:
                    if a["seed"] != b["seed"] or a.get("prior") != b.get("prior"):
                        continue
                    lo = max(a["start"], b["start"])
                    hi = min(a["start"] + a["count"], b["start"] + b["count"])
                    if lo < hi:
                        where = f"{left_name}" if same_group else f"{left_name} and {right_name}"
                        raise CorpusOverlapError(
                            f"{where}: corpora {dir_a} and {dir_b} share tasks {lo}..{hi - 1} "
                            f"of seed {a['seed']} with the same prior; generate one of them "
                            "from another index range (--start)"
                        )
