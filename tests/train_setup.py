"""Shared setup of the sharded training tests: a full fine-tuning split and its optimizer."""

import jax.numpy as jnp

from mllm_jax.model import init_model
from mllm_jax.model.sharding import ShardingRules
from mllm_jax.runs.config import OptimizerConfig
from mllm_jax.runs.state import init_optimizer, optimizer_shardings, split_model
from mllm_jax.train.optim import make_optimizer


def full_split_and_optimizer(model_config, seed: int, mesh, optimizer: OptimizerConfig):
    """(split, tx, optimizer shardings, optimizer state) of a float32 full fine-tune of
    ``init_model(model_config, seed)`` placed on ``mesh`` with the default rules."""
    split = split_model(
        init_model(model_config, seed),
        "full",
        mesh,
        ShardingRules.default(),
        master_dtype=jnp.float32,
        frozen_dtype=jnp.float32,
    )
    tx = make_optimizer(optimizer)
    opt_shardings = optimizer_shardings(tx, split.trainable, split.trainable_shardings, mesh)
    return split, tx, opt_shardings, init_optimizer(tx, split.trainable, opt_shardings)
