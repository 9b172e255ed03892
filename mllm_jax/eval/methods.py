"""The methods an evaluation runs, by name: the baselines of `baselines.py` and the LLM
classifier of `mllm_jax.infer`, which plugs in through `llm_method` when that package
exists. Each is a factory `seed -> Classifier` (`estimator.py`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Self

import numpy as np
import pandas as pd

from mllm_jax.eval.baselines import BASELINES
from mllm_jax.eval.estimator import Classifier, MethodFactory

LLM_PACKAGE = "mllm_jax.infer"


class MethodUnavailableError(RuntimeError):
    """A requested method whose implementation is not installed."""


def llm_method(model_dir: str | os.PathLike[str], **options: object) -> MethodFactory:
    """A factory for `mllm_jax.infer.MLLMClassifier(model_dir, **options)`.

    The seed goes to the classifier's `random_state` or `seed` parameter when it has one.
    """
    if importlib.util.find_spec(LLM_PACKAGE) is None:
        raise MethodUnavailableError(
            f"--model needs the LLM classifier ({LLM_PACKAGE}.MLLMClassifier), which is "
            "not available yet in this installation; run without --model to evaluate the "
            "baselines only"
        )
    from mllm_jax.infer import MLLMClassifier  # type: ignore[import-not-found]

    accepted = inspect.signature(MLLMClassifier).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown model options {unknown}; MLLMClassifier takes {list(accepted)}")
    seed_name = next((p for p in ("random_state", "seed") if p in accepted), None)

    def make(seed: int) -> Classifier:
        extra = {seed_name: seed} if seed_name else {}
        return MLLMClassifier(str(model_dir), **options, **extra)

    return make


class PermutedShotLabels:
    """A classifier fitted on its shots' labels shuffled among the shots.

    The in-context test that cannot be faked: the class counts stay, the link between a
    shot's features and its label is broken. A model that reads the shots loses accuracy
    here; one that only counts labels (or ignores the prompt) does not.
    """

    def __init__(self, base: Classifier, seed: int) -> None:
        self.base = base
        self.seed = seed

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> Self:
        shuffled = np.asarray(y)[np.random.default_rng(self.seed).permutation(len(y))]
        self.base.fit(X, shuffled)
        self.classes_ = self.base.classes_
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        return self.base.predict_proba(X)


def permuted(factory: MethodFactory) -> MethodFactory:
    """`factory`'s classifiers, fitted on shot labels shuffled among the shots."""

    def make(seed: int) -> Classifier:
        return PermutedShotLabels(factory(seed), seed)

    return make


def resolve_methods(
    names: Sequence[str],
    model_dir: str | os.PathLike[str] | None = None,
    model_name: str = "mllm",
    model_options: Mapping[str, object] | None = None,
    permuted_shots: bool = False,
) -> dict[str, MethodFactory]:
    """Baseline names (see `baselines.BASELINES`) plus the LLM under `model_name` if given
    (`model_options` go to its constructor), and with `permuted_shots` the LLM again as
    `<model_name>_permuted`, fitted on shuffled shot labels (`PermutedShotLabels`)."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(BASELINES)}")
    methods: dict[str, MethodFactory] = {name: BASELINES[name] for name in dict.fromkeys(names)}
    if model_dir is not None:
        if model_name in methods:
            raise ValueError(f"method name {model_name!r} is taken by a baseline")
        methods[model_name] = llm_method(model_dir, **(model_options or {}))
        if permuted_shots:
            methods[f"{model_name}_permuted"] = permuted(methods[model_name])
    elif permuted_shots:
        raise ValueError("permuted shot labels are a test of the LLM: they need a model")
    if not methods:
        raise ValueError("no methods to evaluate")
    return methods
