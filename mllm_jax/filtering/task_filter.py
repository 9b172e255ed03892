"""Task-level filter: keep a task only where a random forest learns it.

A forest is fit on the train split and scored on the test split. The task is kept where
the predictions do not collapse onto one class, Cohen's kappa clears a margin (a majority
or random predictor scores ~0) and balanced accuracy clears chance level 1/K by a margin.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from mllm_jax.filtering.config import FilterConfig
from mllm_jax.filtering.consensus import consensus_rows
from mllm_jax.filtering.forest import make_forest, sub_seed, task_seed, unchecked_sklearn
from mllm_jax.filtering.inputs import check_consensus_inputs, check_split_inputs
from mllm_jax.filtering.metrics import ForestMetrics, forest_metrics
from mllm_jax.filtering.result import FilterResult, Problem, Reason
from mllm_jax.foundation.tasks import Task


def judge(metrics: ForestMetrics, config: FilterConfig) -> Problem | None:
    """The first acceptance rule the metrics break (collapse, kappa, balanced accuracy)."""
    if metrics.n_predicted_classes < config.min_predicted_classes:
        return Problem(
            Reason.COLLAPSED,
            f"forest predicts {metrics.n_predicted_classes} class(es), "
            f"needs >= {config.min_predicted_classes}",
        )
    if metrics.max_predicted_share > config.max_predicted_share:
        return Problem(
            Reason.COLLAPSED,
            f"one class takes {metrics.max_predicted_share:.3f} of the predictions "
            f"(bound {config.max_predicted_share})",
        )
    if metrics.kappa < config.min_kappa:
        return Problem(
            Reason.LOW_KAPPA, f"kappa {metrics.kappa:.4f} < min_kappa {config.min_kappa}"
        )
    needed = metrics.chance_balanced_accuracy + config.balanced_accuracy_margin
    if metrics.balanced_accuracy < needed:
        return Problem(
            Reason.LOW_BALANCED_ACCURACY,
            f"balanced accuracy {metrics.balanced_accuracy:.4f} < chance "
            f"{metrics.chance_balanced_accuracy:.4f} + margin {config.balanced_accuracy_margin}",
        )
    return None


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _timed(result: FilterResult, start: tuple[float, float]) -> FilterResult:
    """The result with the wall and CPU seconds since ``start`` (from :func:`_clock`)."""
    wall, cpu = _clock()
    return dataclasses.replace(result, seconds=wall - start[0], cpu_seconds=cpu - start[1])


def _majority(y: np.ndarray) -> int:
    values, counts = np.unique(y, return_counts=True)
    return int(values[np.argmax(counts)])


def filter_task(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    config: FilterConfig | None = None,
    *,
    seed: int = 0,
) -> FilterResult:
    """Fits a forest on the train split, scores the test split, decides.

    Args:
        X_train: f32[n_train, features]; y_train: int[n_train].
        X_test: f32[n_test, features]; y_test: int[n_test].
        config: forest shape and margins; defaults to ``FilterConfig()``.
        seed: the forest's seed (same seed, same decision).

    Returns:
        The decision with every metric; bad input (NaN/inf features, one class, an empty
        split, inconsistent shapes) is a rejection with its reason, never an exception.
        Consensus is not computed here (see :func:`consensus_mask`, :func:`apply_filters`).
    """
    start = _clock()
    config = config or FilterConfig()
    X_train, X_test = np.asarray(X_train), np.asarray(X_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    problem = check_split_inputs(X_train, y_train, X_test, y_test)
    if problem is not None:
        return _timed(FilterResult.reject(problem), start)
    forest = make_forest(config, X_train.shape[1], seed)
    with unchecked_sklearn():
        forest.fit(X_train.astype(np.float32, copy=False), y_train)
        y_pred = forest.predict(X_test.astype(np.float32, copy=False))
    metrics = forest_metrics(y_test, y_pred, majority_class=_majority(y_train))
    problem = judge(metrics, config)
    result = (
        FilterResult(True, None, "", metrics)
        if problem is None
        else FilterResult.reject(problem, metrics)
    )
    return _timed(result, start)


def apply_filters(task: Task, config: FilterConfig | None = None) -> FilterResult:
    """Both filters on one task: the task-level decision, then (if accepted and
    ``config.consensus``) the consensus mask over all its rows.

    The forest seed comes from ``(config.seed, task.seed, task.index)`` so a task gets the
    same decision and mask in any worker, batch or run.
    """
    start = _clock()
    config = config or FilterConfig()
    seed = task_seed(config.seed, task.seed, task.index)
    if config.consensus:
        problem = check_consensus_inputs(task.X, task.y, config.consensus_folds)
        if problem is not None:
            return _timed(FilterResult.reject(problem), start)
    result = filter_task(*task.split(), config, seed=seed)
    if result.accepted and config.consensus:
        X = task.X.astype(np.float32, copy=False)
        mask = consensus_rows(X, task.y, config, sub_seed(seed, 1))
        result = dataclasses.replace(result, consensus=mask)
    return _timed(result, start)


def annotate(task: Task, result: FilterResult) -> Task:
    """The task with its consensus mask (if any) and ``extra["filter"]`` = the decision and
    metrics (no timings, so a stored task is the same bytes in every run)."""
    return dataclasses.replace(
        task,
        consensus=result.consensus if result.consensus is not None else task.consensus,
        extra={**task.extra, "filter": result.to_json(timings=False)},
    )
