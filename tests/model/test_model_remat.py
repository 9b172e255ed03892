"""Per-layer remat policies by name: same gradients as no remat, one region per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.model import init_model, preset
from mllm_jax.model.config import REMAT_NAMES, ConfigError
from mllm_jax.model.qwen2 import REMAT_POLICIES, remat_name


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny", param_dtype="float32", compute_dtype="float32")
    graphdef, state = nnx.split(init_model(config, 0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
    return graphdef, state, ids


def _loss(graphdef, ids):
    def loss(state, remat):
        logits = nnx.merge(graphdef, state)(ids, remat=remat)
        return jax.nn.logsumexp(logits, axis=-1).mean()

    return loss


@pytest.mark.parametrize(
    "policy",
    ["dots_saveable", pytest.param("dots_with_no_batch_dims_saveable", marks=pytest.mark.slow)],
)
def test_named_policy_gives_the_same_gradients(tiny, policy):
    graphdef, state, ids = tiny
    loss = _loss(graphdef, ids)
    plain = jax.jit(jax.grad(loss), static_argnums=1)(state, "none")
    rematted = jax.jit(jax.grad(loss), static_argnums=1)(state, policy)
    jaxpr = str(jax.make_jaxpr(loss, static_argnums=1)(state, policy))
    assert jaxpr.count("remat2[") == 2  # one region per decoder layer (tiny has 2)
    assert "policy=None" not in jaxpr and "policy=DotsSaveable" in jaxpr
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_policy_names_and_booleans():
    assert remat_name(True) == "full" and remat_name(False) == "none"
    assert set(REMAT_NAMES) >= {"none", "full", "dots_saveable"}
    # The config validates against its own list; the model implements one policy per name.
    assert ("none", *REMAT_POLICIES) == REMAT_NAMES
    with pytest.raises(ValueError, match="remat 'dots'"):
        remat_name("dots")
    with pytest.raises(ConfigError, match="remat 'everything'"):
        preset("tiny", remat="everything")
