"""`mllm-jax train`: load the run config (YAML + --set overrides), train or resume, report."""

from __future__ import annotations

from pathlib import Path

from mllm_jax.config import ConfigError, load_config
from mllm_jax.model.config import ConfigError as ModelConfigError
from mllm_jax.model.hf import CheckpointError
from mllm_jax.model.lora import LoRAError
from mllm_jax.train.batches import BatchError, DataExhaustedError
from mllm_jax.train.checkpoint import CheckpointMismatchError, CheckpointReadError
from mllm_jax.train.config import TrainConfig
from mllm_jax.train.mesh import MeshError

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
)


def train_command(config_path: Path, overrides: list[str], stop_at: int | None) -> str:
    """Runs `mllm-jax train`; returns the summary line it prints."""
    from mllm_jax.train.loop import train

    config = load_config(TrainConfig, config_path, overrides)
    result = train(config, stop_at=stop_at)
    last = next((h for h in reversed(result.history) if h.get("event") == "train"), None)
    parts = [f"step {result.step}/{result.total_steps}", f"run {result.run_dir}"]
    if last is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if result.best is not None:
        parts.append(f"best val_loss {result.best['val_loss']:.4f} at step {result.best['step']}")
    return ", ".join(parts)
