"""Input checks of the classifier: tables, labels, columns between fit and predict.

Every error names the problem (which table, column, row or value). Nothing is dropped
silently: the one documented repair, dropping a column that is missing in every shot,
warns with the column names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd


class EmptyColumnWarning(UserWarning):
    """Columns missing in every shot were left out of the prompt."""


def as_frame(X: object, what: str) -> pd.DataFrame:
    """A DataFrame view of a 2-D table (numpy, pandas, lists); raises on other shapes."""
    if isinstance(X, pd.DataFrame):
        frame = X
    else:
        if isinstance(X, pd.Series):
            raise ValueError(f"{what} must be 2-D [rows, features]; got a Series (use .to_frame())")
        if _is_sparse(X):
            raise TypeError(
                f"{what} is a sparse matrix; the prompt writes every value, so pass a dense "
                "array (X.toarray()) or a DataFrame"
            )
        array = np.asarray(X, dtype=object if _has_text(X) else None)
        if np.iscomplexobj(array):
            raise ValueError(
                f"{what} holds complex numbers (Complex data not supported); only real values "
                "can be encoded"
            )
        if array.ndim != 2:
            raise ValueError(
                f"{what} must be 2-D [rows, features], got shape {array.shape}. Reshape your "
                "data either using array.reshape(-1, 1) if it has a single feature or "
                "array.reshape(1, -1) if it is a single row"
            )
        frame = pd.DataFrame(array)
    complex_columns = [c for c in frame.columns if pd.api.types.is_complex_dtype(frame[c])]
    if complex_columns:
        raise ValueError(
            f"{what} column {complex_columns[0]!r} holds complex numbers (Complex data not "
            "supported); only real values can be encoded"
        )
    # scikit-learn's wording, which its estimator checks look for
    if frame.shape[0] == 0:
        raise ValueError(
            f"{what} is empty: found array with 0 sample(s) (shape={frame.shape}) while a "
            "minimum of 1 is required."
        )
    if frame.shape[1] == 0:
        raise ValueError(
            f"{what} has no feature columns: found array with 0 feature(s) "
            f"(shape={frame.shape}) while a minimum of 1 is required."
        )
    if frame.columns.duplicated().any():
        dup = frame.columns[frame.columns.duplicated()][0]
        raise ValueError(f"{what} has a duplicate column name {dup!r}")
    return frame.reset_index(drop=True)


def _is_sparse(X: object) -> bool:
    import scipy.sparse

    return scipy.sparse.issparse(X)


def _has_text(X: object) -> bool:
    try:
        return np.asarray(X).dtype.kind in "OUS"
    except (ValueError, TypeError):
        return True


def numeric_values(column: pd.Series) -> np.ndarray:
    """f64[rows]: the numbers of a column as the prompt encoding reads them (NaN where a
    value is missing or not a number)."""
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def check_finite(frame: pd.DataFrame, what: str) -> None:
    """Raises ValueError naming the first column and row holding +-inf."""
    for name in frame.columns:
        values = numeric_values(frame[name])
        bad = np.flatnonzero(np.isinf(values))
        if len(bad):
            raise ValueError(
                f"{what}: column {name!r} holds an infinite value ({values[bad[0]]} at row "
                f"{bad[0]}); replace it or mark it missing (NaN)"
            )


def check_numbers_stay_numbers(test: pd.DataFrame, shots: pd.DataFrame, what: str) -> None:
    """Raises ValueError naming the column, row and value where a column the shots hold
    as numbers has a test value that is not one (the prompt would encode it as missing)."""
    for name in test.columns:
        if name not in shots.columns or not pd.api.types.is_numeric_dtype(shots[name]):
            continue
        column = test[name]
        if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            continue
        numbers = pd.to_numeric(column, errors="coerce")
        bad = np.flatnonzero(numbers.isna().to_numpy() & column.notna().to_numpy())
        if len(bad):
            raise ValueError(
                f"{what}: column {name!r} holds numbers in the shots but {column.iloc[bad[0]]!r} "
                f"at row {bad[0]}; mark a missing value as NaN"
            )


def empty_columns(frame: pd.DataFrame) -> list:
    """Columns without a single value (every row missing)."""
    return [name for name in frame.columns if frame[name].isna().all()]


def drop_empty_columns(frame: pd.DataFrame, policy: str, what: str) -> list:
    """The columns to keep: all but those missing in every row of `frame`.

    policy "drop" leaves them out with an `EmptyColumnWarning`; "error" raises.
    """
    if policy not in ("drop", "error"):
        raise ValueError(f"empty_columns must be 'drop' or 'error', got {policy!r}")
    empty = empty_columns(frame)
    if empty and policy == "error":
        raise ValueError(
            f"{what}: columns {empty} are missing in every shot, so the prompt cannot encode "
            "them; drop them, or pass empty_columns='drop'"
        )
    keep = [name for name in frame.columns if name not in set(empty)]
    if not keep:
        raise ValueError(f"{what}: every column is missing in every shot; nothing to learn from")
    if empty:
        warnings.warn(
            f"{what}: columns {empty} are missing in every shot and are left out of the prompt",
            EmptyColumnWarning,
            stacklevel=3,
        )
    return keep


def check_labels(y: object, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes [K] sorted, codes i64[rows] into them); raises on missing labels or a
    length mismatch. Any number of classes: codes of 10 and above are printed as
    integers, several tokens each (`mllm_jax.infer.labels`)."""
    if y is None:
        raise ValueError(
            "the classifier requires y to be passed, but the target y is None: pass the "
            "shots' labels"
        )
    if isinstance(y, pd.DataFrame) and y.shape[1] == 1:
        y = y.iloc[:, 0]
    labels = np.asarray(y.to_numpy() if isinstance(y, pd.Series | pd.Index) else y)
    if labels.ndim == 2 and labels.shape[1] == 1:
        from sklearn.exceptions import DataConversionWarning

        warnings.warn(
            "A column-vector y was passed when a 1d array was expected; y of shape "
            f"{labels.shape} is read as ({labels.shape[0]},), as ravel() would",
            DataConversionWarning,
            stacklevel=3,
        )
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"y must be 1-D [rows], got shape {labels.shape}")
    if len(labels) != n_rows:
        raise ValueError(f"y has {len(labels)} labels but X has {n_rows} rows")
    missing = np.flatnonzero(pd.isna(labels))
    if len(missing):
        raise ValueError(
            f"y has {len(missing)} missing labels (first at row {missing[0]}); drop those rows"
        )
    if labels.dtype.kind in "fc" or (labels.dtype == object and _all_numbers(labels)):
        numbers = labels.astype(np.complex128 if labels.dtype.kind == "c" else np.float64)
        if np.iscomplexobj(numbers):
            raise ValueError("y holds complex numbers; class labels must be real")
        bad = np.flatnonzero(~np.isfinite(numbers))
        if len(bad):
            raise ValueError(f"y holds an infinite label ({numbers[bad[0]]} at row {bad[0]})")
        from sklearn.utils.multiclass import type_of_target

        if type_of_target(numbers) == "continuous":
            raise ValueError(
                "y is continuous (non-integer numbers, e.g. "
                f"{numbers[numbers != np.round(numbers)][0]}): a regression target; "
                "this is a classifier, so pass class labels"
            )
    try:
        classes, codes = np.unique(labels, return_inverse=True)
    except TypeError as error:
        raise ValueError(f"y mixes label types that cannot be ordered ({error})") from None
    return classes, codes.astype(np.int64)


def _all_numbers(labels: np.ndarray) -> bool:
    return all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in labels)


def align_columns(frame: pd.DataFrame, fitted: Sequence, by_name: bool, what: str) -> pd.DataFrame:
    """The test table's columns in the fitted order; raises on missing or extra columns.

    by_name: match DataFrame column names (a different order is reordered); otherwise
    match positions (the column count must agree).
    """
    fitted = list(fitted)
    if by_name:
        columns = list(frame.columns)
        missing = [c for c in fitted if c not in set(columns)]
        extra = [c for c in columns if c not in set(fitted)]
        if missing or extra:
            raise ValueError(
                f"{what} columns differ from those seen in fit: missing {missing}, "
                f"unexpected {extra}"
            )
        return frame[fitted]
    if frame.shape[1] != len(fitted):
        raise ValueError(
            f"{what} has {frame.shape[1]} features, but MLLMClassifier is expecting "
            f"{len(fitted)} features as input (those seen in fit)"
        )
    frame = frame.copy()
    frame.columns = fitted
    return frame
