"""Baseline classifiers fitted on the shots, behind the shared preprocessing.

Hyperparameters follow MachineLearningLM's `ml_utils.py` where it has them (random forest
30 trees; kNN k=8 with distance weights; XGBoost lr 0.05, depth 4, 500 trees, subsample
and column sample 0.8), plus logistic regression and the majority class. Departures from
the reference (docs/eval.md): the seed of each entry seeds the models (the reference fixed
42); kNN caps k at the number of shots and sees standardised, one-hot features (the
reference used raw, label-encoded ones); XGBoost's objective is multi:softprob for more than
two classes, and shots missing a class train on the classes present instead of falling back
to the majority label.

Every model is fitted on the label codes present in the shots (`classes_`); the runner puts
probability 0 on the other classes. Shots of a single class predict it with probability 1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Self

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from xgboost import XGBClassifier

from mllm_jax.eval.estimator import MethodFactory
from mllm_jax.eval.preprocessing import TextEncoding, make_preprocessor

# (n_shots, n_classes_in_shots, seed) -> an unfitted scikit-learn classifier.
EstimatorBuilder = Callable[[int, int, int], ClassifierMixin]

RF_TREES = 30
KNN_NEIGHBOURS = 8
XGB_PARAMS: dict[str, object] = {
    "learning_rate": 0.05,
    "max_depth": 4,
    "n_estimators": 500,
    "min_child_weight": 1,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "gamma": 0.0,
    "reg_lambda": 1.0,
    "reg_alpha": 0.0,
}


class ShotsClassifier:
    """An estimator behind `make_preprocessor`, fitted on label codes present in the shots.

    fit: X DataFrame[shots, features], y i64[shots].
    predict_proba: X DataFrame[n, features] -> f32[n, len(classes_)].
    """

    def __init__(self, build: EstimatorBuilder, encoding: TextEncoding, scale: bool, seed: int):
        self.build = build
        self.encoding = encoding
        self.scale = scale
        self.seed = seed

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> Self:
        y = np.asarray(y)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
        if len(y) == 0:
            raise ValueError("cannot fit on zero shots")
        self.classes_ = np.unique(y)
        self.pipeline_: Pipeline | None = None
        if len(self.classes_) > 1:
            estimator = self.build(len(y), len(self.classes_), self.seed)
            self.pipeline_ = Pipeline(
                [("prep", make_preprocessor(self.encoding, self.scale)), ("model", estimator)]
            )
            # Codes 0..k-1 of the present classes: XGBoost requires contiguous labels.
            self.pipeline_.fit(X, np.searchsorted(self.classes_, y))
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        if self.pipeline_ is None:
            return np.ones((len(X), 1), dtype=np.float32)
        return self.pipeline_.predict_proba(X).astype(np.float32)


def random_forest(n_shots: int, n_classes: int, seed: int) -> ClassifierMixin:
    return RandomForestClassifier(n_estimators=RF_TREES, random_state=seed, n_jobs=1)


def knn(n_shots: int, n_classes: int, seed: int) -> ClassifierMixin:
    return KNeighborsClassifier(n_neighbors=min(KNN_NEIGHBOURS, n_shots), weights="distance")


def xgboost(n_shots: int, n_classes: int, seed: int) -> ClassifierMixin:
    objective = "binary:logistic" if n_classes == 2 else "multi:softprob"
    return XGBClassifier(
        objective=objective, random_state=seed, n_jobs=1, verbosity=0, **XGB_PARAMS
    )


def logistic_regression(n_shots: int, n_classes: int, seed: int) -> ClassifierMixin:
    return LogisticRegression(max_iter=1000, random_state=seed)


def majority(n_shots: int, n_classes: int, seed: int) -> ClassifierMixin:
    # "prior": predicts the most frequent shot label, with the shot frequencies as
    # probabilities (so AUC is 0.5 and log loss is the shots' class entropy, not infinite).
    return DummyClassifier(strategy="prior")


# partial(ShotsClassifier, build, encoding, scale)(seed): picklable, so `jobs > 1` can send
# the factories to worker processes.
BASELINES: dict[str, MethodFactory] = {
    "rf": partial(ShotsClassifier, random_forest, "ordinal", False),
    "knn": partial(ShotsClassifier, knn, "onehot", True),
    "xgb": partial(ShotsClassifier, xgboost, "ordinal", False),
    "lr": partial(ShotsClassifier, logistic_regression, "onehot", True),
    "majority": partial(ShotsClassifier, majority, "ordinal", False),
}
