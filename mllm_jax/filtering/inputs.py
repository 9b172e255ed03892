"""Checks that turn a bad task into a rejection with a reason instead of an exception."""

from __future__ import annotations

import numpy as np

from mllm_jax.filtering.result import Problem, Reason


def _nonfinite(X: np.ndarray, name: str) -> Problem | None:
    bad = ~np.isfinite(X)
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return Problem(
        Reason.NONFINITE_FEATURES,
        f"{name} has {int(bad.sum())} non-finite values (first {X[row, col]} at row {row}, "
        f"column {col})",
    )


def _shape_problem(X: np.ndarray, y: np.ndarray, name: str) -> Problem | None:
    if X.ndim != 2:
        return Problem(Reason.MALFORMED, f"X_{name} must be 2-D, got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        return Problem(
            Reason.MALFORMED, f"y_{name} has shape {y.shape}, X_{name} has {X.shape[0]} rows"
        )
    if not np.issubdtype(y.dtype, np.integer):
        return Problem(Reason.MALFORMED, f"y_{name} must hold integer labels, got {y.dtype}")
    return None


def check_split_inputs(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray
) -> Problem | None:
    """The first reason the train/test split cannot be judged, or None."""
    for name, X, y in (("train", X_train, y_train), ("test", X_test, y_test)):
        problem = _shape_problem(X, y, name)
        if problem is not None:
            return problem
    if X_train.shape[1] != X_test.shape[1]:
        return Problem(
            Reason.MALFORMED,
            f"X_train has {X_train.shape[1]} features, X_test has {X_test.shape[1]}",
        )
    if X_train.shape[1] == 0:
        return Problem(Reason.MALFORMED, "the task has no feature columns")
    for name, X, y in (("train", X_train, y_train), ("test", X_test, y_test)):
        if y.size < 2:
            return Problem(Reason.TOO_FEW_ROWS, f"{name} split has {y.size} rows, needs >= 2")
        problem = _nonfinite(X, f"X_{name}")
        if problem is not None:
            return problem
        classes = np.unique(y)
        if classes.size < 2:
            return Problem(Reason.SINGLE_CLASS, f"{name} split has one class (label {classes[0]})")
    return None


def check_consensus_inputs(X: np.ndarray, y: np.ndarray, n_folds: int) -> Problem | None:
    """The first reason the out-of-fold consensus cannot run on all rows, or None."""
    problem = _shape_problem(X, y, "all")
    if problem is not None:
        return problem
    if y.size < n_folds:
        return Problem(
            Reason.TOO_FEW_ROWS, f"task has {y.size} rows, fewer than {n_folds} consensus folds"
        )
    return _nonfinite(X, "X")
