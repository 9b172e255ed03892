"""Classification metrics from class probabilities, computed with scikit-learn.

Predictions are the argmax of the probabilities (ties -> the lowest label code), so every
method is scored the same way, unless a method decides its labels otherwise (the LLM's
reference vote over ensemble members): then accuracy and F1 score its labels, and AUC and
log loss its probabilities. ROC AUC is binary AUC of class 1 for two classes and the
unweighted mean of one-vs-rest AUCs over the classes present in the test rows for more
(equal to scikit-learn's `multi_class="ovr", average="macro"` when all are present; a
class absent from the test rows has no AUC and is left out); it is NaN when the test rows
hold a single class. Log loss clips probabilities to [1e-15, 1], so a class a method gave
probability 0 (e.g. missing from the shots) costs about 34.5 nats, not infinity.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

METRICS = ("accuracy", "f1_weighted", "roc_auc", "log_loss")

PROBABILITY_FLOOR = 1e-15


def check_probabilities(proba: np.ndarray, n_rows: int, n_classes: int, who: str) -> np.ndarray:
    """Validates f[n_rows, n_classes] probabilities (finite, >= 0, rows sum to 1 +- 1e-3)."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (n_rows, n_classes):
        raise ValueError(
            f"{who}: probabilities of shape {proba.shape}, expected {(n_rows, n_classes)}"
        )
    if not np.all(np.isfinite(proba)):
        raise ValueError(f"{who}: probabilities contain NaN or infinity")
    if np.any(proba < 0):
        raise ValueError(f"{who}: negative probabilities (min {proba.min():.3g})")
    sums = proba.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0))) if n_rows else 0
    if n_rows and abs(sums[worst] - 1.0) > 1e-3:
        raise ValueError(f"{who}: probabilities of row {worst} sum to {sums[worst]:.6f}, not 1")
    return proba


def roc_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """y_true: i64[n] codes; proba: f64[n, K]. NaN when y_true holds a single class."""
    present = np.unique(y_true)
    if len(present) < 2:
        return math.nan
    if proba.shape[1] == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    return float(np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in present]))


def compute_metrics(
    y_true: np.ndarray, proba: np.ndarray, y_pred: np.ndarray | None = None
) -> dict[str, float]:
    """y_true: i64[n] label codes 0..K-1; proba: f[n, K]; y_pred: i64[n] the method's own
    labels (None: the argmax of proba). Returns the METRICS by name."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = proba.shape[1]
    y_pred = np.argmax(proba, axis=1) if y_pred is None else np.asarray(y_pred)
    clipped = np.clip(proba, PROBABILITY_FLOOR, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "roc_auc": roc_auc(y_true, proba),
        "log_loss": float(log_loss(y_true, clipped, labels=np.arange(n_classes))),
    }
