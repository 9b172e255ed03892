"""`mllm-jax predict`: classify the rows of a CSV with a model, given a training CSV.

Kept apart from `mllm_jax/cli.py` so the CLI stays light: JAX and the model load only
when the command runs. The output CSV has one row per test row: `proba_<class>` for
every class seen in the training file and `prediction`; when the test file has the
target column, also `label` (its values) and, on stderr, the accuracy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from mllm_jax.foundation.files import atomic_file
from mllm_jax.foundation.tables import DatasetError, load_csv, read_csv_frame
from mllm_jax.infer.classifier import MLLMClassifier

USAGE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
)
"""Bad input (files, columns, labels, options, context length): exit status 2."""


def read_test_csv(path: Path) -> pd.DataFrame:
    """The test table as pandas reads it with the evaluation's missing-value markers."""
    frame = read_csv_frame(path)
    if len(frame) == 0:
        raise DatasetError(f"{path}: the table has a header but no rows")
    for name in frame.columns:  # named by file, as the training file's are (load_csv)
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            infinite = np.flatnonzero(np.isinf(column.to_numpy(dtype=np.float64)))
            if len(infinite):
                raise DatasetError(
                    f"{path}: column {str(name)!r} has {len(infinite)} infinite values "
                    f"(first at data row {infinite[0]}); replace them or mark them missing"
                )
    return frame


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """The frame as a CSV file at `path`, written atomically."""
    with atomic_file(path, newline="") as handle:
        frame.to_csv(handle, index=False)


def check_output(
    out: Path, inputs: dict[str, Path], overwrite: bool, metrics: Path | None = None
) -> None:
    """Refuses an output that is one of the inputs, or an existing file without
    `overwrite`, and a place for `out` or `metrics` that cannot be written (before any
    work is done)."""
    for flag, path in inputs.items():
        if path.exists() and out.exists() and os.path.samefile(out, path):
            raise ValueError(f"--out {out} is the {flag} file; write the predictions elsewhere")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; name a CSV file")
    _check_place("--out", out)
    if metrics is None:
        return
    # --metrics is appended to after the work: told now, and never an input or --out.
    for flag, path in {**inputs, "--out": out}.items():
        same = metrics.exists() and path.exists() and os.path.samefile(metrics, path)
        if same or metrics.absolute() == path.absolute():
            raise ValueError(f"--metrics {metrics} is the {flag} file; name another file")
    if metrics.is_dir():
        raise IsADirectoryError(f"--metrics {metrics} is a directory; name a file")
    _check_place("--metrics", metrics)
    if metrics.exists() and not os.access(metrics, os.W_OK):
        raise PermissionError(f"--metrics {metrics} is not writable")


def _check_place(flag: str, path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory this process may
    write (a parent below a file was a FileExistsError from mkdir after all the work)."""
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == p.parent)
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is not a directory")
    if not _writable(parent):
        raise PermissionError(f"{flag} {path}: directory {parent} is not writable")


def _writable(directory: Path) -> bool:
    """Whether this process may create files in `directory` (False for an immutable
    directory or a read-only filesystem, even as root)."""
    return os.access(directory, os.W_OK | os.X_OK)


def predict_command(
    model: Path,
    train: Path,
    test: Path,
    out: Path,
    target: str = "label",
    metrics: Path | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Fits `MLLMClassifier(model, **options)` on `train` and writes predictions for `test`.

    Returns the summary also printed as one JSON line on stderr (and appended to
    `metrics` when given). `out` may not be `train` or `test`, nor an existing file
    unless `overwrite`.
    """
    check_output(out, {"--train": train, "--test": test}, overwrite, metrics)
    console = Console(stderr=True)
    dataset = load_csv(train, target)
    console.print(dataset.describe())
    frame = read_test_csv(test)
    truth = None
    if target in frame.columns:
        truth = frame[target]
        frame = frame.drop(columns=[target])
    features = dataset.features
    missing = [c for c in features.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in set(features.columns)]
    if missing or extra:
        raise DatasetError(
            f"{test}: columns differ from the training file {train}: missing {missing}, "
            f"unexpected {extra}"
        )
    classes = dataset.classes
    clf = MLLMClassifier(str(model), verbose=True, **options)
    clf.fit(features, classes[dataset.labels])
    details = clf.predict_details(frame[list(features.columns)])
    predictions = clf.classes_[np.argmax(details.proba, axis=1)]

    columns: dict[str, Any] = {
        f"proba_{c}": details.proba[:, j] for j, c in enumerate(clf.classes_.tolist())
    }
    columns["prediction"] = predictions
    summary: dict[str, Any] = {
        "name": "predict",
        "model": str(model),
        "train": str(train),
        "test": str(test),
        "rows": len(frame),
        "classes": len(classes),
        "mode": clf.mode,
        "seconds": round(details.seconds, 3),
        "rows_per_second": round(len(frame) / details.seconds, 3) if details.seconds else None,
        "prompt_tokens": details.prompt_tokens,
    }
    if truth is not None:
        columns["label"] = truth.to_numpy()
        known = truth.isin(list(clf.classes_)).to_numpy()
        unseen = sorted({str(v) for v in truth[~known & truth.notna().to_numpy()]})
        if unseen:
            console.print(
                f"[yellow]warning: {test} holds labels never seen in {train}: {unseen}; "
                f"they can never be predicted ({int((~known).sum())} rows count as errors)",
                soft_wrap=True,
            )
        summary["accuracy"] = float(np.mean(predictions.astype(object) == truth.to_numpy()))
        summary["unseen_label_rows"] = int((~known).sum())
    if clf.mode == "generate":
        flat = [s for member in details.sources for s in member]
        summary["sources"] = {s: flat.count(s) for s in sorted(set(flat))}
    write_csv_atomic(pd.DataFrame(columns), out)
    line = json.dumps(summary)
    sys.stderr.write(line + "\n")
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        with metrics.open("a") as handle:
            handle.write(line + "\n")
    return summary
