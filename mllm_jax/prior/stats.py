"""The task statistics on which our prior is compared with the reference prior.

Computed identically on our tasks and on tasks sampled from ``tabicl==0.1.4`` (see
``tools/make_prior_fixture.py``), then compared per statistic with a two-sample KS test.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps
from sklearn.ensemble import RandomForestClassifier

STATISTICS = (
    "n_classes",
    "class_entropy",
    "n_features",
    "train_fraction",
    "categorical_fraction",
    "feature_abs_skewness",
    "feature_distinct_fraction",
    "mean_abs_label_corr",
    "rf_accuracy",
)


def task_statistics(
    X: np.ndarray,
    y: np.ndarray,
    n_train: int,
    categorical: np.ndarray,
    *,
    rf: bool = True,
    rf_seed: int = 0,
) -> dict[str, float]:
    """Statistics of one task.

    Args:
        X: f32[rows, n_features] features (trimmed to the task's own features).
        y: i32[rows] labels.
        n_train: rows in the train split (the first rows).
        categorical: bool[n_features] columns generated as categorical.
        rf: also fit a 30-tree random forest (the slow statistic).
        rf_seed: random state of that forest.

    Returns:
        ``n_classes`` (distinct labels), ``class_entropy`` (entropy of the label
        frequencies divided by log of the number of classes), ``n_features``,
        ``train_fraction`` (``n_train`` / rows), ``categorical_fraction``,
        ``feature_abs_skewness`` (median over columns of |sample skewness|, 0 for constant
        columns), ``feature_distinct_fraction`` (mean over columns of distinct values /
        rows), ``mean_abs_label_corr`` (mean over columns of |Pearson r| with the integer label,
        0 for constant columns) and, with ``rf``, ``rf_accuracy`` (test accuracy of a
        30-tree random forest fit on the train split).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    k = len(counts)
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum() / np.log(k)) if k > 1 else 0.0

    xc = X - X.mean(axis=0)
    yc = y - y.mean()
    denom = np.sqrt((xc**2).sum(axis=0) * (yc**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, np.abs(xc.T @ yc) / denom, 0.0)

    rows, n_features = X.shape
    # Skewness and the share of distinct values do not change under the reference's
    # monotone rescalings, so they compare the marginals' shapes across the two priors.
    skew = np.zeros(n_features)
    varying = X.max(axis=0) > X.min(axis=0)  # a constant column has no skewness: 0
    if rows > 2 and varying.any():
        skew[varying] = sps.skew(X[:, varying], axis=0)
    distinct = [len(np.unique(X[:, j])) / rows for j in range(n_features)]

    out = {
        "n_classes": float(k),
        "class_entropy": entropy,
        "n_features": float(n_features),
        "train_fraction": n_train / rows,
        "categorical_fraction": float(np.mean(categorical)) if len(categorical) else 0.0,
        "feature_abs_skewness": float(np.median(np.abs(skew))) if n_features else 0.0,
        "feature_distinct_fraction": float(np.mean(distinct)) if n_features else 0.0,
        "mean_abs_label_corr": float(corr.mean()) if corr.size else 0.0,
    }
    if rf:
        forest = RandomForestClassifier(n_estimators=30, random_state=rf_seed, n_jobs=1)
        forest.fit(X[:n_train], y[:n_train])
        out["rf_accuracy"] = float((forest.predict(X[n_train:]) == y[n_train:]).mean())
    return out


def ks_distances(
    ours: dict[str, list[float]], reference: dict[str, list[float]]
) -> dict[str, float]:
    """Two-sample KS statistic per statistic present in both."""
    return {
        name: float(sps.ks_2samp(ours[name], reference[name]).statistic)
        for name in STATISTICS
        if name in ours and name in reference
    }


def ks_critical_value(n: int, m: int, alpha: float = 0.01) -> float:
    """The two-sample KS distance above which samples of sizes `n` and `m` differ at
    level `alpha` (asymptotic: sqrt(-ln(alpha / 2) / 2) * sqrt((n + m) / (n m)));
    conservative for discrete statistics such as the class count."""
    if n < 1 or m < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n, m >= 1 and 0 < alpha < 1, got {n}, {m}, {alpha}")
    return float(np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m)))


def ks_verdicts(
    ours: dict[str, list[float]], reference: dict[str, list[float]], alpha: float = 0.01
) -> dict[str, dict[str, float | bool]]:
    """Per statistic: the KS distance, its critical value at `alpha` for the two sample
    sizes, and whether the distance stays within it."""
    distances = ks_distances(ours, reference)
    out: dict[str, dict[str, float | bool]] = {}
    for name, distance in distances.items():
        critical = ks_critical_value(len(ours[name]), len(reference[name]), alpha)
        out[name] = {"ks": distance, "critical": critical, "within": distance <= critical}
    return out
