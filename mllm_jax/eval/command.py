"""`mllm-jax eval`: parses the command's strings and runs `run_evaluation`.

Kept apart from `mllm_jax/cli.py` so the CLI module stays light: this module (and pandas,
scikit-learn, XGBoost) loads only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mllm_jax.eval.datasets import resolve_datasets
from mllm_jax.eval.methods import MethodUnavailableError, resolve_methods
from mllm_jax.eval.protocol import Protocol, parse_int_list
from mllm_jax.eval.run import RunDirectoryError, run_evaluation
from mllm_jax.foundation.tables import DatasetError

USAGE_ERRORS = (
    DatasetError,
    FileNotFoundError,
    MethodUnavailableError,
    RunDirectoryError,
    ValueError,
)


def split_specs(values: list[str]) -> list[str]:
    """`--data a.csv,b.csv --data dir` -> ["a.csv", "b.csv", "dir"]."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_options(text: str) -> dict[str, object]:
    """`"dtype=bfloat16,n_ensembles=2,yarn_factor=null"` -> {"dtype": "bfloat16", ...};
    values are read as YAML scalars (numbers, true/false, null, strings)."""
    import yaml

    options: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-options: {part!r} is not KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else None
    return options


def eval_command(
    data: list[str],
    out: Path,
    shots: str,
    seeds: str,
    methods: str,
    target: str = "label",
    model: Path | None = None,
    protocol: str = "nested",
    max_test: int | None = None,
    plots: bool = True,
    fail_fast: bool = False,
    jobs: int = 1,
    model_options: str | None = None,
    permuted_shots: bool = False,
    max_corpus_tables: int | None = None,
    vote: bool | None = None,
) -> int:
    """Runs the evaluation; returns the exit status (0 ok, 1 some entries failed).

    vote: score the model by the reference's vote of two reordered prompts (None: as the
    protocol does, on for "reference"); options given in model_options win.
    """
    console = Console(stderr=True)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if model_options and model is None:
        raise ValueError("--model-options needs --model")
    if protocol == "nested":
        chosen = Protocol(max_test=max_test)
    elif protocol == "reference":
        chosen = Protocol.reference(max_test=max_test)
    else:
        raise ValueError(f"--protocol must be 'nested' or 'reference', got {protocol!r}")
    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    options = parse_options(model_options or "")
    if vote and model is None:
        raise ValueError("--vote needs --model")
    if model is not None and (vote if vote is not None else protocol == "reference"):
        options = {"n_ensembles": 2, "vote": "reference", **options}
    factories = resolve_methods(
        method_names,
        model_dir=model,
        model_options=options,
        permuted_shots=permuted_shots,
    )
    shot_counts = parse_int_list(shots, "--shots")
    seed_list = parse_int_list(seeds, "--seeds")
    datasets = resolve_datasets(
        split_specs(data), target=target, max_corpus_tables=max_corpus_tables
    )
    for dataset in datasets:
        console.print(dataset.describe())
    summary = run_evaluation(
        datasets,
        factories,
        shot_counts,
        seed_list,
        out,
        chosen,
        on_error="raise" if fail_fast else "record",
        console=console,
        write_plots=plots,
        jobs=jobs,
    )
    console.print(
        f"{summary.completed} results computed, {summary.resumed} resumed, "
        f"{len(summary.errors)} errors, {len(summary.skipped)} datasets skipped; "
        f"reports in {summary.out_dir}"
    )
    return 1 if summary.errors else 0
