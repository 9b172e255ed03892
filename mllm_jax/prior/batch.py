"""TaskBatch: a padded batch of generated tasks as numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mllm_jax.foundation.tasks import Task

FAMILY_NAMES = ("mlp", "tree")

# Per-task metadata copied into Task.extra (cheap scalars worth keeping with a task).
EXTRA_FIELDS = (
    "attempts",
    "n_classes_drawn",
    "noise_std",
    "sampling",
    "class_thresholds",
    "is_causal",
    "num_layers",
    "hidden",
    "init_std",
)
# The MLP architecture fields; a tree task draws its own, so its Task.extra omits them.
MLP_ONLY_FIELDS = ("is_causal", "num_layers", "hidden", "init_std")


@dataclass
class TaskBatch:
    """Tasks ``start .. start + count - 1`` of corpus ``seed``, padded to common shapes.

    Attributes:
        X: f32[count, rows, max_features]; columns >= n_features are zero.
        y: i32[count, rows] labels in [0, n_classes).
        n_features: i32[count] features after constant ones were dropped.
        n_classes: i32[count] distinct labels.
        n_train: i32[count] rows of the train split (the first rows).
        categorical: bool[count, max_features].
        family: str[count], "mlp" or "tree".
        valid: bool[count]; False where all attempts failed (arrays then hold zeros).
        seed, start: corpus seed and index of the first task.
        extra: per-task scalar metadata, name -> array[count] (see EXTRA_FIELDS).
    """

    X: np.ndarray
    y: np.ndarray
    n_features: np.ndarray
    n_classes: np.ndarray
    n_train: np.ndarray
    categorical: np.ndarray
    family: np.ndarray
    valid: np.ndarray
    seed: int
    start: int
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.valid)

    @property
    def indices(self) -> np.ndarray:
        return self.start + np.arange(len(self), dtype=np.int64)

    def task(self, i: int) -> Task:
        """Task i of the batch (corpus index start + i), trimmed to its features."""
        if not self.valid[i]:
            raise ValueError(
                f"task {self.start + i} of seed {self.seed} is invalid (all attempts failed)"
            )
        nf = int(self.n_features[i])
        extra = {}
        for name, values in self.extra.items():
            if self.family[i] != "mlp" and name in MLP_ONLY_FIELDS:
                continue
            v = values[i]
            extra[name] = v.item() if isinstance(v, np.generic) else v
        return Task(
            X=self.X[i, :, :nf],
            y=self.y[i],
            n_classes=int(self.n_classes[i]),
            n_train=int(self.n_train[i]),
            categorical=self.categorical[i, :nf],
            family=str(self.family[i]),
            seed=int(self.seed),
            index=int(self.start + i),
            extra=extra,
        )

    def to_tasks(self) -> list[Task]:
        """The valid tasks, in index order (invalid ones are skipped; see ``valid``)."""
        return [self.task(i) for i in np.flatnonzero(self.valid)]
