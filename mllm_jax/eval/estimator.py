"""What the runner evaluates: anything with `fit`, `predict_proba` and `classes_`, made
per fit by a factory `seed -> Classifier` (so no state leaks between entries)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, Self, runtime_checkable

import numpy as np
import pandas as pd


@runtime_checkable
class Classifier(Protocol):
    """The scikit-learn subset the runner calls.

    fit: X DataFrame[shots, features], y i64[shots] label codes -> self.
    predict_proba: X DataFrame[n, features] -> f32[n, len(classes_)], rows summing to 1.
    classes_: the label codes seen in `fit`, sorted; column j of predict_proba is classes_[j].
    """

    classes_: np.ndarray

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> Self: ...

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray: ...


MethodFactory = Callable[[int], Classifier]
