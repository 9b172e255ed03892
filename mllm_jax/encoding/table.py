"""Raw tables (numeric and text columns) -> the cells printed in one prompt.

A column is numeric when at least one of its training values parses as a number
(``pd.to_numeric(errors="coerce")``, as the reference decides); its values go through the
number encoding and anything unparsable becomes missing (-> the column mean). Every other
column is text and prints as it is, a missing value as ``nan`` (what the reference's CSV
round trip prints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mllm_jax.encoding.numbers import check_finite, encode_numeric


@dataclass(frozen=True)
class EncodedFeatures:
    """The feature cells of one prompt after the number encoding.

    Attributes:
        train: i64[n_train, features] encoded numbers (0 in text columns).
        test: i64[n_test, features] encoded numbers (0 in text columns).
        names: feature names, used by the "tabllm" style and feature descriptions.
        text_train: object[n_train, features] of str, the printed cells, or None when
            every cell is an encoded number printed plainly (the fast token path).
        text_test: object[n_test, features] of str, or None like ``text_train``.
    """

    train: np.ndarray
    test: np.ndarray
    names: tuple[str, ...]
    text_train: np.ndarray | None = None
    text_test: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.train.shape[1])

    @property
    def all_numbers(self) -> bool:
        """True when every cell prints as a plain integer (no text, no float suffix)."""
        return self.text_train is None

    def cells(self, split: str) -> np.ndarray:
        """object[rows, features] of printed cell strings for "train" or "test"."""
        text = self.text_train if split == "train" else self.text_test
        if text is not None:
            return text
        ints = self.train if split == "train" else self.test
        return ints.astype(str).astype(object)


def numeric_features(
    train: np.ndarray,
    test: np.ndarray,
    *,
    clip_max: int | None = None,
    names: Sequence[str] | None = None,
) -> EncodedFeatures:
    """Encodes an all-numeric table (e.g. a synthetic task) into prompt cells.

    Args:
        train: f[n_train, features], NaN = missing.
        test: f[n_test, features].
        clip_max: upper clip of the encoded integers (None = reference, 999 = paper).
        names: feature names; default "f0", "f1", ...
    """
    train_ints, test_ints = encode_numeric(train, test, clip_max)
    n_features = train_ints.shape[1]
    names = tuple(names) if names is not None else tuple(f"f{j}" for j in range(n_features))
    return EncodedFeatures(train_ints, test_ints, names)


def _as_frame(X: object, what: str) -> pd.DataFrame:
    if isinstance(X, pd.DataFrame):
        return X.reset_index(drop=True)
    array = np.asarray(X)
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D [rows, features], got shape {array.shape}")
    return pd.DataFrame(array)


def _printed(value: object) -> str:
    # A missing text value prints as "nan": the reference writes the table to CSV and
    # reads it back, which turns every kind of missing value into a float NaN.
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "nan"
    return str(value)


def _coerce(column: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _pandas2_float_cells(frame: pd.DataFrame) -> np.ndarray:
    """bool[features]: columns whose encoded values the reference prints as "512.0".

    Under pandas >= 2 the reference's ``X.loc[:, numeric_cols] = ints`` keeps each
    column's dtype (bool columns upcast to int), then ``X.values`` takes one dtype for the
    whole frame: float64 when every column is numeric and one is float (so every cell
    prints as a float), object otherwise (so only float columns print as floats).
    """
    is_float = np.array([pd.api.types.is_float_dtype(t) for t in frame.dtypes], dtype=bool)
    is_number = np.array(
        [pd.api.types.is_bool_dtype(t) or pd.api.types.is_numeric_dtype(t) for t in frame.dtypes],
        dtype=bool,
    )
    if is_number.all():
        return np.full(len(is_float), is_float.any())
    return is_float


def encode_table(
    X_train: object,
    X_test: object,
    *,
    clip_max: int | None = None,
    feature_names: Sequence[str] | None = None,
    pandas2_floats: bool = False,
) -> EncodedFeatures:
    """Applies the reference normalisation to raw train/test tables.

    Args:
        X_train: [n_train, features] DataFrame or array (numbers, strings, NaN, bools).
        X_test: [n_test, features] with the same columns.
        clip_max: upper clip of the encoded integers (None = reference, 999 = paper).
        feature_names: names; default the DataFrame's column names, else "f0", ...
        pandas2_floats: print encoded values of float-typed columns as "512.0", as the
            reference's code does when run with pandas >= 2 (its ``.loc`` assignment keeps
            the float dtype). Off: plain integers, what the reference intends, prints
            under pandas 1.x and trained on (its synthetic tables are integer CSVs).

    Returns:
        The encoded cells. Raises ValueError on shape mismatches, empty splits and
        infinite values, naming the column.
    """
    train = _as_frame(X_train, "X_train")
    test = _as_frame(X_test, "X_test")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"X_train has {train.shape[1]} features but X_test has {test.shape[1]}")
    if train.shape[1] == 0:
        raise ValueError("the table has no feature columns")
    if len(train) == 0:
        raise ValueError("X_train is empty: the prompt needs at least one training row")
    if len(test) == 0:
        raise ValueError("X_test is empty: the prompt needs at least one query row")
    names = (
        tuple(str(n) for n in feature_names)
        if feature_names is not None
        else tuple(str(c) for c in train.columns)
    )
    if len(names) != train.shape[1]:
        raise ValueError(f"{len(names)} feature names for {train.shape[1]} features")

    n_features = train.shape[1]
    train_values = np.empty((len(train), n_features), dtype=np.float64)
    test_values = np.empty((len(test), n_features), dtype=np.float64)
    numeric = np.zeros(n_features, dtype=bool)
    for j in range(n_features):
        train_values[:, j] = _coerce(train.iloc[:, j])
        test_values[:, j] = _coerce(test.iloc[:, j])
        numeric[j] = bool((~np.isnan(train_values[:, j])).any())
        for values, split in ((train_values, "X_train"), (test_values, "X_test")):
            if numeric[j]:
                check_finite(values[:, j : j + 1], f"{split} column {names[j]!r}")

    train_ints = np.zeros(train_values.shape, dtype=np.int64)
    test_ints = np.zeros(test_values.shape, dtype=np.int64)
    if numeric.any():
        train_ints[:, numeric], test_ints[:, numeric] = encode_numeric(
            train_values[:, numeric], test_values[:, numeric], clip_max
        )

    suffixed = {
        "train": _pandas2_float_cells(train) & numeric if pandas2_floats else None,
        "test": _pandas2_float_cells(test) & numeric if pandas2_floats else None,
    }
    if numeric.all() and not any(m is not None and m.any() for m in suffixed.values()):
        return EncodedFeatures(train_ints, test_ints, names)

    def text_cells(frame: pd.DataFrame, ints: np.ndarray, split: str) -> np.ndarray:
        cells = np.empty(ints.shape, dtype=object)
        for j in range(n_features):
            if numeric[j]:
                mask = suffixed[split]
                suffix = ".0" if mask is not None and mask[j] else ""
                cells[:, j] = [f"{v}{suffix}" for v in ints[:, j].tolist()]
            else:
                cells[:, j] = [_printed(v) for v in frame.iloc[:, j].tolist()]
        return cells

    return EncodedFeatures(
        train_ints,
        test_ints,
        names,
        text_cells(train, train_ints, "train"),
        text_cells(test, test_ints, "test"),
    )
