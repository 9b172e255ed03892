"""The optimizer: global-norm clipping, then AdamW, at a learning rate given per step.

The learning rate is an input of the train step (computed on the host from the stage's
schedule), not baked into the optimizer, so every curriculum stage runs the same compiled
step. AdamW here is `scale_by_adam` -> decoupled weight decay -> `-lr *`, i.e. optax's
`adamw`. The schedule is HF's `get_cosine_schedule_with_warmup` (what LLaMA-Factory
runs): linear warmup from 0 over ceil(warmup_ratio * steps) updates, then cosine decay to
`min_lr_ratio * peak`; the first update of a stage uses lr 0.
"""

from __future__ import annotations

import math

import jax
import optax

from mllm_jax.runs.config import OptimizerConfig


def warmup_steps(config: OptimizerConfig, steps: int) -> int:
    return math.ceil(config.warmup_ratio * steps)


def learning_rate(config: OptimizerConfig, peak: float, steps: int, count: int) -> float:
    """The learning rate of update `count` (0-based) of a stage of `steps` updates."""
    warmup = warmup_steps(config, steps)
    if count < warmup:
        return peak * count / warmup
    progress = min((count - warmup) / max(steps - warmup, 1), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def _decay_mask(params):
    """Weight decay on matrices only (kernels, embeddings, LoRA A/B), not biases or norms."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Clipping + Adam moments + decoupled weight decay; the caller multiplies the
    resulting direction by -lr."""
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
