"""The LoRA-trained model as one plain HF checkpoint: adapters folded into the weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flax import nnx

from mllm_jax.model.hf import save_hf
from mllm_jax.model.lora import merged_copy


def save_merged_hf(
    model: nnx.Module, path: str | os.PathLike, dtype: Any | None = None, **save_kwargs: Any
) -> Path:
    """Writes `model` with its LoRA adapters merged (W + A @ B * alpha / r in float32, cast
    to the base weights' dtype) as an HF Qwen2 checkpoint (`mllm_jax.model.save_hf`:
    safetensors in `dtype`, default the base dtype; sharded above max_shard_bytes; atomic).
    `model` is not changed. Raises LoRAError if it has no adapters."""
    return save_hf(merged_copy(model), path, dtype, **save_kwargs)
