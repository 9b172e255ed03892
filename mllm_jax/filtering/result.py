"""What a filter decided about one task, and why."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from mllm_jax.filtering.metrics import ForestMetrics


class Reason(StrEnum):
    """Why a task was rejected."""

    MALFORMED = "malformed"  # arrays of inconsistent shapes
    NONFINITE_FEATURES = "nonfinite_features"  # NaN or inf in X
    TOO_FEW_ROWS = "too_few_rows"  # empty split, or fewer rows than consensus folds
    SINGLE_CLASS = "single_class"  # a split holds only one class
    COLLAPSED = "collapsed"  # the forest predicts (almost) only one class
    LOW_KAPPA = "low_kappa"  # no better than a majority/random predictor
    LOW_BALANCED_ACCURACY = "low_balanced_accuracy"  # too close to chance level
    FILTER_ERROR = "filter_error"  # the filter raised (message holds the exception)
    WORKER_CRASHED = "worker_crashed"  # its worker process died on every attempt


@dataclass(frozen=True)
class Problem:
    """A rejection found before or after fitting: the reason and a sentence about it."""

    reason: Reason
    message: str


@dataclass(frozen=True)
class FilterResult:
    """The decision on one task.

    Attributes:
        accepted: True where the task is kept.
        reason: why it was rejected; None when accepted.
        message: the rejection in words (names the split, value and threshold); "" if
            accepted.
        metrics: the forest's test-split metrics; None when the task was rejected before
            a forest was fit (bad input).
        consensus: bool[rows] out-of-fold consensus over all rows (train then test), only
            for accepted tasks with consensus on.
        seconds: wall time spent on this task.
        cpu_seconds: CPU time of the filtering process spent on it (unlike the wall time,
            barely affected by other processes competing for the cores).
    """

    accepted: bool
    reason: Reason | None
    message: str
    metrics: ForestMetrics | None
    consensus: np.ndarray | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @classmethod
    def reject(cls, problem: Problem, metrics: ForestMetrics | None = None) -> FilterResult:
        return cls(False, problem.reason, problem.message, metrics)

    @property
    def consensus_rate(self) -> float | None:
        """Share of rows kept by consensus, or None when no mask was computed."""
        return None if self.consensus is None else float(np.mean(self.consensus))

    def to_json(self, *, timings: bool = True) -> dict[str, Any]:
        """Plain data for the per-task log and (``timings=False``: the same bytes in every
        run) ``Task.extra["filter"]``."""
        out: dict[str, Any] = {
            "accepted": self.accepted,
            "reason": None if self.reason is None else str(self.reason),
            "message": self.message,
        }
        if timings:
            out["seconds"] = round(self.seconds, 6)
            out["cpu_seconds"] = round(self.cpu_seconds, 6)
        if self.metrics is not None:
            out.update(self.metrics.to_json())
        if self.consensus is not None:
            out["consensus_rate"] = self.consensus_rate
        return out
