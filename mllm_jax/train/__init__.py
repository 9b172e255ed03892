"""Training: LoRA or full fine-tuning of the Qwen2 model over a device mesh.

    from mllm_jax.train import TrainConfig, train, load_trained

    config = load_config(TrainConfig, "run.yaml", ["stages.0.steps=100"])
    result = train(config)                       # resumes from config.run_dir if it can
    model, config = load_trained(config.run_dir) # trained model (newest step, or "best")

Modules: `loss` (answer-only cross-entropy), `optim` (AdamW + schedule), `step` (jitted
train / eval steps), `batches` (batch checks, placement), `synthetic` (a learnable toy
task), `data` (stage data), `epochs` (stage lengths in epochs), `label_metrics`, `flops`
(MFU), `metrics` (JSON lines, progress), `loop` (the run), `command` (`mllm-jax train`).
The run's config, directory layout, checkpoints and loading live one layer down, in
`mllm_jax.runs`, shared with export and inference.
"""

from mllm_jax.runs.checkpoint import CheckpointMismatchError
from mllm_jax.runs.config import DataConfig, StageConfig, TrainConfig
from mllm_jax.runs.loading import load_trained
from mllm_jax.train.batches import BatchError, DataExhaustedError
from mllm_jax.train.loop import TrainResult, train
from mllm_jax.train.synthetic import SyntheticBatches

__all__ = [
    "BatchError",
    "CheckpointMismatchError",
    "DataConfig",
    "DataExhaustedError",
    "StageConfig",
    "SyntheticBatches",
    "TrainConfig",
    "TrainResult",
    "load_trained",
    "train",
]
