"""Agreement metrics of a forest's predictions with the labels, from one confusion matrix.

All of them come from a single ``bincount``; scikit-learn's ``cohen_kappa_score`` and
``balanced_accuracy_score`` give the same values (tested) but validate and rebuild the
confusion matrix on every call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ForestMetrics:
    """How a forest's test-split predictions compare with the test labels.

    Attributes:
        kappa: Cohen's kappa; 0 for a constant or random predictor, 1 for a perfect one.
            Where it is undefined (labels and predictions are the same single class) 0.
        balanced_accuracy: mean recall over the classes present in the labels.
        chance_balanced_accuracy: 1/K, K = classes present in the labels.
        accuracy: share of correct predictions.
        majority_accuracy: accuracy of always predicting the train split's most frequent
            class (the majority baseline).
        n_label_classes: classes present in the labels.
        n_predicted_classes: distinct predicted classes.
        max_predicted_share: share of the predictions taken by the most predicted class.
    """

    kappa: float
    balanced_accuracy: float
    chance_balanced_accuracy: float
    accuracy: float
    majority_accuracy: float
    n_label_classes: int
    n_predicted_classes: int
    max_predicted_share: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts over the union of the labels seen in either array.

    Args:
        y_true: int[n] labels.
        y_pred: int[n] predictions.

    Returns:
        i64[L, L] with rows = true class, columns = predicted class, L = distinct values in
        ``y_true`` and ``y_pred`` together (sorted).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    _, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    n_values = int(codes.max()) + 1 if codes.size else 0
    true_codes, pred_codes = codes[: y_true.size], codes[y_true.size :]
    counts = np.bincount(true_codes * n_values + pred_codes, minlength=n_values * n_values)
    return counts.reshape(n_values, n_values)


def forest_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, majority_class: int | None = None
) -> ForestMetrics:
    """All metrics of one prediction vector.

    Args:
        y_true: int[n] test labels, n >= 1.
        y_pred: int[n] predictions.
        majority_class: the train split's most frequent class, for ``majority_accuracy``
            (NaN when None).
    """
    y_true = np.asarray(y_true)
    if y_true.size == 0:
        raise ValueError("cannot score an empty test split")
    cm = confusion_matrix(y_true, y_pred).astype(np.float64)
    n = cm.sum()
    true_counts = cm.sum(axis=1)
    pred_counts = cm.sum(axis=0)
    observed = np.trace(cm) / n
    expected = float(true_counts @ pred_counts) / (n * n)
    kappa = 0.0 if expected >= 1.0 else (observed - expected) / (1.0 - expected)
    present = true_counts > 0
    recalls = np.diag(cm)[present] / true_counts[present]
    majority_accuracy = (
        float(np.mean(y_true == majority_class)) if majority_class is not None else float("nan")
    )
    return ForestMetrics(
        kappa=float(kappa),
        balanced_accuracy=float(recalls.mean()),
        chance_balanced_accuracy=1.0 / int(present.sum()),
        accuracy=float(observed),
        majority_accuracy=majority_accuracy,
        n_label_classes=int(present.sum()),
        n_predicted_classes=int((pred_counts > 0).sum()),
        max_predicted_share=float(pred_counts.max() / n),
    )
