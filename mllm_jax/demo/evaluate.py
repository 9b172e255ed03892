"""The demo's eval stage: the exported model against the baselines, on real tables and on
held-out synthetic tasks, with the evaluation harness of `mllm_jax.eval`.

Two harness runs, each resumable on its own: `<out>/eval/real` (the bundled tables, or
`eval.datasets`) and `<out>/eval/synthetic` (the first `eval.heldout_tables` accepted
tasks of the held-out corpus, each treated as a table: the harness makes its own 20%
test split, as for a real table).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mllm_jax.assets import bundled_datasets
from mllm_jax.demo.config import EvalConfig
from mllm_jax.demo.generate import corpus_dir
from mllm_jax.encoding.sampling import SamplingConfig
from mllm_jax.eval import Protocol, resolve_datasets, resolve_methods, run_evaluation
from mllm_jax.eval.datasets import load_corpus_tables
from mllm_jax.foundation.tables import Dataset
from mllm_jax.runs.config import TrainConfig

MODEL_METHOD = "mllm"
GROUPS = ("real", "synthetic")


def bundled_tables() -> list[str]:
    """The real tables shipped in the package (cmc, eucalyptus, golf_play_dataset_extended)."""
    return [str(p) for p in sorted(bundled_datasets().glob("*.csv.gz"))]


def eval_tables(out: Path, config: EvalConfig) -> dict[str, list[Dataset]]:
    """The tables of each group ("real", "synthetic")."""
    tables = {"real": resolve_datasets(config.datasets or bundled_tables())}
    synthetic: list[Dataset] = []
    if config.heldout is not None and config.heldout_tables:
        directory = corpus_dir(out, config.heldout)
        synthetic = load_corpus_tables(directory, limit=config.heldout_tables)
    tables["synthetic"] = synthetic
    return tables


def trained_queries(train: TrainConfig) -> int | None:
    """The most queries per prompt the model saw in its last training stage (None: the
    stage's data is not task shards)."""
    data = train.stages[-1].data
    if data.kind != "shards":
        return None
    sampling = data.pipeline.get("sampling", {})
    return int(sampling.get("max_queries", SamplingConfig().max_queries))


def run_eval(
    out: Path, model_dir: Path, config: EvalConfig, console: Console, train: TrainConfig
) -> dict[str, Path]:
    """Runs every group; returns group -> harness output directory (groups with tables).

    The model answers as many queries per prompt as it was trained on (`chunk_size`),
    unless `config.model_options` says otherwise.
    """
    options = dict(config.model_options)
    queries = trained_queries(train)
    if queries is not None:
        options.setdefault("chunk_size", queries)
    methods = resolve_methods(
        config.methods,
        model_dir=model_dir,
        model_name=MODEL_METHOD,
        model_options=options,
        permuted_shots=config.permuted_shots,
    )
    protocol = Protocol(max_test=config.max_test)
    written = {}
    for group, tables in eval_tables(out, config).items():
        if not tables:
            continue
        console.print(
            f"[bold]{group}[/] tables: " + ", ".join(f"{t.name} ({t.n_classes} classes, "
            f"{t.n_rows} rows)" for t in tables)
        )  # fmt: skip
        directory = out / "eval" / group
        run_evaluation(
            tables,
            methods,
            config.shots,
            config.seeds,
            directory,
            protocol,
            console=console,
        )
        written[group] = directory
    return written
