"""Settings of the random-forest filters: forest shape, acceptance margins, consensus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FilterConfig:
    """How tasks are judged learnable and which rows enter the warm-up corpus.

    Defaults were chosen by measurement on the prior's tasks (docs/filtering.md has the
    numbers and the commands that produced them).

    Forest (scikit-learn ``RandomForestClassifier``, one thread):
        n_estimators: trees per forest.
        max_depth: depth limit of each tree; None grows trees until leaves are pure.
        max_features: features tried per split: "sqrt", "log2", a fraction in (0, 1] or
            a count.
        min_samples_leaf: fewest training rows in a leaf.

    Task level (a forest fit on the train split, scored on the test split):
        min_kappa: Cohen's kappa must reach this; a majority or random predictor
            scores about 0.
        balanced_accuracy_margin: balanced accuracy must reach 1/K + this margin, with
            K the number of classes present in the test split (the chance level).
        max_predicted_share: the most predicted class may take at most this share of the
            test predictions.
        min_predicted_classes: the forest must predict at least this many classes.

    Sample level ("consensus", the warm-up corpus):
        consensus: compute the row mask for accepted tasks.
        consensus_method: "kfold": each row predicted by a forest fit on the other folds
            (``consensus_folds`` forests); "oob": one forest on all rows, each row
            predicted by the trees whose bootstrap sample left it out (rows no tree left
            out are not kept).
        consensus_folds: folds of the k-fold prediction.

    seed: mixed with each task's (seed, index) so every task gets its own forest seed,
        independent of which worker or batch filters it.
    """

    n_estimators: int = 30
    max_depth: int | None = None
    max_features: Literal["sqrt", "log2"] | int | float = "sqrt"  # int before float: 3 is a count
    min_samples_leaf: int = 1
    min_kappa: float = 0.1
    balanced_accuracy_margin: float = 0.05
    max_predicted_share: float = 0.95
    min_predicted_classes: int = 2
    consensus: bool = False
    consensus_method: Literal["kfold", "oob"] = "kfold"
    consensus_folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_estimators < 1:
            raise ValueError(f"n_estimators must be >= 1, got {self.n_estimators}")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1 or None, got {self.max_depth}")
        if isinstance(self.max_features, str):
            if self.max_features not in ("sqrt", "log2"):
                raise ValueError(f"max_features {self.max_features!r} is not 'sqrt' or 'log2'")
        elif isinstance(self.max_features, float) and not 0.0 < self.max_features <= 1.0:
            raise ValueError(f"max_features fraction must be in (0, 1], got {self.max_features}")
        elif isinstance(self.max_features, int) and self.max_features < 1:
            raise ValueError(f"max_features count must be >= 1, got {self.max_features}")
        if self.min_samples_leaf < 1:
            raise ValueError(f"min_samples_leaf must be >= 1, got {self.min_samples_leaf}")
        if not -1.0 <= self.min_kappa <= 1.0:
            raise ValueError(f"min_kappa must be in [-1, 1], got {self.min_kappa}")
        if not -1.0 <= self.balanced_accuracy_margin <= 1.0:
            raise ValueError(
                f"balanced_accuracy_margin must be in [-1, 1], got {self.balanced_accuracy_margin}"
            )
        if not 0.0 < self.max_predicted_share <= 1.0:
            raise ValueError(
                f"max_predicted_share must be in (0, 1], got {self.max_predicted_share}"
            )
        if self.min_predicted_classes < 1:
            raise ValueError(
                f"min_predicted_classes must be >= 1, got {self.min_predicted_classes}"
            )
        if self.consensus_method not in ("kfold", "oob"):
            raise ValueError(f"consensus_method {self.consensus_method!r} is not 'kfold' or 'oob'")
        if self.consensus_folds < 2:
            raise ValueError(f"consensus_folds must be >= 2, got {self.consensus_folds}")
