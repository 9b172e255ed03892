"""The random forest both filters fit, and the per-task seeds that make them reproducible."""

from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
import sklearn
from sklearn.ensemble import RandomForestClassifier

from mllm_jax.filtering.config import FilterConfig


def make_forest(config: FilterConfig, n_features: int, seed: int) -> RandomForestClassifier:
    """A single-threaded forest with the config's shape.

    ``n_jobs=1`` because parallelism lives one level up (one worker process per core);
    threads inside a worker would only compete with the other workers.
    """
    max_features = config.max_features
    if isinstance(max_features, int) and not isinstance(max_features, bool):
        max_features = min(max_features, n_features)
    return RandomForestClassifier(
        n_estimators=config.n_estimators,
        max_depth=config.max_depth,
        max_features=max_features,
        min_samples_leaf=config.min_samples_leaf,
        n_jobs=1,
        random_state=seed,
    )


def unchecked_sklearn() -> AbstractContextManager:
    """scikit-learn without per-call parameter validation and finiteness checks.

    A forest re-validates the parameters of every tree it builds and re-checks its inputs;
    at these task sizes that costs 10-18% of the filter's CPU. The filters check their
    inputs once up front (``inputs.py``: shapes, integer labels, finite values), so the
    forests compute exactly what they would with the checks on (tested).
    """
    return sklearn.config_context(skip_parameter_validation=True, assume_finite=True)


def task_seed(config_seed: int, corpus_seed: int, index: int) -> int:
    """The forest seed of task ``(corpus_seed, index)``: the same wherever it is filtered."""
    entropy = [int(config_seed) % 2**64, int(corpus_seed) % 2**64, int(index) % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def sub_seed(seed: int, part: int) -> int:
    """An independent seed for part ``part`` >= 0 (e.g. a fold) of the work seeded by ``seed``."""
    return int(np.random.SeedSequence([int(seed) % 2**64, int(part)]).generate_state(1)[0])
