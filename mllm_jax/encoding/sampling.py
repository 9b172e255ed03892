"""Which rows of a task one training sequence shows: shots (labelled) and queries.

Shots come from the task's train split, queries from its test split. The number of shots
is drawn from a distribution over [min_shots, max_shots] (default log-uniform over 8..1024,
so every order of magnitude is equally common), capped by the rows available; up to
``max_queries`` queries share the sequence. In the warm-up stage (``consensus_only``)
only rows the random forest predicts correctly out of fold are eligible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mllm_jax.encoding.prompt import MAX_CLASSES
from mllm_jax.foundation.tasks import Task

ShotsDistribution = Literal["log_uniform", "uniform"]


class TaskEncodingError(ValueError):
    """A task cannot become a training sequence; the message names the task."""


class OverBudgetError(TaskEncodingError):
    """A task needs more tokens than the budget even with the fewest shots and one query."""


@dataclass(frozen=True)
class SamplingConfig:
    """How a task becomes one training sequence.

    Attributes:
        min_shots: fewest shots drawn (fewer only when the task has fewer train rows).
        max_shots: most shots drawn.
        shots_distribution: "log_uniform" (default) or "uniform" over [min, max].
        max_queries: queries (answered rows) per sequence, at most; the reference uses 50.
        token_budget: longest sequence in tokens, answer included; shots are dropped
            until the sequence fits (the reference's cutoff_len is 32,000).
        consensus_only: use only the rows marked in the task's ``consensus`` mask (the
            warm-up stage); tasks without a mask use all rows.
        clip_max: upper clip of the encoded numbers (None = reference, 999 = paper).
        max_classes: refuse tasks whose shots show more classes than this. The default
            (10) is the prior's default and the reference's; set it to the prior's
            ``max_classes`` (up to 64) to train on more: labels of 10 and above are
            printed as integers, one token per digit, all in the loss.
        permute_labels: give the task's classes a fresh random order in every prompt
            (the prior already relabels each task once; this makes a task seen again in
            another epoch show other label ids, so no label bias can be memorised).
    """

    min_shots: int = 8
    max_shots: int = 1024
    shots_distribution: ShotsDistribution = "log_uniform"
    max_queries: int = 50
    token_budget: int = 32000
    consensus_only: bool = False
    clip_max: int | None = None
    max_classes: int = MAX_CLASSES
    permute_labels: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_shots <= self.max_shots:
            raise ValueError(
                f"need 1 <= min_shots <= max_shots, got {self.min_shots}, {self.max_shots}"
            )
        if self.shots_distribution not in ("log_uniform", "uniform"):
            raise ValueError(f"unknown shots_distribution {self.shots_distribution!r}")
        if self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.max_classes < 1:
            raise ValueError(f"max_classes must be >= 1, got {self.max_classes}")
        if self.clip_max is not None and self.clip_max < 1:
            raise ValueError(f"clip_max must be None or >= 1, got {self.clip_max}")


def draw_shot_count(rng: np.random.Generator, config: SamplingConfig) -> int:
    """One draw from the configured shot-count distribution, in [min_shots, max_shots]."""
    lo, hi = config.min_shots, config.max_shots
    if config.shots_distribution == "uniform":
        return int(rng.integers(lo, hi + 1))
    value = math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))
    return min(max(int(value), lo), hi)


def select_rows(
    task: Task, rng: np.random.Generator, config: SamplingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Draws the shots and queries of one sequence.

    Returns:
        (shots, queries): i64 row indices into ``task.X``, each in random order; shots
        from the train split, queries from the test split.
    """
    eligible = np.ones(task.n_rows, dtype=bool)
    where = ""
    if config.consensus_only and task.consensus is not None:
        eligible = np.asarray(task.consensus, dtype=bool)
        where = " among its consensus rows"
    rows = np.arange(task.n_rows)
    train_pool = rows[: task.n_train][eligible[: task.n_train]]
    test_pool = rows[task.n_train :][eligible[task.n_train :]]
    name = f"task (seed={task.seed}, index={task.index})"
    if len(train_pool) == 0:
        raise TaskEncodingError(f"{name} has no train rows{where}")
    if len(test_pool) == 0:
        raise TaskEncodingError(f"{name} has no test rows{where}")
    n_shots = min(draw_shot_count(rng, config), len(train_pool))
    n_queries = min(config.max_queries, len(test_pool))
    shots = rng.choice(train_pool, size=n_shots, replace=False)
    queries = rng.choice(test_pool, size=n_queries, replace=False)
    return shots, queries
