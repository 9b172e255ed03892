"""`mllm-jax export`: a training run's checkpoint -> merged HF checkpoint and/or PEFT adapter."""

from __future__ import annotations

from pathlib import Path

from mllm_jax.export.merged import save_merged_hf
from mllm_jax.foundation.config import ConfigError
from mllm_jax.foundation.directories import OutputDirectoryError, check_output_directory
from mllm_jax.model.config import ConfigError as ModelConfigError
from mllm_jax.model.hf import CheckpointError, load_hf, save_hf
from mllm_jax.model.lora import LoRAError, copy_adapters
from mllm_jax.model.peft import save_peft_adapter
from mllm_jax.runs.checkpoint import CheckpointMismatchError, CheckpointReadError
from mllm_jax.runs.loading import load_trained, prepare_base


class ExportUsageError(ValueError):
    """An export request that cannot be carried out as given."""


# Errors that are the user's input, reported as one line (exit status 2).
USAGE_ERRORS = (
    ExportUsageError,
    ConfigError,
    ModelConfigError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointReadError,
    LoRAError,
    FileNotFoundError,
    FileExistsError,
    OutputDirectoryError,
)


def parse_step(step: str | None) -> int | str | None:
    """CLI --step: None (newest), "best", or a step number."""
    if step is None or step == "best":
        return step
    if not step.isdigit():
        raise ExportUsageError(f"--step must be a step number or 'best', got {step!r}")
    return int(step)


def check_dtype(dtype: str | None) -> None:
    """Refuses a dtype of the merged weights that is not a floating type (before the run
    is loaded; an unknown name was a TypeError traceback at the write)."""
    if dtype is None:
        return
    import jax.numpy as jnp

    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ExportUsageError(
            f"--dtype must be a floating type such as float32, bfloat16 or float16, got {dtype!r}"
        )


def export_run(
    run_dir: str | Path,
    *,
    merged: str | Path | None = None,
    adapter: str | Path | None = None,
    step: int | str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Exports checkpoint `step` (None: newest, "best": best validation) of a training run.

    merged: an HF Qwen2 checkpoint with the adapters folded in. The merge is done into the
    base as stored on disk (re-read at its own dtype), not into the training copy of it
    (LoRA mode keeps the frozen base in bf16), so merged == base + A @ B * alpha / r up to
    one rounding to the output dtype. dtype: of the merged safetensors (default: the
    base's). adapter: the PEFT LoRA adapter (LoRA runs only); its base_model_name_or_path
    is the run's base checkpoint. Returns one line per written directory. An output
    directory that exists without overwrite (FileExistsError) or that cannot be written
    or replaced (OutputDirectoryError) is refused before anything is loaded or written.
    """
    if merged is None and adapter is None:
        raise ExportUsageError("nothing to export: give a merged and/or an adapter directory")
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ExportUsageError(f"{run_dir}: not a training run directory (no config.yaml)")
    check_dtype(dtype)
    for out in (merged, adapter):
        if out is not None:  # a place that may not or cannot be written fails before any work
            check_output_directory(out, overwrite=overwrite)
    trained, config = load_trained(run_dir, step)
    base = prepare_base(config, Path(run_dir))
    written = []
    if config.mode != "lora":
        if adapter is not None:
            raise ExportUsageError(
                f"{run_dir} was trained in mode {config.mode!r}: there is no adapter to "
                "export (export the full model with a merged directory)"
            )
        save_hf(trained, merged, dtype, overwrite=overwrite)
        return [f"model ({config.mode} fine-tuning) -> {merged}"]
    if adapter is not None:
        out = save_peft_adapter(
            trained,
            adapter,
            base_model_name_or_path=str(config.model.base or Path(base).absolute()),
            overwrite=overwrite,
        )
        written.append(f"PEFT adapter -> {out}")
    if merged is not None:
        stored = load_hf(base)
        try:
            copy_adapters(trained, stored)
        except LoRAError as err:
            raise LoRAError(f"{base}: the run's adapters do not fit its base ({err})") from None
        del trained
        out = save_merged_hf(stored, merged, dtype, overwrite=overwrite)
        written.append(f"merged model -> {out}")
    return written
