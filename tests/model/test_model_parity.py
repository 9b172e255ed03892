"""Our Qwen2 against transformers' PyTorch Qwen2ForCausalLM on random tiny configs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_checkpoints import hf_logits, save_hf_model

from mllm_jax.model import load_hf

FORWARD = nnx.jit(lambda model, ids: model(ids))

CASES = {
    # name: (HF config overrides, sequence length)
    "untied_gqa2": (dict(num_key_value_heads=2), 24),
    "tied_mha": (dict(num_key_value_heads=4, tie_word_embeddings=True), 24),
    "yarn_mqa": (
        dict(
            num_key_value_heads=1,
            rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16),
        ),
        48,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (overrides, _) in CASES.items():
        directory = tmp_path_factory.mktemp(name)
        out[name] = (directory, save_hf_model(directory, seed=len(out), **overrides))
    return out


def _ids(batch, seq, vocab=160, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers(checkpoints, name):
    directory, torch_model = checkpoints[name]
    ids = _ids(2, CASES[name][1])
    ref = hf_logits(torch_model, ids)
    ours = np.asarray(FORWARD(load_hf(directory), jnp.asarray(ids)))
    assert ours.shape == ref.shape == (2, ids.shape[1], 160)
    assert ref.std() > 0.5  # logits are not trivially small
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_yarn_changes_logits(checkpoints):
    """The YaRN case would also pass if scaling were ignored only if it had no effect."""
    directory, _ = checkpoints["yarn_mqa"]
    model = load_hf(directory)
    assert model.config.rope_scaling.factor == 4.0
    plain = load_hf(directory, rope_scaling=None)
    ids = jnp.asarray(_ids(1, 48))
    diff = np.abs(np.asarray(FORWARD(model, ids)) - np.asarray(FORWARD(plain, ids))).max()
    assert diff > 1e-2


def test_bfloat16_error_is_no_worse_than_transformers_bfloat16(checkpoints):
    """bf16 rounds the weights themselves, so the yardstick is transformers' own bf16
    error against the float32 logits (docs/model.md records the measured numbers)."""
    directory, torch_model = checkpoints["untied_gqa2"]
    ids = _ids(2, 24)
    ref = hf_logits(torch_model, ids)
    ref_bf16 = hf_logits(copy.deepcopy(torch_model).to(torch.bfloat16), ids)
    model = load_hf(directory, dtype="bfloat16", compute_dtype="bfloat16")
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ours = np.asarray(FORWARD(model, jnp.asarray(ids)))
    assert ours.dtype == np.float32
    ours_err, hf_err = np.abs(ours - ref), np.abs(ref_bf16 - ref)
    assert ours_err.mean() <= 1.25 * hf_err.mean()
    assert ours_err.max() <= 0.25 * ref.std()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_hidden_states_and_lm_head_on_a_subset(checkpoints):
    directory, _ = checkpoints["tied_mha"]
    model = load_hf(directory)
    ids = jnp.asarray(_ids(2, 24))
    logits = FORWARD(model, ids)
    hidden = nnx.jit(lambda m, x: m(x, return_hidden=True))(model, ids)
    assert hidden.shape == (2, 24, 64)
    rows, cols = jnp.array([0, 1, 1]), jnp.array([3, 0, 23])
    picked = nnx.jit(lambda m, h: m.logits(h))(model, hidden[rows, cols])
    np.testing.assert_allclose(picked, logits[rows, cols], atol=1e-5)


def test_packed_rows_equal_each_sequence_alone(checkpoints):
    directory, _ = checkpoints["untied_gqa2"]
    model = load_hf(directory)
    a, b = _ids(1, 10, seed=1)[0], _ids(1, 9, seed=2)[0]
    packed = np.zeros((1, 24), np.int32)
    segments = np.zeros((1, 24), np.int32)
    packed[0, :10], segments[0, :10] = a, 1
    packed[0, 10:19], segments[0, 10:19] = b, 2
    out = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(
        model, jnp.asarray(packed), jnp.asarray(segments)
    )
    alone_a = FORWARD(model, jnp.asarray(a[None]))
    alone_b = FORWARD(model, jnp.asarray(b[None]))
    np.testing.assert_allclose(out[0, :10], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 10:19], alone_b[0], atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # padding rows stay finite


@pytest.mark.slow
def test_remat_gives_the_same_gradients(checkpoints):
    directory, _ = checkpoints["untied_gqa2"]
    graphdef, state = nnx.split(load_hf(directory))
    ids = jnp.asarray(_ids(2, 16))

    def loss(state, remat):
        logits = nnx.merge(graphdef, state)(ids, remat=remat)
        return jax.nn.logsumexp(logits, axis=-1).mean()

    plain = jax.jit(jax.grad(loss), static_argnums=1)(state, False)
    rematted = jax.jit(jax.grad(loss), static_argnums=1)(state, True)
    # One rematerialised region per decoder layer.
    assert str(jax.make_jaxpr(loss, static_argnums=1)(state, True)).count("remat2[") == 2
    assert "remat2[" not in str(jax.make_jaxpr(loss, static_argnums=1)(state, False))
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
