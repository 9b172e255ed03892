"""Settings of the synthetic task prior.

Defaults are MachineLearningLM's use of the TabICL v1 prior (``tabicl==0.1.4``,
``prior_type="mix_scm"``): 1024 rows, 5-50 features, 2-10 classes, train fraction
uniform in [0.1, 0.9], MLP-SCM with p=0.7 and tree-SCM with p=0.3, categorical columns
in 20% of tasks. The remaining fields are ours: how closely the expensive parts of the
reference are followed and how work is cut into compiled chunks. All of them are part of
a task's identity: the same seed, index and config give the same bytes (on one backend
and jax version).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class PriorConfigError(ValueError):
    """A prior setting is out of range or inconsistent."""


@dataclass(frozen=True)
class PriorConfig:
    """Prior settings.

    Attributes:
        rows: rows per task (train + test).
        min_features, max_features: range of the number of features (uniform, rounded).
        max_classes: classes are 2 with p=0.5, else uniform on [2, max_classes].
        min_train_fraction, max_train_fraction: train split = int(rows * U(min, max)).
        tree_prob: probability of the tree-SCM family (else MLP-SCM).
        cat_prob: probability that a task turns some columns categorical.
        attempts: J, draws per task; a task is the first valid of J attempts.
        sine_terms: sine terms kept (largest |weight| first) of the reference's 256-term
            random sine-sum activation.
        sine_table: points of the table the sine sum is interpolated from (a multiple of
            128; 0 evaluates it at every element). See docs/prior.md for the error.
        tree_candidates: random (feature, threshold) split candidates scored per tree
            level (the reference's XGBoost scores every feature at 256 histogram cuts).
        tree_tail_candidates: further split candidates per tree level that cut off one
            of a feature's 1-8 outermost histogram bins, where XGBoost's exhaustive
            search on random targets often splits (``mllm_jax.prior.trees``).
        max_hidden: cap on the MLP hidden width (the reference's width distribution has
            an unbounded tail; 512 is beyond its 99.99th percentile).
        chunk_size: tasks per device per compiled call.
        task_block: tasks of a chunk computed together (``vmap``); ``chunk_size`` must be
            a multiple. 1 runs a chunk's tasks one after another, best on CPUs, where a
            vmapped block evaluates both sides of every data-dependent branch. On a GPU,
            set ``chunk_size`` and ``task_block`` to hundreds (docs/prior.md).
        widths: padded MLP widths; a task runs in the smallest one that holds it. Each
            width is one more compiled program; multiples of 16 fill 512-bit vectors.
    """

    rows: int = 1024
    min_features: int = 5
    max_features: int = 50
    max_classes: int = 10
    min_train_fraction: float = 0.1
    max_train_fraction: float = 0.9
    tree_prob: float = 0.3
    cat_prob: float = 0.2
    attempts: int = 10
    sine_terms: int = 256
    sine_table: int = 4096
    tree_candidates: int = 32
    tree_tail_candidates: int = 32
    max_hidden: int = 512
    chunk_size: int = 8
    task_block: int = 1
    widths: tuple[int, ...] = field(
        default=(16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256, 384, 512)
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise PriorConfigError(message)

        need(self.min_features >= 1, f"min_features={self.min_features} must be >= 1")
        need(
            self.min_features <= self.max_features,
            f"min_features={self.min_features} > max_features={self.max_features}",
        )
        need(self.max_classes >= 2, f"max_classes={self.max_classes}: need at least 2 classes")
        need(self.max_classes <= 64, f"max_classes={self.max_classes}: at most 64 are supported")
        need(
            0.0 < self.min_train_fraction < self.max_train_fraction < 1.0,
            "train fractions must satisfy 0 < min_train_fraction < max_train_fraction < 1, "
            f"got {self.min_train_fraction}, {self.max_train_fraction}",
        )
        smallest_train = int(self.rows * self.min_train_fraction)
        smallest_test = self.rows - int(self.rows * self.max_train_fraction)
        need(
            smallest_train >= 2 and smallest_test >= 2,
            f"rows={self.rows} too few for a split: with train fractions "
            f"[{self.min_train_fraction}, {self.max_train_fraction}] a split can hold "
            f"{smallest_train} train / {smallest_test} test rows, need >= 2 each",
        )
        need(0.0 <= self.tree_prob <= 1.0, f"tree_prob={self.tree_prob} not in [0, 1]")
        need(0.0 <= self.cat_prob <= 1.0, f"cat_prob={self.cat_prob} not in [0, 1]")
        need(self.attempts >= 1, f"attempts={self.attempts} must be >= 1")
        need(1 <= self.sine_terms <= 256, f"sine_terms={self.sine_terms} not in [1, 256]")
        need(
            self.sine_table >= 0 and self.sine_table % 128 == 0,
            f"sine_table={self.sine_table} must be 0 or a positive multiple of 128",
        )
        need(self.tree_candidates >= 1, f"tree_candidates={self.tree_candidates} must be >= 1")
        need(
            self.tree_tail_candidates >= 0,
            f"tree_tail_candidates={self.tree_tail_candidates} must be >= 0",
        )
        need(self.chunk_size >= 1, f"chunk_size={self.chunk_size} must be >= 1")
        need(
            self.task_block >= 1 and self.chunk_size % self.task_block == 0,
            f"task_block={self.task_block} must be >= 1 and divide chunk_size={self.chunk_size}",
        )
        need(
            len(self.widths) > 0 and list(self.widths) == sorted(set(self.widths)),
            f"widths={self.widths} must be distinct and increasing",
        )
        need(
            self.widths[-1] >= self.max_hidden,
            f"largest width {self.widths[-1]} < max_hidden={self.max_hidden}",
        )
        need(
            self.max_hidden >= 2 * self.max_features + 1,
            f"max_hidden={self.max_hidden} < 2*max_features+1={2 * self.max_features + 1} "
            "(a causal MLP reads features and target off distinct hidden units)",
        )

    def replace(self, **changes) -> PriorConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["widths"] = list(self.widths)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PriorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PriorConfigError(f"unknown prior settings: {sorted(unknown)}")
        data = dict(data)
        if "widths" in data:
            data["widths"] = tuple(data["widths"])
        return cls(**data)
