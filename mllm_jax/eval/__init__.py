"""Evaluation harness: datasets, the reference protocol, baselines, metrics, reports, plots.

    from mllm_jax.eval import resolve_datasets, resolve_methods, run_evaluation
    datasets = resolve_datasets(["/path/to/tables", "iris"])
    run_evaluation(datasets, resolve_methods(["rf", "xgb"]), shots=[8, 64], seeds=[0, 1],
                   out_dir="eval_out")

Any object with `fit(X, y)`, `predict_proba(X)` and `classes_` is a method (`Classifier`);
the LLM classifier of `mllm_jax.infer` joins through `resolve_methods(..., model_dir=...)`.
"""

from mllm_jax.eval.datasets import resolve_datasets
from mllm_jax.eval.estimator import Classifier, MethodFactory
from mllm_jax.eval.methods import MethodUnavailableError, resolve_methods
from mllm_jax.eval.metrics import METRICS, compute_metrics
from mllm_jax.eval.protocol import Episode, Plan, PlanEntry, Protocol, build_plan, reference_shots
from mllm_jax.eval.run import (
    EntryPrediction,
    RunDirectoryError,
    RunSummary,
    evaluate_entry,
    predict_entry,
    run_evaluation,
)
from mllm_jax.foundation.tables import Dataset, DatasetError, load_csv, load_dataset

__all__ = [
    "METRICS",
    "Classifier",
    "Dataset",
    "DatasetError",
    "EntryPrediction",
    "Episode",
    "MethodFactory",
    "MethodUnavailableError",
    "Plan",
    "PlanEntry",
    "Protocol",
    "RunDirectoryError",
    "RunSummary",
    "build_plan",
    "compute_metrics",
    "evaluate_entry",
    "load_csv",
    "load_dataset",
    "predict_entry",
    "reference_shots",
    "resolve_datasets",
    "resolve_methods",
    "run_evaluation",
]
