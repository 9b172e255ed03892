"""The evaluation protocol: which rows each method sees as shots and which it must classify.

A plan maps (dataset, seed, shots) to row indices, deterministically. Two ways to draw the
shots (docs/eval.md compares them with the reference's `data_chunk_prep.py`):

- `"nested"` (default): one test set for every seed and shot count (20% split, seed 42,
  stratified), and per seed one uniform random order of the training split,
  `np.random.default_rng(seed).permutation(n_train)`; the first `shots` rows of it are
  the shots, in that order. The 16 shots of a seed therefore contain its 8 shots, so a
  curve over shot counts moves by adding rows, not by redrawing them. One shot set serves
  all test rows, which is what a prefix-cached in-context learner wants.
- `"reference"`: MachineLearningLM's evaluation. The test split is cut into chunks of 50
  rows in split order; chunk i gets its own shots, `train.sample(n=shots,
  random_state=split_seed + i)` (uniform, without replacement, the same for every seed),
  put in the order `sample(frac=1, random_state=seed)`; the seed only reorders rows and
  columns. Use with `stratify=False` (`Protocol.reference()`) to get the reference's rows.

Both draw shots uniformly (not stratified), as the reference does: with few shots some
classes can be missing from them; methods then give those classes probability 0. When
`shots` exceeds the training split, the whole split is used (the reference's rule) and
the entry records the number actually used.

Features are shown with columns shuffled per seed, `random.Random(seed).shuffle`, the
reference's `col_shuffle`. Every table is planned whatever its number of classes (the
in-context learner spells class codes of 10 and above with several tokens and scores them
exactly, docs/infer.md); `max_classes` skips larger tables with a recorded reason, e.g.
10 for the paper's limit of one label token per class.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from sklearn.model_selection import train_test_split

from mllm_jax.foundation.tables import Dataset, show_value

Sampling = Literal["nested", "reference"]


@dataclass(frozen=True)
class Protocol:
    """How test rows and shots are chosen; the defaults are this project's protocol."""

    test_size: float = 0.2
    split_seed: int = 42
    stratify: bool = True
    sampling: Sampling = "nested"
    test_chunk: int = 50  # "reference" sampling: test rows sharing one shot draw
    shuffle_columns: bool = True
    max_classes: int | None = None  # skip tables with more classes (None: none skipped)
    max_test: int | None = None  # stratified subsample of the test split, for quick runs

    @classmethod
    def reference(cls, **changes: object) -> Protocol:
        """MachineLearningLM's evaluation split and shot draws."""
        return cls(**{"stratify": False, "sampling": "reference", **changes})

    def __post_init__(self) -> None:
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if self.sampling not in ("nested", "reference"):
            raise ValueError(f"sampling must be 'nested' or 'reference', got {self.sampling!r}")
        if self.test_chunk < 1:
            raise ValueError(f"test_chunk must be >= 1, got {self.test_chunk}")
        if self.max_classes is not None and self.max_classes < 2:
            raise ValueError(f"max_classes must be >= 2 or None, got {self.max_classes}")
        if self.max_test is not None and self.max_test < 1:
            raise ValueError(f"max_test must be >= 1 or None, got {self.max_test}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Episode:
    """One fit/predict call: shots in prompt order and the test rows they serve.

    train: i64[shots] row indices into the dataset.
    test: i64[n] row indices into the dataset.
    """

    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class PlanEntry:
    """The rows of one (dataset, seed, shots) evaluation.

    columns: feature column positions in the order shown to the methods.
    episodes: one for "nested" sampling, one per test chunk for "reference".
    """

    dataset: str
    seed: int
    shots: int
    columns: tuple[int, ...]
    episodes: tuple[Episode, ...]

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.dataset, self.seed, self.shots)

    @property
    def shots_used(self) -> int:
        return len(self.episodes[0].train)

    @property
    def test(self) -> np.ndarray:
        """i64[n_test]: every test row, in the order metrics see the predictions."""
        return np.concatenate([episode.test for episode in self.episodes])


@dataclass(frozen=True)
class Skipped:
    dataset: str
    reason: str


@dataclass(frozen=True)
class Plan:
    entries: tuple[PlanEntry, ...]
    skipped: tuple[Skipped, ...]


def parse_int_list(text: str, what: str) -> list[int]:
    """`"8,16,32"` -> [8, 16, 32]; a clear error names `what` on bad input."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from error
    if not values:
        raise ValueError(f"{what}: empty list")
    return values


def reference_shots(max_shots: int = 1024) -> list[int]:
    """8, 16, ..., max_shots: the reference's shot counts."""
    return [2**k for k in range(3, max_shots.bit_length()) if 2**k <= max_shots]


def split_rows(dataset: Dataset, protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices, each in the split's shuffled order.

    Raises ValueError when a stratified split is impossible (a class with one row, or fewer
    test rows than classes).
    """
    rows = np.arange(dataset.n_rows)
    stratify = dataset.labels if protocol.stratify else None
    if protocol.stratify:
        counts = np.bincount(dataset.labels, minlength=dataset.n_classes)
        rarest = int(np.argmin(counts))
        if counts[rarest] < 2:
            raise ValueError(
                f"class {show_value(dataset.classes[rarest])} has {counts[rarest]} row; a stratified "
                "split needs at least 2 per class (use stratify=False)"
            )
    train, test = train_test_split(
        rows, test_size=protocol.test_size, random_state=protocol.split_seed, stratify=stratify
    )
    if protocol.max_test is not None and len(test) > protocol.max_test:
        test_labels = dataset.labels[test] if protocol.stratify else None
        test = train_test_split(
            test,
            train_size=protocol.max_test,
            random_state=protocol.split_seed,
            stratify=test_labels,
        )[0]
    return train, test


def column_order(n_features: int, seed: int, shuffle: bool) -> tuple[int, ...]:
    order = list(range(n_features))
    if shuffle:
        random.Random(seed).shuffle(order)
    return tuple(order)


def nested_episode(train: np.ndarray, test: np.ndarray, seed: int, shots: int) -> Episode:
    order = np.random.default_rng(seed).permutation(len(train))
    return Episode(train=train[order[:shots]], test=test)


def reference_episodes(
    train: np.ndarray, test: np.ndarray, seed: int, shots: int, protocol: Protocol
) -> tuple[Episode, ...]:
    # np.random.RandomState(s).permutation(n)[:k] is exactly pandas' `sample(n=k,
    # random_state=s)` (a test checks it), which the reference calls on its train frame.
    episodes = []
    for i, start in enumerate(range(0, len(test), protocol.test_chunk)):
        if shots <= len(train):
            chosen = train[
                np.random.RandomState(protocol.split_seed + i).permutation(len(train))[:shots]
            ]
        else:
            chosen = train
        chosen = chosen[np.random.RandomState(seed).permutation(len(chosen))]
        episodes.append(Episode(train=chosen, test=test[start : start + protocol.test_chunk]))
    return tuple(episodes)


def build_plan(
    datasets: Sequence[Dataset],
    shots: Sequence[int],
    seeds: Sequence[int],
    protocol: Protocol | None = None,
) -> Plan:
    """Every (dataset, shots, seed) entry, in that nesting order, and the skipped tables."""
    protocol = protocol or Protocol()
    if any(n < 1 for n in shots):
        raise ValueError(f"shots must be >= 1, got {list(shots)}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    shot_counts = sorted(set(shots))
    seed_list = list(dict.fromkeys(seeds))

    entries: list[PlanEntry] = []
    skipped: list[Skipped] = []
    for dataset in datasets:
        if protocol.max_classes is not None and dataset.n_classes > protocol.max_classes:
            skipped.append(
                Skipped(
                    dataset.name,
                    f"{dataset.n_classes} classes, more than the protocol's max_classes "
                    f"{protocol.max_classes}",
                )
            )
            continue
        try:
            train, test = split_rows(dataset, protocol)
        except ValueError as error:
            skipped.append(Skipped(dataset.name, str(error)))
            continue
        n_features = dataset.features.shape[1]
        for n_shots in shot_counts:
            for seed in seed_list:
                if protocol.sampling == "nested":
                    episodes: tuple[Episode, ...] = (nested_episode(train, test, seed, n_shots),)
                else:
                    episodes = reference_episodes(train, test, seed, n_shots, protocol)
                entries.append(
                    PlanEntry(
                        dataset=dataset.name,
                        seed=seed,
                        shots=n_shots,
                        columns=column_order(n_features, seed, protocol.shuffle_columns),
                        episodes=episodes,
                    )
                )
    return Plan(entries=tuple(entries), skipped=tuple(skipped))
