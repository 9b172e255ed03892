"""Metrics agree with scikit-learn and handle classes absent from the test rows."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from mllm_jax.eval.metrics import check_probabilities, compute_metrics


def _random_proba(rng, n, k):
    logits = rng.normal(size=(n, k))
    proba = np.exp(logits)
    return proba / proba.sum(axis=1, keepdims=True)


def test_multiclass_auc_equals_sklearn_ovr_macro_when_all_classes_present():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    proba = _random_proba(rng, 200, 4)
    metrics = compute_metrics(y, proba)
    assert metrics["roc_auc"] == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12
    )
    assert metrics["log_loss"] == pytest.approx(log_loss(y, proba), abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(np.mean(proba.argmax(1) == y))


def test_binary_auc_uses_class_one():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=100)
    proba = _random_proba(rng, 100, 2)
    assert compute_metrics(y, proba)["roc_auc"] == pytest.approx(roc_auc_score(y, proba[:, 1]))


def test_class_absent_from_test_rows_is_left_out_of_auc():
    rng = np.random.default_rng(2)
    y = rng.choice([0, 2], size=100)  # class 1 never occurs
    proba = _random_proba(rng, 100, 3)
    expected = np.mean([roc_auc_score(y == c, proba[:, c]) for c in (0, 2)])
    metrics = compute_metrics(y, proba)
    assert metrics["roc_auc"] == pytest.approx(expected)
    assert math.isfinite(metrics["log_loss"])


def test_zero_probability_on_the_true_class_is_finite_and_single_class_auc_is_nan():
    y = np.array([0, 0, 1])
    proba = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    metrics = compute_metrics(y, proba)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["log_loss"] == pytest.approx(-np.log(1e-15) / 3, rel=1e-6)
    assert math.isnan(compute_metrics(np.array([1, 1]), proba[1:])["roc_auc"])


@pytest.mark.parametrize(
    "proba, message",
    [
        (np.ones((3, 3)) / 3, r"shape \(3, 3\), expected \(3, 2\)"),
        (np.array([[0.5, 0.5], [np.nan, 1.0], [1.0, 0.0]]), "NaN or infinity"),
        (np.array([[0.5, 0.5], [1.5, -0.5], [1.0, 0.0]]), "negative"),
        (np.array([[0.5, 0.5], [0.5, 0.4], [1.0, 0.0]]), r"row 1 sum to 0\.9"),
    ],
)
def test_bad_probabilities_are_named(proba, message):
    with pytest.raises(ValueError, match=f"method m: .*{message}"):
        check_probabilities(proba, 3, 2, "method m")
