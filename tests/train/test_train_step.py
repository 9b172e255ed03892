"""The jitted train step: sharded over 8 simulated devices (data=2, fsdp=2, tensor=2) it
gives the single-device losses and parameters; gradient accumulation equals one large
batch. float32 throughout."""

import jax
import numpy as np
import pytest
from train_setup import full_split_and_optimizer

from mllm_jax.foundation.mesh import make_mesh
from mllm_jax.model import preset
from mllm_jax.runs.config import OptimizerConfig, SyntheticConfig
from mllm_jax.runs.loading import host_params
from mllm_jax.train.batches import next_batches, to_device
from mllm_jax.train.optim import learning_rate
from mllm_jax.train.step import make_train_step
from mllm_jax.train.synthetic import SyntheticBatches

MODEL = preset("tiny", param_dtype="float32", compute_dtype="float32", num_hidden_layers=1)
DATA = SyntheticConfig(batch_size=4, seq_len=48, vocab_size=MODEL.vocab_size)
OPT = OptimizerConfig(weight_decay=0.1, warmup_ratio=0.0)
STEPS = 3
BUDGET = 16


def _host_batches(accum: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """STEPS steps of stacked [accum, batch_size, seq] batches over the same rows."""
    rows = SyntheticBatches(DATA, seed=7)
    out = []
    for _ in range(STEPS):
        stacked, _ = next_batches(
            rows, 2, where="t", vocab_size=MODEL.vocab_size, max_answer_tokens=BUDGET, shape=None
        )
        out.append({k: v.reshape(accum, batch_size, -1) for k, v in stacked.items()})
    return out


def _train(mesh, batches, remat=True):
    split, tx, opt_shardings, opt_state = full_split_and_optimizer(MODEL, 11, mesh, OPT)
    step = make_train_step(split, tx, opt_shardings, mesh, budget=BUDGET, remat=remat)
    losses, norms = [], []
    for i, host in enumerate(batches):
        lr = np.float32(learning_rate(OPT, 3e-3, STEPS, i))
        split.trainable, opt_state, split.rngs, metrics = step(
            split.trainable, opt_state, split.rngs, split.frozen, to_device(host, mesh), lr
        )
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return np.array(losses), np.array(norms), split


@pytest.fixture(scope="module")
def single_device_run():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return _train(mesh, _host_batches(accum=2, batch_size=4))


def test_sharded_step_matches_single_device(single_device_run):
    losses_1, norms_1, split_1 = single_device_run
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    losses_8, norms_8, split_8 = _train(mesh, _host_batches(accum=2, batch_size=4))
    kernel = split_8.trainable["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8
    assert losses_1[-1] < losses_1[0]  # the steps did something
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    np.testing.assert_allclose(norms_8, norms_1, rtol=1e-5)
    p1, p8 = host_params(split_1.trainable), host_params(split_8.trainable)
    assert p1.keys() == p8.keys()
    # Adam normalises each update: where a gradient is ~0, float reassociation moves the
    # parameter by a visible fraction of one lr-sized step, hence atol (lr is 3e-3).
    for name in p1:
        np.testing.assert_allclose(p8[name], p1[name], rtol=1e-4, atol=2e-5, err_msg=name)


def test_grad_accumulation_equals_one_large_batch(single_device_run):
    losses_acc, norms_acc, split_acc = single_device_run
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    losses_big, norms_big, split_big = _train(
        mesh, _host_batches(accum=1, batch_size=8), remat=False
    )
    np.testing.assert_allclose(losses_big, losses_acc, rtol=1e-5)
    np.testing.assert_allclose(norms_big, norms_acc, rtol=1e-5)
    pa, pb = host_params(split_acc.trainable), host_params(split_big.trainable)
    for name in pa:
        np.testing.assert_allclose(pb[name], pa[name], rtol=1e-4, atol=2e-5, err_msg=name)
