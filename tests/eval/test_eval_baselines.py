"""Baselines equal a direct scikit-learn / XGBoost computation on the same rows.

The reference computation below is written from the documented protocol only: it reads
the CSV with pandas, splits and draws shots with the documented calls, encodes features
by hand with pandas/numpy, and fits the estimators directly. It shares no code with
mllm_jax.eval beyond the functions under test.
"""

import random

import numpy as np
import pandas as pd
import pytest
from locations import TABLES
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from xgboost import XGBClassifier

from mllm_jax.eval.baselines import BASELINES
from mllm_jax.eval.protocol import build_plan
from mllm_jax.eval.run import evaluate_entry
from mllm_jax.foundation.tables import from_frame, load_csv

DATA = str(TABLES)


def direct_rows(path, seed, shots):
    frame = pd.read_csv(path, na_values=["?"])
    labels = np.unique(frame["label"], return_inverse=True)[1]
    features = frame.drop(columns="label")
    train, test = train_test_split(
        np.arange(len(frame)), test_size=0.2, random_state=42, stratify=labels
    )
    shot_rows = train[np.random.default_rng(seed).permutation(len(train))[:shots]]
    order = list(range(features.shape[1]))
    random.Random(seed).shuffle(order)
    features = features.iloc[:, order]
    return features, labels, shot_rows, test


def direct_matrices(features, shot_rows, test, onehot):
    """Numeric: shot median fill (+ z-score with the shots' mean/std); text: codes or dummies."""
    numeric = [c for c in features.columns if pd.api.types.is_numeric_dtype(features[c])]
    text = [c for c in features.columns if c not in numeric]
    blocks_train, blocks_test = [], []
    for column in numeric:
        values = features[column].to_numpy(dtype=float)
        shot_values = values[shot_rows]
        fill = np.nanmedian(shot_values) if np.isfinite(shot_values).any() else 0.0
        values = np.where(np.isnan(values), fill, values)
        if onehot:
            mean, std = values[shot_rows].mean(), values[shot_rows].std()
            values = (values - mean) / (std if std > 0 else 1.0)
        blocks_train.append(values[shot_rows, None])
        blocks_test.append(values[test, None])
    for column in text:
        values = features[column].astype(object).where(features[column].notna(), "__missing__")
        categories = sorted(set(values.iloc[shot_rows]))
        if onehot:
            indicator = np.stack([(values == c).to_numpy(dtype=float) for c in categories], axis=1)
            blocks_train.append(indicator[shot_rows])
            blocks_test.append(indicator[test])
        else:
            lookup = {c: i for i, c in enumerate(categories)}
            codes = values.map(lambda v, lookup=lookup: lookup.get(v, -1)).to_numpy(dtype=float)
            blocks_train.append(codes[shot_rows, None])
            blocks_test.append(codes[test, None])
    return np.hstack(blocks_train), np.hstack(blocks_test)


def direct_estimator(method, seed, n_shots, n_classes):
    if method == "rf":
        return RandomForestClassifier(n_estimators=30, random_state=seed, n_jobs=1)
    if method == "knn":
        return KNeighborsClassifier(n_neighbors=min(8, n_shots), weights="distance")
    if method == "xgb":
        return XGBClassifier(
            objective="multi:softprob" if n_classes > 2 else "binary:logistic",
            learning_rate=0.05,
            max_depth=4,
            n_estimators=500,
            subsample=0.8,
            colsample_bytree=0.8,
            random_state=seed,
            n_jobs=1,
        )
    if method == "lr":
        return LogisticRegression(max_iter=1000)
    return DummyClassifier(strategy="prior")


def direct_metrics(path, method, seed, shots):
    features, labels, shot_rows, test = direct_rows(path, seed, shots)
    x_train, x_test = direct_matrices(features, shot_rows, test, onehot=method in ("knn", "lr"))
    present = np.unique(labels[shot_rows])
    model = direct_estimator(method, seed, len(shot_rows), len(present))
    model.fit(x_train, np.searchsorted(present, labels[shot_rows]))
    n_classes = labels.max() + 1
    proba = np.zeros((len(test), n_classes))
    proba[:, present] = model.predict_proba(x_test)
    y_true, y_pred = labels[test], present[model.predict(x_test)]
    if n_classes == 2:
        auc = roc_auc_score(y_true, proba[:, 1])
    else:
        auc = np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in np.unique(y_true)])
    clipped = np.clip(proba, 1e-15, 1)
    return {
        "accuracy": accuracy_score(y_true, y_pred),
        "f1_weighted": f1_score(y_true, y_pred, average="weighted"),
        "roc_auc": auc,
        "log_loss": log_loss(
            y_true, clipped / clipped.sum(1, keepdims=True), labels=range(n_classes)
        ),
    }


CASES = [
    # (file, method, seed, shots): binary/multiclass, text columns, missing values.
    ("cmc", "rf", 0, 64),
    ("cmc", "xgb", 1, 32),
    ("cmc", "knn", 0, 128),
    ("cmc", "lr", 0, 128),
    ("cmc", "majority", 1, 16),
    ("golf_play_dataset_extended", "rf", 1, 128),
    ("golf_play_dataset_extended", "xgb", 0, 64),
    ("golf_play_dataset_extended", "knn", 0, 64),
    ("golf_play_dataset_extended", "lr", 1, 64),
    ("eucalyptus", "rf", 0, 128),
    ("eucalyptus", "xgb", 0, 16),
    ("eucalyptus", "knn", 1, 64),
    ("eucalyptus", "lr", 0, 64),
]


@pytest.mark.parametrize("name, method, seed, shots", CASES)
def test_baseline_equals_direct_computation(name, method, seed, shots):
    path = f"{DATA}/{name}.csv.gz"
    dataset = load_csv(path)
    plan = build_plan([dataset], [shots], [seed])
    ours = evaluate_entry(dataset, plan.entries[0], method, BASELINES[method])
    expected = direct_metrics(path, method, seed, shots)
    # Same predictions; probabilities pass through float32 (the Classifier contract), and
    # kNN/LR see z-scores from a different float path: 1e-6 on the probability metrics.
    assert ours["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert ours["f1_weighted"] == pytest.approx(expected["f1_weighted"], abs=1e-12)
    assert ours["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)
    assert ours["log_loss"] == pytest.approx(expected["log_loss"], abs=1e-6)


def _toy(labels, rows_per_label=10):
    rng = np.random.default_rng(0)
    y = np.repeat(labels, rows_per_label)
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=len(y)) + y,
            "t": rng.choice(["a", "b", None], size=len(y)),
            "label": y,
        }
    )
    return from_frame(frame, "label", name="toy")


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_classes_missing_from_the_shots_get_zero_probability(method):
    """Shots of classes {0, 2} only; the test rows hold class 1 too."""
    dataset = _toy([0, 1, 2])
    shots_rows = np.flatnonzero(dataset.labels != 1)[::2]
    model = BASELINES[method](0).fit(dataset.features.iloc[shots_rows], dataset.labels[shots_rows])
    np.testing.assert_array_equal(model.classes_, [0, 2])
    proba = model.predict_proba(dataset.features)
    assert proba.shape == (dataset.n_rows, 2) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_single_class_shots_and_fewer_shots_than_neighbours(method):
    dataset = _toy([0, 1])
    one_class = np.flatnonzero(dataset.labels == 1)[:5]
    model = BASELINES[method](3).fit(dataset.features.iloc[one_class], dataset.labels[one_class])
    np.testing.assert_array_equal(model.classes_, [1])
    np.testing.assert_array_equal(
        model.predict_proba(dataset.features), np.ones((dataset.n_rows, 1))
    )
    four = np.array([0, 1, 10, 11])  # two of each class, k capped at 4
    model = BASELINES[method](3).fit(dataset.features.iloc[four], dataset.labels[four])
    assert model.predict_proba(dataset.features).shape == (dataset.n_rows, 2)


def test_text_categories_unseen_in_shots_and_all_missing_columns():
    frame = pd.DataFrame(
        {
            "empty": [np.nan] * 8,
            "t": ["a", "a", "b", "b", "zz", None, "a", "b"],
            "x": [0.0, 1.0, 0.0, 1.0, 0.5, 0.5, np.nan, 1.0],
            "label": [0, 0, 1, 1, 0, 1, 0, 1],
        }
    )
    dataset = from_frame(frame, "label", name="edge")
    shots = np.arange(4)
    for method, make in BASELINES.items():
        model = make(0).fit(dataset.features.iloc[shots], dataset.labels[shots])
        proba = model.predict_proba(dataset.features.iloc[4:])
        assert np.all(np.isfinite(proba)) and proba.shape == (4, 2), method
