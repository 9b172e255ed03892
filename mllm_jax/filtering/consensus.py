"""Sample-level filter: out-of-fold forest predictions, kept rows = predicted correctly."""

from __future__ import annotations

import warnings

import numpy as np

from mllm_jax.filtering.config import FilterConfig
from mllm_jax.filtering.forest import make_forest, sub_seed, unchecked_sklearn
from mllm_jax.filtering.inputs import check_consensus_inputs


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id of every row, each class spread evenly over the folds.

    Rows are shuffled, grouped by class (stable), then dealt round-robin; fold sizes differ
    by at most one and every class is split as evenly as its size allows. Written out
    instead of ``StratifiedKFold`` because that one warns on (and for tiny tasks refuses)
    classes with fewer rows than folds, which synthetic tasks have all the time.

    Args:
        y: int[rows] labels.
        n_folds: number of folds, <= rows.
        seed: shuffling seed.

    Returns:
        i64[rows] fold ids in [0, n_folds).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(y.size)
    order = order[np.argsort(y[order], kind="stable")]
    folds = np.empty(y.size, dtype=np.int64)
    folds[order] = np.arange(y.size) % n_folds
    return folds


def out_of_fold_predictions(
    X: np.ndarray, y: np.ndarray, config: FilterConfig, seed: int
) -> np.ndarray:
    """Each row predicted by a forest that did not see it.

    Args:
        X: f32[rows, features], finite.
        y: int[rows] labels.

    Returns:
        int[rows] predictions, same dtype as ``y``.
    """
    folds = stratified_folds(y, config.consensus_folds, sub_seed(seed, 0))
    predictions = np.empty_like(y)
    for fold in range(config.consensus_folds):
        held_out = folds == fold
        forest = make_forest(config, X.shape[1], sub_seed(seed, 1 + fold))
        forest.fit(X[~held_out], y[~held_out])
        predictions[held_out] = forest.predict(X[held_out])
    return predictions


def out_of_bag_mask(X: np.ndarray, y: np.ndarray, config: FilterConfig, seed: int) -> np.ndarray:
    """Rows predicted correctly by the trees whose bootstrap sample left them out.

    One forest on all rows instead of one per fold. A row that every bootstrap sample
    drew (probability ~0.63**n_estimators) has no prediction and is not kept.

    Args:
        X: f32[rows, features], finite.
        y: int[rows] labels.

    Returns:
        bool[rows].
    """
    forest = make_forest(config, X.shape[1], seed).set_params(oob_score=True)
    with warnings.catch_warnings():  # scikit-learn warns about rows without OOB trees
        warnings.simplefilter("ignore", UserWarning)
        forest.fit(X, y)
    votes = forest.oob_decision_function_  # f64[rows, classes], NaN where uncovered
    covered = ~np.isnan(votes).any(axis=1)
    predictions = forest.classes_[np.argmax(np.nan_to_num(votes, nan=-1.0), axis=1)]
    return covered & (predictions == y)


def consensus_rows(X: np.ndarray, y: np.ndarray, config: FilterConfig, seed: int) -> np.ndarray:
    """The row mask by ``config.consensus_method``, on inputs already checked."""
    with unchecked_sklearn():
        if config.consensus_method == "oob":
            return out_of_bag_mask(X, y, config, seed)
        return out_of_fold_predictions(X, y, config, seed) == y


def consensus_mask(
    X: np.ndarray, y: np.ndarray, config: FilterConfig | None = None, *, seed: int = 0
) -> np.ndarray:
    """Rows whose out-of-fold (or out-of-bag) forest prediction equals their label.

    Args:
        X: f32[rows, features] every row of the task (train and test splits together).
        y: int[rows] labels.
        config: forest shape and ``consensus_folds``; defaults to ``FilterConfig()``.
        seed: folds and forests are a function of it (same seed, same mask).

    Returns:
        bool[rows], True where the row is kept.

    Raises:
        ValueError: non-finite features, mismatched shapes or fewer rows than folds.
    """
    config = config or FilterConfig()
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
    problem = check_consensus_inputs(X, y, config.consensus_folds)
    if problem is not None:
        raise ValueError(problem.message)
    return consensus_rows(X, y, config, seed)
