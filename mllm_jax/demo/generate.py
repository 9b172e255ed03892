"""The demo's generate stage: each corpus of the demo config is one `mllm-jax generate` run.

Corpus `<name>` (an index range of the prior) is written by `mllm_jax.data.generate.generate`
into `<out>/data/<name>/`, the corpus `mllm-jax generate --filter` writes for the same
settings: task shards `tasks-p00000-*.array_record` (the accepted tasks, in index order)
and `manifest-p00000.json` (tasks written, invalid, rejected by reason, the filter report,
the prior and filter settings with their sha256). A corpus is finished exactly when its
manifest exists; an interrupted one resumes after its last complete shard on the next run
(generate's journal). Read a corpus back with `mllm_jax.data.shards.list_corpus_shards` or
`mllm_jax.eval.datasets.load_corpus_tables`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mllm_jax.data.generate import GenerateConfig as CorpusRunConfig
from mllm_jax.data.generate import GenerateError, generate
from mllm_jax.data.shards import (
    list_corpus_shards,
    manifest_name,
    read_manifests,
    remove_process_files,
)
from mllm_jax.demo.config import CorpusConfig, GenerateConfig

# The demo generates each corpus in one process: its slot among the processes sharing it.
PROCESS = 0


class EmptyCorpusError(GenerateError):
    """The filter accepted none of a corpus's tasks: training on it would have no data."""


def corpus_dir(out: Path, name: str) -> Path:
    """Where the demo run in `out` keeps corpus `name`."""
    return Path(out) / "data" / name


def corpus_settings(corpus: CorpusConfig, config: GenerateConfig) -> CorpusRunConfig:
    """The `generate` run that writes `corpus`: the demo's prior and filter, the corpus's
    index range, and consensus row masks where the corpus asks for them (warm-up)."""
    return CorpusRunConfig(
        seed=config.seed,
        start=corpus.start,
        count=corpus.count,
        prior=config.prior,
        filter=dataclasses.replace(config.filter, consensus=corpus.consensus),
        shard_size=config.tasks_per_shard,
        batch_size=config.batch_size,
        process_index=PROCESS,
        process_count=1,
        workers=config.workers,
    )


def finished_corpus(out: Path, name: str) -> dict[str, Any] | None:
    """The manifest of corpus `name` if an earlier run finished it, else None.

    Raises:
        CorpusError: the manifest is there but unreadable, or a shard it lists is gone.
    """
    directory = corpus_dir(out, name)
    if not (directory / manifest_name(PROCESS)).is_file():
        return None
    list_corpus_shards(directory)  # every shard the manifest lists is on disk
    return read_manifests(directory)[0]


def generate_corpus(
    out: Path,
    corpus: CorpusConfig,
    config: GenerateConfig,
    *,
    progress: bool = True,
    batches: Callable[..., Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Generates corpus `corpus` into `<out>/data/<corpus.name>/`; returns its manifest.

    An interrupted earlier run of it is resumed (or, its files unusable, started over) by
    `generate`. `batches` replaces the prior as in `generate` (tests).

    Raises:
        EmptyCorpusError: the filter accepted none of the corpus's tasks (the manifest is
            removed again, so the corpus does not look finished).
        GenerateError: bad settings, or a filter error rate above generate's limit.
    """
    directory = corpus_dir(out, corpus.name)
    manifest = generate(
        corpus_settings(corpus, config), directory, progress=progress, batches=batches
    )
    if manifest["tasks_written"] == 0:
        # A manifest marks a finished corpus: a rerun would skip this one and train on
        # nothing. The same settings draw the same tasks, so the rerun fails here again.
        remove_process_files(directory, PROCESS)
        raise EmptyCorpusError(
            f"corpus {corpus.name!r}: the filter accepted none of its {corpus.count} tasks "
            f"({manifest['invalid']} invalid, rejected by reason: "
            f"{manifest['rejected_by_reason']}); draw more tasks (its count) or relax "
            "generate.filter"
        )
    return manifest


def acceptance_line(manifest: dict[str, Any]) -> str:
    """'kept 24/64 tasks (38%)' plus the tasks whose prior attempts all failed, if any."""
    kept, drawn = manifest["tasks_written"], manifest["count"]
    invalid = f", {manifest['invalid']} invalid" if manifest["invalid"] else ""
    return f"kept {kept}/{drawn} tasks ({kept / drawn:.0%}){invalid}"
