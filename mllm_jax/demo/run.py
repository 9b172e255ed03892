"""`run_demo`: the whole pipeline, stage by stage, into one run directory.

    <out>/demo.yaml        the resolved config (a rerun must match it)
    <out>/stages.json      finished stages with wall/CPU seconds, budget, load average
    <out>/data/<corpus>/   task shards + manifest, as `mllm-jax generate` writes (generate)
    <out>/train/           the training run: config, checkpoints, metrics.jsonl  (train)
    <out>/model/           the trained model as a Hugging Face checkpoint        (export)
    <out>/eval/<group>/    harness results, summary and plots per table group    (eval)
    <out>/report/          metrics.json, summary.md, loss.png, accuracy.png      (report)

Interrupting (Ctrl-C) leaves nothing half-written: a corpus is finished only once its
manifest is written (an interrupted one resumes after its last complete shard), the
export is renamed into place when complete, training resumes from its newest checkpoint,
the evaluation log keeps every finished result, and `stages.json` lists only finished
stages. Running the same command again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from mllm_jax.demo.config import DemoConfig, resolve_paths
from mllm_jax.demo.evaluate import run_eval
from mllm_jax.demo.generate import acceptance_line, finished_corpus, generate_corpus
from mllm_jax.demo.report import update_timings, write_report
from mllm_jax.demo.stages import StageBook
from mllm_jax.foundation.config import ConfigError, load_config, save_config, to_dict
from mllm_jax.model.config import Qwen2Config

CONFIG_FILE = "demo.yaml"
MODEL_DIR = "model"
JAX_CACHE_DIR = ".jax_cache"
# Settings that may change between a run and its continuation: they do not change what
# any stage computes.
RESUME_FREE = ("budgets", "compilation_cache")


class RunDirectoryError(ValueError):
    """The output directory cannot take this run (another config, not a demo directory)."""


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{where}.{key}" if where else str(key)
            out += _differences(saved.get(key), current.get(key), sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        out = []
        for i, (a, b) in enumerate(zip(saved, current, strict=True)):
            out += _differences(a, b, f"{where}.{i}")
        return out
    return [] if saved == current else [f"{where}: {saved!r} in the run, {current!r} now"]


def prepare_directory(out: Path, config: DemoConfig, *, restart: bool) -> None:
    """Creates `out` (or checks that it continues this config) and saves the config."""
    saved_path = out / CONFIG_FILE
    if out.exists() and not out.is_dir():  # was a NotADirectoryError traceback
        raise RunDirectoryError(f"--out {out} is a file, not a directory")
    if restart and out.exists():
        if not saved_path.exists() and any(out.iterdir()):
            raise RunDirectoryError(
                f"{out} is not empty and holds no {CONFIG_FILE}: not a demo run directory, "
                "refusing to delete it; choose another --out"
            )
        shutil.rmtree(out)
    if saved_path.exists():
        saved = to_dict(load_config(DemoConfig, saved_path))
        current = to_dict(config)
        for key in RESUME_FREE:
            saved.pop(key, None)
            current.pop(key, None)
        changed = _differences(saved, current)
        if changed:
            shown = "; ".join(changed[:5]) + (
                f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
            )
            raise RunDirectoryError(
                f"{out} holds a demo run with another config ({shown}); rerun with the same "
                "settings to continue it, pass --restart to start it over, or choose another --out"
            )
    elif out.exists() and any(p.name != JAX_CACHE_DIR for p in out.iterdir()):
        raise RunDirectoryError(
            f"{out} is not empty and holds no {CONFIG_FILE}: choose another --out (or an "
            "empty directory)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        raise RunDirectoryError(f"--out {out}: cannot create the directory ({reason})") from None
    save_config(config, saved_path)


def enable_compilation_cache(directory: Path) -> None:
    """Persists compiled XLA programs, so a rerun after an interrupt skips compilation."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def model_facts(model_dir: Path) -> dict[str, Any]:
    """Layers, widths and parameter count of an HF checkpoint directory."""
    config = Qwen2Config.from_json_file(model_dir / "config.json")
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "vocab": config.vocab_size,
        "tied_embeddings": config.tie_word_embeddings,
        "parameters": config.num_parameters(),
    }


def run_demo(
    config: DemoConfig,
    out: Path,
    *,
    restart: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs (or continues) the demo into `out`; returns the report's metrics.

    Raises RunDirectoryError when `out` holds another run, ConfigError for settings the
    stages refuse, and whatever a stage raises (the run directory stays resumable).
    """
    console = console or Console()
    out = Path(out).absolute()
    prepare_directory(out, config, restart=restart)
    if config.compilation_cache:
        enable_compilation_cache(out / JAX_CACHE_DIR)
    book = StageBook(out, config.budgets, console)
    train_config = resolve_paths(config, out)
    if not progress:
        train_config = dataclasses.replace(
            train_config, logging=dataclasses.replace(train_config.logging, progress=False)
        )
    train_dir = Path(train_config.run_dir)
    model_dir = out / MODEL_DIR
    total = 5

    def skip(name: str, number: int) -> bool:
        if book.done(name):
            console.print(f"[dim]{number}/{total} {name}: done in an earlier run[/]")
            console.print(book.timing_line(name))
            return True
        return False

    if not skip("generate", 1):
        corpora = config.generate.corpora
        with book.run("generate", 1, total, "synthetic tasks from the prior, filtered") as d:
            for corpus in corpora:
                earlier = finished_corpus(out, corpus.name)
                if earlier is not None:
                    console.print(
                        f"corpus {corpus.name}: complete from an earlier run "
                        f"({acceptance_line(earlier)})"
                    )
                    continue
                console.print(
                    f"corpus [bold]{corpus.name}[/]: tasks {corpus.start}.."
                    f"{corpus.start + corpus.count - 1} of seed {config.generate.seed}"
                    + (" with consensus rows" if corpus.consensus else "")
                )
                manifest = generate_corpus(out, corpus, config.generate, progress=progress)
                console.print(f"  {acceptance_line(manifest)}")
            d["corpora"] = [c.name for c in corpora]

    if not skip("train", 2):
        from mllm_jax.train.loop import train

        start = (
            f"the model in {train_config.model.base}"
            if train_config.model.base
            else f"a {train_config.model.preset} Qwen2 from scratch"
        )
        with book.run("train", 2, total, f"{start} on the task shards") as d:
            result = train(train_config, console=console)
            if result.step < train_config.total_steps:
                raise RuntimeError(
                    f"training stopped at step {result.step} of {train_config.total_steps}"
                )
            d["steps"] = result.step

    if not skip("export", 3):
        from mllm_jax.export.command import export_run

        with book.run("export", 3, total, "the trained model as a Hugging Face checkpoint"):
            for line in export_run(
                train_dir, merged=model_dir, dtype=config.export.dtype, overwrite=True
            ):
                console.print(line)

    if not skip("eval", 4):
        with book.run("eval", 4, total, "the model vs baselines, real + held-out tables"):
            run_eval(out, model_dir, config.eval, console, config.train)

    stage_bounds = [
        (s.name, lo) for s, (lo, _) in zip(train_config.stages, train_config.stage_bounds(),
                                           strict=True)
    ]  # fmt: skip
    with book.run("report", 5, total, "metrics, summary and plots"):
        metrics = write_report(
            out,
            stages=book.records,
            budgets=config.budgets,
            corpora=[c.name for c in config.generate.corpora],
            train_dir=train_dir,
            stage_bounds=stage_bounds,
            model=model_facts(model_dir),
            mode=train_config.mode,
            base=train_config.model.base,
        )
    metrics = update_timings(out, book.records)
    console.rule("[bold]done", align="left")
    cpu = sum(r["cpu_seconds"] for r in metrics["stages"].values())
    console.print(
        f"total {metrics['total_seconds']:.1f} s (budget {metrics['total_budget_seconds']:.0f} s, "
        f"CPU {cpu:.1f} s); report: {out / 'report' / 'summary.md'}"
    )
    return metrics


__all__ = ["ConfigError", "RunDirectoryError", "run_demo"]
