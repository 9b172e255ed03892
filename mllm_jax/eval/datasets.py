"""The tables an evaluation runs on: CSV files, directories of them, scikit-learn's
bundled sets (`mllm_jax.foundation.tables`) and held-out task corpora.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mllm_jax.data.shards import CorpusError, list_corpus_shards
from mllm_jax.foundation.tables import (
    CSV_SUFFIXES,
    Dataset,
    DatasetError,
    from_frame,
    load_dataset,
)
from mllm_jax.foundation.tasks import Task, decode_task


def is_corpus(path: Path) -> bool:
    """True for a task corpus directory (`mllm-jax generate --out`): it has manifests."""
    return path.is_dir() and any(path.glob("manifest-p*.json"))


def task_table(task: Task) -> Dataset:
    """A synthetic task as an evaluation table: features `x0..`, all of its rows.

    Categorical columns hold integer category codes and stay numeric, as the prompt
    encoding treats them. The harness makes its own test split, as for a real table.
    """
    frame = pd.DataFrame(
        np.asarray(task.X, np.float64), columns=[f"x{j}" for j in range(task.n_features)]
    )
    frame["label"] = np.asarray(task.y)
    return from_frame(
        frame,
        "label",
        name=f"synthetic_{task.seed}_{task.index}",
        source=f"prior seed {task.seed}, task {task.index}",
    )


def load_corpus_tables(
    directory: str | os.PathLike[str], limit: int | None = None
) -> list[Dataset]:
    """The first `limit` tasks (all when None) of a task corpus, in index order, as tables."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        shards = list_corpus_shards(Path(directory))
    except CorpusError as err:
        raise DatasetError(str(err)) from err
    tables: list[Dataset] = []
    for shard in shards:
        reader = ArrayRecordReader(str(shard))
        try:
            for record in reader.read_all():
                if limit is not None and len(tables) >= limit:
                    return tables
                tables.append(task_table(decode_task(record)))
        finally:
            reader.close()
    return tables


def expand_specs(specs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Replaces each directory by the CSV files in it (sorted); keeps other specs (files,
    names, task corpus directories) as given."""
    expanded: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and not is_corpus(path):
            found = sorted(
                str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(CSV_SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(
                    f"{path}: directory holds no {' or '.join(CSV_SUFFIXES)} files"
                )
            expanded.extend(found)
        else:
            expanded.append(str(spec))
    return expanded


def resolve_datasets(
    specs: Sequence[str | os.PathLike[str]],
    target: str = "label",
    max_corpus_tables: int | None = None,
) -> list[Dataset]:
    """Loads every spec (files, directories of CSVs, scikit-learn names, task corpus
    directories: the first `max_corpus_tables` tasks of each); names must be unique."""
    datasets: list[Dataset] = []
    for spec in expand_specs(specs):
        if is_corpus(Path(spec)):
            datasets.extend(load_corpus_tables(spec, max_corpus_tables))
        else:
            datasets.append(load_dataset(spec, target))
    seen: dict[str, str] = {}
    for dataset in datasets:
        if dataset.name in seen:
            raise DatasetError(
                f"two datasets are named {dataset.name!r}: {seen[dataset.name]} and "
                f"{dataset.source}; results are keyed by name, so rename one file"
            )
        seen[dataset.name] = dataset.source
    return datasets
