"""The `mllm-jax` command line: one sub-command per pipeline stage.

Each command imports its stage lazily so that `mllm-jax --help` stays fast and a stage's
heavy dependencies load only when that stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mllm_jax import __version__

app = typer.Typer(
    name="mllm-jax",
    help="MachineLearningLM in JAX: generate synthetic tasks, train, export, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mllm-jax {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """MachineLearningLM in JAX."""


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Corpus directory (shared by processes).")],
    count: Annotated[int, typer.Option(help="Tasks in the corpus (all processes together).")],
    seed: Annotated[int, typer.Option(help="Corpus seed.")] = 0,
    start: Annotated[int, typer.Option(help="Index of the corpus's first task.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Tasks per shard file.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Tasks per prior call.")] = 256,
    filter_: Annotated[
        bool, typer.Option("--filter/--no-filter", help="Keep only tasks a random forest learns.")
    ] = False,
    consensus: Annotated[
        bool, typer.Option(help="With --filter: store the consensus row mask (warm-up corpus).")
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Filter worker processes (default: one per core).")
    ] = None,
    prior_processes: Annotated[
        int,
        typer.Option(
            help="CPU hosts: run the prior in this many single-device processes pinned one "
            "per core (0: this process's JAX devices)."
        ),
    ] = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="prior.<field>=value or filter.<field>=value (repeatable)."),
    ] = None,
    process_index: Annotated[
        int | None, typer.Option(help="This process's slot (default: jax.process_index()).")
    ] = None,
    process_count: Annotated[
        int | None, typer.Option(help="Processes sharing the range (default: jax's).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace this process's finished output.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Synthetic tasks from the prior (optionally random-forest filtered) into ArrayRecord
    shards + manifest-pP.json; prints the report as one JSON line."""
    import json

    from mllm_jax.data.generate import GenerateError, build_config
    from mllm_jax.data.generate import generate as run_generate

    try:
        config = build_config(
            seed=seed,
            start=start,
            count=count,
            filter_tasks=filter_,
            consensus=consensus,
            overrides=set_ or [],
            process_index=process_index,
            process_count=process_count,
            shard_size=shard_size,
            batch_size=batch_size,
            workers=workers,
            overwrite=overwrite,
            prior_processes=prior_processes,
        )
        manifest = run_generate(config, out, progress=progress)
    except KeyboardInterrupt:
        # The journal records the complete shards; the next run continues after them.
        typer.echo(
            "interrupted: rerun the same command to continue after the last complete shard",
            err=True,
        )
        raise typer.Exit(130) from None
    except GenerateError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    summary = {k: v for k, v in manifest.items() if k not in ("prior", "filter", "shards")}
    summary.pop("invalid_indices")
    typer.echo(json.dumps({**summary, "shards": len(manifest["shards"])}))


@app.command("eval")
def eval_(
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="CSV files, directories of CSVs, scikit-learn names (iris, wine, "
            "breast_cancer, digits), or task corpora written by generate (each task a "
            "table); repeat or comma-separate.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory; rerunning resumes.")],
    shots: Annotated[str, typer.Option(help="Shot counts.")] = "8,16,32,64,128,256,512,1024",
    seeds: Annotated[str, typer.Option(help="Seeds.")] = "0,1",
    methods: Annotated[str, typer.Option(help="Baselines to run.")] = "rf,knn,xgb,lr,majority",
    model: Annotated[
        Path | None, typer.Option(help="Also evaluate this model (needs mllm_jax.infer).")
    ] = None,
    target: Annotated[str, typer.Option(help="Target column of the CSV files.")] = "label",
    protocol: Annotated[
        str, typer.Option(help="'nested' (ours) or 'reference' (MachineLearningLM's draws).")
    ] = "nested",
    max_test: Annotated[int | None, typer.Option(help="At most this many test rows.")] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots.")] = True,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first failing entry.")] = False,
    jobs: Annotated[int, typer.Option(help="Worker processes for the baselines.")] = 1,
    model_options: Annotated[
        str | None,
        typer.Option(
            help="MLLMClassifier options for --model, e.g. 'dtype=bfloat16,n_ensembles=2'."
        ),
    ] = None,
    permuted_shots: Annotated[
        bool,
        typer.Option(
            help="Also score --model fitted on shot labels shuffled among the shots "
            "(method <model>_permuted): a model that reads its shots loses accuracy."
        ),
    ] = False,
    max_corpus_tables: Annotated[
        int | None, typer.Option(help="Tables taken from each task corpus (its first tasks).")
    ] = None,
    vote: Annotated[
        bool | None,
        typer.Option(
            help="Score --model by MachineLearningLM's vote of 2 reordered prompts "
            "(n_ensembles=2, vote=reference); default: on with --protocol reference."
        ),
    ] = None,
) -> None:
    """Evaluate baselines (and a model) on real tables: results CSV/JSON, markdown, plots."""
    from mllm_jax.eval.command import USAGE_ERRORS, eval_command

    try:
        status = eval_command(
            data,
            out,
            shots,
            seeds,
            methods,
            target,
            model,
            protocol,
            max_test,
            plots,
            fail_fast,
            jobs,
            model_options,
            permuted_shots,
            max_corpus_tables,
            vote,
        )
    except USAGE_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    raise typer.Exit(status)


@app.command("predict")
def predict(
    model: Annotated[
        Path, typer.Option(help="HF Qwen2 checkpoint directory, or a training run directory.")
    ],
    train: Annotated[Path, typer.Option(help="Training CSV: the in-context examples.")],
    test: Annotated[Path, typer.Option(help="CSV of the rows to classify.")],
    out: Annotated[Path, typer.Option(help="Output CSV: proba_<class> columns + prediction.")],
    target: Annotated[str, typer.Option(help="Label column of the training CSV.")] = "label",
    adapter: Annotated[
        Path | None, typer.Option(help="PEFT LoRA adapter directory to apply to --model.")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="'score' (label probabilities) or 'generate'.")
    ] = "score",
    raw_prompt: Annotated[
        bool, typer.Option(help="system + newline + user, no chat template (reference eval).")
    ] = False,
    shots: Annotated[int | None, typer.Option(help="At most this many training rows.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Test rows per prompt.")] = 50,
    batch_size: Annotated[
        int | None, typer.Option(help="Prompts per model call (default: 1 on CPU, else 4).")
    ] = None,
    ensembles: Annotated[int, typer.Option(help="Shuffled prompts averaged.")] = 1,
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of shot draws and shuffles.")] = 0,
    yarn_factor: Annotated[float | None, typer.Option(help="YaRN factor for long prompts.")] = None,
    prefill_chunk: Annotated[int, typer.Option(help="Prompt tokens per model call.")] = 2048,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generation budget per prompt (generate mode).")
    ] = None,
    metrics: Annotated[Path | None, typer.Option(help="Append the summary JSON line here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Classify the rows of a CSV by in-context learning from a training CSV."""
    from mllm_jax.infer.command import USAGE_ERRORS, predict_command

    try:
        predict_command(
            model,
            train,
            test,
            out,
            target,
            metrics,
            overwrite,
            adapter_path=None if adapter is None else str(adapter),
            mode=mode,
            prompt_format="raw" if raw_prompt else "chat",
            n_shots=shots,
            chunk_size=chunk_size,
            batch_size=batch_size,
            n_ensembles=ensembles,
            dtype=dtype,
            random_state=seed,
            yarn_factor=yarn_factor,
            prefill_chunk=prefill_chunk,
            max_new_tokens=max_new_tokens,
        )
    except USAGE_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


@app.command("stats")
def stats(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Directory of *.csv / *.csv.gz with a label column (default: the 3 tables "
            "bundled with the package).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Writes stats.jsonl and stats.png.")] = Path(
        "runs/stats"
    ),
    rows: Annotated[int, typer.Option(help="Rows sampled per dataset.")] = 512,
    context: Annotated[int, typer.Option(help="Context length in tokens.")] = 32000,
    seed: Annotated[int, typer.Option(help="Seed of the row sample.")] = 0,
    model_dir: Annotated[
        Path | None, typer.Option(help="Local checkpoint with tokenizer.json (default: packaged).")
    ] = None,
) -> None:
    """Tokens per row and rows per context: our encoding vs plain CSV, on real datasets."""
    from mllm_jax.assets import bundled_datasets
    from mllm_jax.encoding.stats import run_stats
    from mllm_jax.encoding.tokens import PromptTokenizer, load_backend_tokenizer

    data_dir = bundled_datasets() if data_dir is None else data_dir
    try:
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data directory {data_dir} does not exist")
        if rows < 1 or context < 1:
            raise ValueError(f"--rows and --context must be >= 1, got {rows}, {context}")
        tokenizer = PromptTokenizer(load_backend_tokenizer(model_dir))
        run_stats(data_dir, out, tokenizer, rows=rows, context=context, seed=seed)
    except (FileNotFoundError, ValueError) as error:
        # A missing file, a table without a label column, a tokenizer that is not the
        # pinned one: the user's input, one line.
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


@app.command("train")
def train_(
    config: Annotated[Path, typer.Option("--config", help="YAML run config (TrainConfig).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: dotted.key=value (repeatable)."),
    ] = None,
    stop_at: Annotated[
        int | None,
        typer.Option(help="Stop after this global step, with a checkpoint; rerun to resume."),
    ] = None,
    coordinator: Annotated[
        str | None,
        typer.Option(help="Multi-host: host:port of process 0 (env JAX_COORDINATOR_ADDRESS)."),
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option(help="Multi-host: number of processes (env JAX_NUM_PROCESSES).")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option(help="Multi-host: this process's id (env JAX_PROCESS_ID).")
    ] = None,
) -> None:
    """Train or resume a run (LoRA or full) over the device mesh; writes the run directory.
    Multi-host: run the same command on every host (docs/multihost.md)."""
    from mllm_jax.foundation.distributed import DistributedConfig, DistributedError, initialize
    from mllm_jax.train.command import USAGE_ERRORS, train_command

    try:
        initialize(
            DistributedConfig.from_env(
                coordinator=coordinator, num_processes=num_processes, process_id=process_id
            )
        )
        typer.echo(train_command(config, set_ or [], stop_at))
    except KeyboardInterrupt:
        # Checkpoints are written to a temporary name and committed by orbax, so the newest
        # complete one is intact; the next run resumes from it.
        typer.echo(
            "interrupted: rerun the same command to resume from the newest checkpoint", err=True
        )
        raise typer.Exit(130) from None
    except DistributedError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    except USAGE_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


@app.command("export")
def export(
    run: Annotated[Path, typer.Option("--run", help="Training run directory (mllm-jax train).")],
    merged: Annotated[
        Path | None, typer.Option(help="Write the model with adapters merged here (HF).")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="Write the LoRA adapter here (PEFT format).")
    ] = None,
    step: Annotated[
        str | None, typer.Option(help="Checkpoint step or 'best' (default: the newest).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="dtype of the merged weights (default: the base's).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output directories.")] = False,
) -> None:
    """Export a training run: merged HF checkpoint and/or PEFT LoRA adapter."""
    from mllm_jax.export.command import USAGE_ERRORS, export_run, parse_step

    try:
        for line in export_run(
            run,
            merged=merged,
            adapter=adapter,
            step=parse_step(step),
            dtype=dtype,
            overwrite=overwrite,
        ):
            typer.echo(line)
    except USAGE_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


runs_app = typer.Typer(
    help="Inspect training run directories.", no_args_is_help=True, add_completion=False
)
app.add_typer(runs_app, name="runs")


@runs_app.command("show")
def runs_show(
    run: Annotated[Path, typer.Argument(help="Training run directory (mllm-jax train).")],
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """A run's stages, checkpoints (readable or not), best step, set-aside steps, last
    logged loss, and what `mllm-jax train --config RUN/config.yaml` would do next (start
    fresh, resume from which step, or nothing: finished). Reads metadata only."""
    from mllm_jax.runs.inspect import inspect_run
    from mllm_jax.train.command import RUNS_ERRORS, render_run

    try:
        info = inspect_run(run)
    except RUNS_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(info.to_json() if json_ else render_run(info))


@app.command("demo")
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Run directory; rerunning into it continues the run.")
    ] = Path("runs/demo"),
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML laid over the demo's settings (mllm_jax/assets/demo.yaml).",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: dotted.key=value (repeatable)."),
    ] = None,
    restart: Annotated[
        bool, typer.Option(help="Delete the run directory's earlier demo run and start over.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The whole pipeline on a CPU in minutes: generate + filter tasks, train a tiny Qwen2,
    export it, evaluate it against baselines, write <out>/report/. Ctrl-C is safe: rerun
    the same command to continue."""
    from mllm_jax.demo.cli import demo_command

    raise typer.Exit(demo_command(out, config, set_ or [], restart=restart, progress=progress))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
