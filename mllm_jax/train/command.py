"""`mllm-jax train`: load the run config (YAML + --set overrides), train or resume, report;
`mllm-jax runs show`: a run directory's state as text (`mllm_jax.runs.inspect`)."""

from __future__ import annotations

import time
from pathlib import Path

from mllm_jax.data.shards import CorpusError
from mllm_jax.encoding.tokens import TokenizerFileError
from mllm_jax.foundation.config import ConfigError, load_config
from mllm_jax.foundation.mesh import MeshError
from mllm_jax.model.config import ConfigError as ModelConfigError
from mllm_jax.model.hf import CheckpointError
from mllm_jax.model.lora import LoRAError
from mllm_jax.runs.checkpoint import CheckpointMismatchError, CheckpointReadError
from mllm_jax.runs.config import TrainConfig
from mllm_jax.runs.inspect import RunInfo, RunInspectError, StageInfo
from mllm_jax.train.batches import BatchError, DataExhaustedError
from mllm_jax.train.loop import train

# Errors that are the user's input, reported as one line (exit status 2).
USAGE_ERRORS = (
    ConfigError,
    ModelConfigError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointReadError,
    LoRAError,
    BatchError,
    DataExhaustedError,
    FileNotFoundError,
    MeshError,
    CorpusError,
    TokenizerFileError,
)


def train_command(config_path: Path, overrides: list[str], stop_at: int | None) -> str:
    """Runs `mllm-jax train`; returns the summary line it prints."""
    config = load_config(TrainConfig, config_path, overrides)
    result = train(config, stop_at=stop_at)
    last = next((h for h in reversed(result.history) if h.get("event") == "train"), None)
    parts = [f"step {result.step}/{result.total_steps}", f"run {result.run_dir}"]
    if last is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if result.best is not None:
        parts.append(f"best val_loss {result.best['val_loss']:.4f} at step {result.best['step']}")
    return ", ".join(parts)


# ------------------------------------------------------------------ mllm-jax runs show

# Errors of `runs show` that are the user's input (exit status 2).
RUNS_ERRORS = (ConfigError, RunInspectError)

_BEST_SHOWN = ("val_label_accuracy", "val_accuracy")  # beside val_loss, where logged


def _stage_text(stage: StageInfo) -> str:
    if stage.first_step is None:
        return f"{stage.name} ({stage.epochs:g} epochs, steps resolved when training starts)"
    return f"{stage.name} (steps {stage.first_step}-{stage.last_step})"


def _when(unix: int | None) -> str:
    if unix is None:
        return ""
    return ", set aside " + time.strftime("%Y-%m-%d %H:%M", time.localtime(unix))


def render_run(info: RunInfo) -> str:
    """`mllm-jax runs show`'s text: one fact per line, the next `train`'s effect last."""
    lines = [f"run {info.run_dir} ({info.mode} fine-tuning, config {info.config_file})"]
    total = "?" if info.total_steps is None else str(info.total_steps)
    stages = ", ".join(_stage_text(s) for s in info.stages)
    lines.append(f"stages: {stages}; {total} steps in all")
    if info.checkpoints:
        lines.append(f"checkpoints in {info.checkpoint_dir}:")
        for step in info.checkpoints:
            state = "readable" if step.readable else f"UNREADABLE ({step.problem})"
            stage = f", stage {step.stage}" if step.stage else ""
            lines.append(f"  step {step.step}: {state}{stage}")
    else:
        lines.append(f"checkpoints: none in {info.checkpoint_dir}")
    if info.best is None:
        lines.append("best: none (no validation checkpoint)")
    else:
        best = info.best
        numbers = [] if best.val_loss is None else [f"val_loss {best.val_loss:.4f}"]
        numbers += [f"{k} {best.metrics[k]:.4f}" for k in _BEST_SHOWN if k in best.metrics]
        state = "" if best.readable else f", UNREADABLE ({best.problem})"
        lines.append(f"best: step {best.step}" + "".join(f", {n}" for n in numbers) + state)
    for aside in info.set_aside:
        step = "" if aside.step is None else f"step {aside.step}"
        lines.append(f"set aside (unreadable): {aside.name} ({step}{_when(aside.time)})")
    if info.last_logged is None:
        lines.append("last logged: nothing in metrics.jsonl")
    else:
        logged = info.last_logged
        loss = "" if logged.loss is None else f", loss {logged.loss:.4f}"
        stage = "" if logged.stage is None else f" (stage {logged.stage})"
        lines.append(f"last logged: step {logged.step}{loss}{stage}")
    lines += [f"note: {note}" for note in info.notes]
    lines.append(f"next: {info.next.line}")
    return "\n".join(lines)
