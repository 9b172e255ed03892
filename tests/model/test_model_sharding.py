"""Activation sharding constraints: the sharded train step (data 2, fsdp 2, tensor 2) with
the model's activations pinned equals one device, and XLA needs no involuntary full
rematerialisation (the warning it logs when propagation picks conflicting layouts, e.g.
the embedding rows sharded over embed while the batch wants (data, fsdp))."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from train_setup import full_split_and_optimizer

from mllm_jax.foundation.mesh import make_mesh
from mllm_jax.model import init_model, preset
from mllm_jax.model.sharding import ShardingRules
from mllm_jax.runs.config import OptimizerConfig, SyntheticConfig
from mllm_jax.train.batches import next_batches, to_device
from mllm_jax.train.step import make_train_step
from mllm_jax.train.synthetic import SyntheticBatches

MODEL = preset("tiny", param_dtype="float32", compute_dtype="float32", num_hidden_layers=1)
DATA = SyntheticConfig(batch_size=4, seq_len=48, vocab_size=MODEL.vocab_size)
BUDGET = 16


def _steps(mesh, rules, steps=2):
    rows = SyntheticBatches(DATA, seed=3)
    split, tx, opt_shardings, opt_state = full_split_and_optimizer(
        MODEL, 5, mesh, OptimizerConfig(warmup_ratio=0.0)
    )
    step = make_train_step(split, tx, opt_shardings, mesh, budget=BUDGET, remat="full", rules=rules)
    losses = []
    for _ in range(steps):
        host, _ = next_batches(
            rows, 2, where="t", vocab_size=MODEL.vocab_size, max_answer_tokens=BUDGET, shape=None
        )
        batch = to_device(host, mesh)  # [2 micro-batches, batch, seq]
        split.trainable, opt_state, split.rngs, metrics = step(
            split.trainable, opt_state, split.rngs, split.frozen, batch, np.float32(1e-3)
        )
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.array(losses), split


def test_sharded_step_with_pinned_activations_equals_one_device(capfd):
    one, split_1 = _steps(make_mesh(1, 1, 1, devices=jax.devices()[:1]), None)
    capfd.readouterr()
    eight, split_8 = _steps(make_mesh(data=2, fsdp=2, tensor=2), ShardingRules.default())
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    leaves_1, leaves_8 = jax.tree.leaves(split_1.trainable), jax.tree.leaves(split_8.trainable)
    for x, y in zip(leaves_1, leaves_8, strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=2e-5)


def test_without_a_mesh_the_model_adds_no_constraint():
    graphdef, state = nnx.split(init_model(MODEL, 0))
    ids = jnp.zeros((1, 8), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state))
    assert "sharding_constraint" not in jaxpr
