"""The permuted-shot-labels control of the evaluation harness."""

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from mllm_jax.eval.methods import PermutedShotLabels, resolve_methods


class Recorder:
    """Remembers the labels it was fitted on; predicts with a 1-NN."""

    def fit(self, X, y):
        self.y = np.asarray(y)
        self.knn = KNeighborsClassifier(1).fit(X, y)
        self.classes_ = self.knn.classes_
        return self

    def predict_proba(self, X):
        return self.knn.predict_proba(X)


def test_permuted_shots_keep_the_counts_and_break_the_link():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=400)})
    y = (X["a"] > 0).to_numpy().astype(np.int64)
    shots, queries = slice(0, 200), slice(200, 400)
    true = Recorder().fit(X[shots], y[shots])
    control = PermutedShotLabels(Recorder(), seed=3).fit(X[shots], y[shots])
    assert sorted(control.base.y.tolist()) == sorted(y[shots].tolist())
    assert (control.base.y != y[shots]).mean() > 0.3
    np.testing.assert_array_equal(control.classes_, true.classes_)
    accuracy = lambda m: (m.predict_proba(X[queries]).argmax(1) == y[queries]).mean()  # noqa: E731
    assert accuracy(true) > 0.9
    assert accuracy(control) < 0.7
    again = PermutedShotLabels(Recorder(), seed=3).fit(X[shots], y[shots])
    np.testing.assert_array_equal(again.base.y, control.base.y)


def test_permuted_shots_need_a_model():
    with pytest.raises(ValueError, match="need a model"):
        resolve_methods(["knn"], permuted_shots=True)
    methods = resolve_methods(["knn"], model_dir="somewhere", permuted_shots=True)
    assert list(methods) == ["knn", "mllm", "mllm_permuted"]
