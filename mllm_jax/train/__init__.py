"""Training: LoRA or full fine-tuning of the Qwen2 model over a device mesh.

    from mllm_jax.train import TrainConfig, train, load_trained

    config = load_config(TrainConfig, "run.yaml", ["stages.0.steps=100"])
    result = train(config)                       # resumes from config.run_dir if it can
    model, config = load_trained(config.run_dir) # trained model (newest step, or "best")

Modules: `config` (the run config tree), `mesh` (mesh + logical sharding rules), `state`
(trainable / rng / frozen split), `loss` (answer-only cross-entropy), `optim` (AdamW +
schedule), `step` (jitted train / eval steps), `batches` (batch checks, placement),
`synthetic` (a learnable toy task), `data` (stage data), `checkpoint` (orbax), `flops`
(MFU), `metrics` (JSON lines, progress), `loop` (the run), `command` (`mllm-jax train`).

Names are imported lazily so that `mllm_jax.train.mesh` (used by the model code) does
not pull in orbax and optax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "mllm_jax.train.config",
    "StageConfig": "mllm_jax.train.config",
    "DataConfig": "mllm_jax.train.config",
    "train": "mllm_jax.train.loop",
    "load_trained": "mllm_jax.train.loop",
    "TrainResult": "mllm_jax.train.loop",
    "BatchError": "mllm_jax.train.batches",
    "DataExhaustedError": "mllm_jax.train.batches",
    "CheckpointMismatchError": "mllm_jax.train.checkpoint",
    "SyntheticBatches": "mllm_jax.train.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mllm_jax.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
