"""The compact number encoding: z-score with the shown rows' statistics, mapped to integers.

Per column, the mean and standard deviation come from the training rows shown in one
prompt (NaNs excluded, ``ddof=1``). Every value (training and query rows alike) becomes::

    z = clip((x - mean) / std, -1000, 1000)
    value = int(max(z * 120 + 500, 0))            # truncation, like numpy's astype(int)

so [-4.17, 4.17] standard deviations land on 0..999. The reference has no upper clip
(``clip_max=None``, values above 4.17 sigma print as 1000 or more); the paper describes
0..999 (``clip_max=999``). We default to the reference, because the released
MachineLearningLM model was trained and evaluated without the upper clip.

The operations and their order copy the reference's ``normalize_feature_arrays`` (float64
throughout, NaN std -> 1, std floored at 1e-6, NaN mean -> 0, NaNs -> column mean), so
results agree with it bit for bit, not merely within a tolerance.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

SCALE = 120.0
OFFSET = 500.0
Z_LIMIT = 1000.0
STD_FLOOR = 1e-6
PAPER_CLIP_MAX = 999
"""The paper's upper clip: pass ``clip_max=PAPER_CLIP_MAX`` for values in 0..999."""


def column_statistics(train: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per column, as the reference computes them.

    Args:
        train: f64[..., rows, features] training values; NaN marks a missing value.
        axis: the rows axis.

    Returns:
        (mean, std), each f64[..., features]: NaN means (all-missing columns) become 0,
        NaN stds (fewer than two values) become 1, and stds are floored at 1e-6.
    """
    train = np.asarray(train, dtype=np.float64)
    with warnings.catch_warnings():
        # All-NaN columns and single-row splits warn; their NaN results are replaced below.
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(train, axis=axis)
        std = np.nanstd(train, axis=axis, ddof=1)
    std = np.where(np.isnan(std), 1.0, std)
    std = np.clip(std, STD_FLOOR, None)
    mean = np.where(np.isnan(mean), 0.0, mean)
    return mean, std


def apply_encoding(
    values: np.ndarray, mean: np.ndarray, std: np.ndarray, clip_max: int | None = None
) -> np.ndarray:
    """Maps raw values to the encoded integers with given column statistics.

    Args:
        values: f64[..., rows, features]; NaN becomes the column mean (value 500).
        mean: f64[..., features] from :func:`column_statistics`.
        std: f64[..., features] from :func:`column_statistics`.
        clip_max: upper clip (999 in the paper); None keeps the reference's unbounded top.

    Returns:
        i64[..., rows, features], all >= 0 (and <= clip_max when given).
    """
    values = np.asarray(values, dtype=np.float64)
    mean = np.expand_dims(mean, -2)
    std = np.expand_dims(std, -2)
    filled = np.where(np.isnan(values), mean, values)
    z = np.clip((filled - mean) / std, -Z_LIMIT, Z_LIMIT)
    ints = np.clip((z * SCALE) + OFFSET, 0, None).astype(np.int64)
    if clip_max is not None:
        np.minimum(ints, clip_max, out=ints)
    return ints


def check_finite(values: np.ndarray, what: str) -> None:
    """Raises ValueError naming the first column holding +-inf (NaN is allowed)."""
    values = np.asarray(values, dtype=np.float64)
    bad = np.isinf(values)
    if bad.any():
        column = int(np.argwhere(bad)[0][-1])
        raise ValueError(f"{what}: column {column} holds an infinite value; use NaN for missing")


def encode_numeric(
    train: np.ndarray, test: np.ndarray, clip_max: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a numeric table with the statistics of its training rows.

    Args:
        train: f[n_train, features] training rows (the shots shown), NaN = missing.
        test: f[n_test, features] query rows.
        clip_max: upper clip; None (default) is the reference, 999 the paper.

    Returns:
        (train_ints, test_ints): i64[n_train, features], i64[n_test, features].
    """
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train and test must be [rows, features] with equal features, got "
            f"{train.shape} and {test.shape}"
        )
    if train.shape[0] == 0:
        raise ValueError("the training split is empty: statistics need at least one row")
    check_finite(train, "training rows")
    check_finite(test, "test rows")
    mean, std = column_statistics(train)
    return apply_encoding(train, mean, std, clip_max), apply_encoding(test, mean, std, clip_max)


def encode_padded(X: np.ndarray, is_train: np.ndarray, clip_max: int | None = None) -> np.ndarray:
    """Encodes a padded batch of tasks at once, statistics from each task's train rows.

    Equal, value for value, to :func:`encode_numeric` on each task separately (the same
    numpy reductions run along the rows axis).

    Args:
        X: f[tasks, rows, features] values; padding rows/columns may hold anything finite.
        is_train: bool[tasks, rows], True on the rows whose statistics are used.
        clip_max: upper clip, as in :func:`encode_numeric`.

    Returns:
        i64[tasks, rows, features]; entries of padding rows are meaningless.
    """
    X = np.asarray(X, dtype=np.float64)
    is_train = np.asarray(is_train, dtype=bool)
    if X.ndim != 3 or is_train.shape != X.shape[:2]:
        raise ValueError(
            f"X must be [tasks, rows, features] and is_train [tasks, rows], got "
            f"{X.shape} and {is_train.shape}"
        )
    if not is_train.any(axis=1).all():
        empty = int(np.argmin(is_train.any(axis=1)))
        raise ValueError(f"task {empty} of the batch has no training rows")
    shown = np.where(is_train[..., None], X, np.nan)
    mean, std = column_statistics(shown, axis=1)
    return apply_encoding(X, mean, std, clip_max)


def encode_task_batch(batch: Any, clip_max: int | None = None) -> np.ndarray:
    """Encodes every task of a prior ``TaskBatch`` with its own train split's statistics.

    Args:
        batch: a ``mllm_jax.prior.TaskBatch`` (anything with ``X`` f32[count, rows,
            features], ``n_train`` i32[count] and optionally ``valid`` bool[count]).
        clip_max: upper clip, as in :func:`encode_numeric`.

    Returns:
        i64[count, rows, features]; rows < n_train of a task are its train split. Padding
        columns and invalid tasks hold meaningless values.
    """
    X = np.asarray(batch.X)
    n_train = np.asarray(batch.n_train)
    valid = np.asarray(getattr(batch, "valid", np.ones(len(n_train), dtype=bool)), dtype=bool)
    is_train = np.arange(X.shape[1])[None, :] < n_train[:, None]
    is_train[~valid] = True  # an invalid task's zeros still get (unused) statistics
    return encode_padded(X, is_train, clip_max)
