"""Classification tables: CSV files, DataFrames and scikit-learn's bundled sets.

A `Dataset` holds the features as a DataFrame (numeric columns as float64, text columns as
strings, missing values as NaN), the labels as integer codes 0..K-1 and the original label
values. Codes follow the reference's "from_zero" mapping: sorted unique labels -> 0..K-1,
so code k is also the label token k an in-context-learning model sees.

Reading rules (documented in docs/eval.md):
- `?` is read as a missing value, next to pandas' defaults (`NA`, `nan`, empty, ...);
  UCI tables use it (e.g. ozone_level), and without it a numeric column turns to text.
- A column is numeric when pandas parses it as numbers or booleans (booleans become 0/1);
  any other column is text.
- Infinite values, rows without a label, a single class, an empty table or a missing
  target column are errors that name the file and the column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

ColumnKind = Literal["numeric", "text"]

# Bare names resolve to these loaders when no file of that name exists.
SKLEARN_LOADERS = ("iris", "wine", "breast_cancer", "digits")

# Suffixes a directory given to `resolve_datasets` is scanned for.
CSV_SUFFIXES = (".csv", ".csv.gz")

MISSING_MARKERS = ("?",)


class DatasetError(ValueError):
    """A table that cannot be evaluated; the message names the file and the column."""


@dataclass(frozen=True)
class Dataset:
    """One classification table.

    features: DataFrame[rows, features]; numeric columns float64, text columns str, NaN missing.
    labels: i64[rows], codes 0..K-1 into `classes`.
    classes: [K] original label values, sorted.
    kinds: column name -> "numeric" | "text", in column order.
    source: the file path or `sklearn:<name>` it came from.
    """

    name: str
    features: pd.DataFrame
    labels: np.ndarray
    classes: np.ndarray
    kinds: Mapping[str, ColumnKind]
    source: str

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        n_text = sum(kind == "text" for kind in self.kinds.values())
        n_missing = int(self.features.isna().sum().sum())
        return (
            f"{self.name}: {self.n_rows} rows, {len(self.kinds)} features "
            f"({n_text} text), {self.n_classes} classes, {n_missing} missing values"
        )


def show_value(value: object) -> str:
    """repr of a label value without numpy's wrapper: `0`, not `np.int64(0)`."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def from_frame(
    frame: pd.DataFrame, target: str, *, name: str, source: str | None = None
) -> Dataset:
    """Validates `frame` and splits it into features and label codes."""
    where = source or name
    if target not in frame.columns:
        shown = ", ".join(map(str, frame.columns[:12]))
        more = f", ... ({len(frame.columns)} in all)" if len(frame.columns) > 12 else ""
        raise DatasetError(f"{where}: no target column {target!r} (columns: {shown}{more})")
    if len(frame) == 0:
        raise DatasetError(f"{where}: the table has a header but no rows")
    features = frame.drop(columns=[target])
    if features.shape[1] == 0:
        raise DatasetError(f"{where}: no feature columns besides the target {target!r}")

    label_values = frame[target]
    unlabeled = np.flatnonzero(label_values.isna().to_numpy())
    if len(unlabeled):
        raise DatasetError(
            f"{where}: {len(unlabeled)} rows have no value in target column {target!r} "
            f"(first at data row {unlabeled[0]}); drop or fill them first"
        )
    classes, labels = np.unique(label_values.to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise DatasetError(
            f"{where}: target column {target!r} has a single class ({show_value(classes[0])}); "
            "classification needs at least two"
        )

    features, kinds = _normalise_columns(features, where)
    return Dataset(
        name=name,
        features=features.reset_index(drop=True),
        labels=labels.astype(np.int64),
        classes=classes,
        kinds=kinds,
        source=source or name,
    )


def _normalise_columns(
    features: pd.DataFrame, where: str
) -> tuple[pd.DataFrame, dict[str, ColumnKind]]:
    columns: dict[str, pd.Series] = {}
    kinds: dict[str, ColumnKind] = {}
    for name in features.columns:
        column = features[name]
        key = str(name)
        if key in columns:
            raise DatasetError(f"{where}: duplicate column name {key!r}")
        if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
            values = column.astype(np.float64)
            infinite = np.flatnonzero(np.isinf(values.to_numpy()))
            if len(infinite):
                raise DatasetError(
                    f"{where}: column {key!r} has {len(infinite)} infinite values "
                    f"(first at data row {infinite[0]}); replace them or mark them missing"
                )
            columns[key], kinds[key] = values, "numeric"
        else:
            text = column.astype("str").where(column.notna(), np.nan)
            columns[key], kinds[key] = text, "text"
    return pd.DataFrame(columns, index=features.index), kinds


def read_csv_frame(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV file as pandas reads it with the missing-value markers (optionally
    gzip/zip/bz2/xz compressed, detected from the suffix); a missing, empty or unreadable
    file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        return pd.read_csv(path, na_values=list(MISSING_MARKERS), low_memory=False)
    except pd.errors.EmptyDataError as error:
        raise DatasetError(f"{path}: empty file, not a CSV table") from error
    except (UnicodeDecodeError, pd.errors.ParserError, OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable CSV file ({error})") from error


def load_csv(
    path: str | os.PathLike[str], target: str = "label", name: str | None = None
) -> Dataset:
    """A CSV file as a classification table (`read_csv_frame`, then `from_frame`)."""
    path = Path(path)
    frame = read_csv_frame(path)
    return from_frame(frame, target, name=name or dataset_name(path), source=str(path))


def dataset_name(path: Path) -> str:
    """`dir/abalone.csv.gz` -> `abalone`."""
    name = path.name
    for suffix in (".gz", ".bz2", ".xz", ".zip", ".zst"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".csv")


def load_sklearn(name: str) -> Dataset:
    """One of scikit-learn's bundled classification sets, e.g. `iris`."""
    import sklearn.datasets

    short = name.removeprefix("sklearn:").removeprefix("load_")
    if short not in SKLEARN_LOADERS:
        raise DatasetError(
            f"unknown scikit-learn dataset {name!r}; known: {', '.join(SKLEARN_LOADERS)}"
        )
    bunch = getattr(sklearn.datasets, f"load_{short}")(as_frame=True)
    frame = bunch.frame.rename(columns={"target": "label"})
    return from_frame(frame, "label", name=short, source=f"sklearn:{short}")


def load_dataset(spec: str | os.PathLike[str], target: str = "label") -> Dataset:
    """A file path, or a scikit-learn set by name (`iris`, `sklearn:wine`, `load_digits`)."""
    text = str(spec)
    if Path(text).is_file():
        return load_csv(text, target)
    short = text.removeprefix("sklearn:").removeprefix("load_")
    if text.startswith("sklearn:") or short in SKLEARN_LOADERS:
        return load_sklearn(text)
    raise FileNotFoundError(
        f"{text}: no such file, and not a scikit-learn dataset name ({', '.join(SKLEARN_LOADERS)})"
    )
