"""Task-level and consensus filters on one task's arrays."""

import dataclasses
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

from mllm_jax.filtering import (
    FilterConfig,
    Reason,
    annotate,
    apply_filters,
    consensus_mask,
    filter_task,
    forest_metrics,
)
from mllm_jax.filtering.consensus import stratified_folds
from mllm_jax.filtering.task_filter import judge
from mllm_jax.foundation.config import ConfigError, from_dict
from mllm_jax.foundation.tasks import Task, decode_task, encode_task

SMALL = FilterConfig(n_estimators=10)


def _rule_task(rng, rows=300, features=6, noise=0.0):
    """Labels from a fixed rule on the first two features, optionally with flipped labels."""
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int32) + (X[:, 1] > 1).astype(np.int32)
    flipped = rng.random(rows) < noise
    y[flipped] = (y[flipped] + 1) % 3
    return X, y, flipped


def _split(X, y, n_train):
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.choice([-3, 0, 2, 7, 11], size=int(rng.integers(2, 6)), replace=False)
    y_true = rng.choice(labels, size=n)
    # Predictions agree partly and may use a class the labels never contain.
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice([*labels, 99], size=n))
    m = forest_metrics(y_true, y_pred)
    assert m.kappa == pytest.approx(cohen_kappa_score(y_true, y_pred), abs=1e-12)
    with warnings.catch_warnings():  # sklearn warns about the extra predicted class
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(y_true, y_pred)
    assert m.balanced_accuracy == pytest.approx(expected, abs=1e-12)
    assert m.accuracy == pytest.approx(np.mean(y_true == y_pred))
    assert m.chance_balanced_accuracy == pytest.approx(1 / np.unique(y_true).size)
    assert m.n_predicted_classes == np.unique(y_pred).size
    assert m.max_predicted_share == pytest.approx(
        np.unique(y_pred, return_counts=True)[1].max() / n
    )


def test_filter_task_equals_a_plain_sklearn_forest_and_metrics():
    from sklearn.ensemble import RandomForestClassifier

    X, y, _ = _rule_task(np.random.default_rng(5), rows=300, noise=0.2)
    X_train, y_train, X_test, y_test = _split(X, y, 200)
    result = filter_task(X_train, y_train, X_test, y_test, SMALL, seed=11)
    forest = RandomForestClassifier(n_estimators=10, max_features="sqrt", random_state=11)
    y_pred = forest.fit(X_train, y_train).predict(X_test)  # with scikit-learn's checks on
    assert result.metrics.kappa == pytest.approx(cohen_kappa_score(y_test, y_pred), abs=1e-12)
    assert result.metrics.balanced_accuracy == pytest.approx(
        balanced_accuracy_score(y_test, y_pred), abs=1e-12
    )
    assert result.metrics.accuracy == pytest.approx(np.mean(y_pred == y_test))


def test_learnable_rule_is_accepted():
    X, y, _ = _rule_task(np.random.default_rng(0))
    result = filter_task(*_split(X, y, 200), SMALL, seed=0)
    assert result.accepted, result.message
    assert result.reason is None
    assert result.metrics.kappa > 0.5
    assert result.metrics.balanced_accuracy > result.metrics.chance_balanced_accuracy + 0.2


@pytest.mark.parametrize("seed", range(5))
def test_pure_noise_labels_are_rejected(seed):
    rng = np.random.default_rng(100 + seed)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=400).astype(np.int32)
    result = filter_task(*_split(X, y, 250), SMALL, seed=seed)
    assert not result.accepted
    assert result.reason in (Reason.LOW_KAPPA, Reason.LOW_BALANCED_ACCURACY, Reason.COLLAPSED)
    assert abs(result.metrics.kappa) < 0.15


def test_forest_that_predicts_one_class_is_collapsed():
    # Identical rows: no split exists, every tree predicts its bootstrap majority.
    X = np.zeros((200, 3), np.float32)
    y = (np.arange(200) % 4 == 0).astype(np.int32)  # 25% minority
    result = filter_task(*_split(X, y, 150), SMALL, seed=0)
    assert not result.accepted
    assert result.reason is Reason.COLLAPSED
    assert result.metrics.n_predicted_classes == 1
    assert "1 class" in result.message


def test_judge_checks_collapse_share_kappa_and_balanced_accuracy():
    y_true = np.array([0] * 50 + [1] * 50)
    lopsided = np.array([0] * 97 + [1] * 3)
    m = forest_metrics(y_true, lopsided)
    assert judge(m, FilterConfig(max_predicted_share=0.95)).reason is Reason.COLLAPSED
    assert judge(m, FilterConfig(max_predicted_share=1.0, min_kappa=0.0)) is not None
    good = forest_metrics(y_true, np.where(np.arange(100) < 90, y_true, 1 - y_true))
    assert judge(good, FilterConfig(min_kappa=0.5)) is None
    assert judge(good, FilterConfig(min_kappa=0.9)).reason is Reason.LOW_KAPPA
    bad_ba = judge(good, FilterConfig(min_kappa=0.0, balanced_accuracy_margin=0.45))
    assert bad_ba.reason is Reason.LOW_BALANCED_ACCURACY


def test_bad_inputs_are_rejections_with_reasons():
    rng = np.random.default_rng(0)
    X, y, _ = _rule_task(rng, rows=60)
    nan_X = X.copy()
    nan_X[7, 2] = np.nan
    r = filter_task(*_split(nan_X, y, 40), SMALL)
    assert (r.reason, r.metrics) == (Reason.NONFINITE_FEATURES, None)
    assert "X_train" in r.message and "row 7, column 2" in r.message

    inf_X = X.copy()
    inf_X[45, 0] = np.inf
    r = filter_task(*_split(inf_X, y, 40), SMALL)
    assert r.reason is Reason.NONFINITE_FEATURES and "X_test" in r.message

    one_class = np.where(np.arange(60) < 40, 1, y)
    r = filter_task(*_split(X, one_class, 40), SMALL)
    assert r.reason is Reason.SINGLE_CLASS and "train split" in r.message

    r = filter_task(X[:40], y[:40], X[40:41], y[40:41], SMALL)
    assert r.reason is Reason.TOO_FEW_ROWS

    r = filter_task(X[:40], y[:39], X[40:], y[40:], SMALL)
    assert r.reason is Reason.MALFORMED and "y_train" in r.message

    tiny = Task(X[:4], np.array([0, 1, 0, 1], np.int32), 2, 2, np.zeros(6, bool), "mlp", 0, 0)
    r = apply_filters(tiny, dataclasses.replace(SMALL, consensus=True))
    assert r.reason is Reason.TOO_FEW_ROWS and "5 consensus folds" in r.message
    with pytest.raises(ValueError, match="fewer than 5 consensus folds"):
        consensus_mask(tiny.X, tiny.y, SMALL)


@pytest.mark.parametrize("method", ["kfold", "oob"])
def test_consensus_is_reproducible_and_drops_flipped_labels(method):
    X, y, flipped = _rule_task(np.random.default_rng(1), rows=400, noise=0.15)
    config = dataclasses.replace(SMALL, consensus_method=method, n_estimators=20)
    a = consensus_mask(X, y, config, seed=3)
    b = consensus_mask(X, y, config, seed=3)
    c = consensus_mask(X, y, config, seed=4)
    assert a.dtype == np.bool_ and a.shape == y.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # the seed matters
    # Rows whose labels were flipped are mostly not kept; clean rows mostly are.
    assert a[flipped].mean() < 0.2
    assert a[~flipped].mean() > 0.75


def test_consensus_equals_plain_sklearn_forests_on_the_same_folds():
    from sklearn.ensemble import RandomForestClassifier

    from mllm_jax.filtering.forest import sub_seed

    X, y, _ = _rule_task(np.random.default_rng(6), rows=200, noise=0.2)
    mask = consensus_mask(X, y, SMALL, seed=5)
    folds = stratified_folds(y, 5, sub_seed(5, 0))
    expected = np.empty_like(mask)
    for fold in range(5):
        held = folds == fold
        forest = RandomForestClassifier(n_estimators=10, random_state=sub_seed(5, 1 + fold))
        expected[held] = forest.fit(X[~held], y[~held]).predict(X[held]) == y[held]
    np.testing.assert_array_equal(mask, expected)


def test_stratified_folds_spread_every_class():
    y = np.repeat([0, 1, 2], [53, 7, 3])
    folds = stratified_folds(y, 5, seed=0)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for label in (0, 1, 2):
        per_fold = np.bincount(folds[y == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1


def test_apply_filters_is_a_function_of_the_task_identity():
    X, y, _ = _rule_task(np.random.default_rng(2), rows=200)
    task = Task(X, y, 3, 150, np.zeros(6, bool), "tree", seed=9, index=4)
    config = dataclasses.replace(SMALL, consensus=True)
    first, second = apply_filters(task, config), apply_filters(task, config)
    assert first.accepted
    np.testing.assert_array_equal(first.consensus, second.consensus)
    assert first.metrics == second.metrics
    other = apply_filters(dataclasses.replace(task, index=5), config)
    assert not np.array_equal(first.consensus, other.consensus)

    stored = decode_task(encode_task(annotate(task, first)))
    np.testing.assert_array_equal(stored.consensus, first.consensus)
    assert stored.extra["filter"]["kappa"] == first.metrics.kappa
    assert stored.extra["filter"]["consensus_rate"] == pytest.approx(first.consensus.mean())


def test_config_validates_and_loads_from_plain_data():
    config = from_dict(FilterConfig, {"n_estimators": 50, "max_features": 0.5, "consensus": True})
    assert (config.n_estimators, config.max_features, config.consensus) == (50, 0.5, True)
    with pytest.raises(ConfigError, match="n_estimators"):
        from_dict(FilterConfig, {"n_estimators": 0})
    with pytest.raises(ConfigError, match="max_features"):
        from_dict(FilterConfig, {"max_features": "cube"})
    # a whole number is a count of features (was read as the fraction 3.0 and refused)
    count = from_dict(FilterConfig, {"max_features": 3}).max_features
    assert count == 3 and type(count) is int
    assert from_dict(FilterConfig, {"max_features": 1.0}).max_features == 1.0
    with pytest.raises(ValueError, match="consensus_folds"):
        FilterConfig(consensus_folds=1)
