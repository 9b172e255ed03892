"""Hand-written LoRA: config, attaching by pattern, forward formula, merge/unmerge,
trainable filter under a jitted optax step, dropout determinism, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mllm_jax.foundation.mesh import make_mesh
from mllm_jax.model import Qwen2ForCausalLM, init_model, preset
from mllm_jax.model.lora import (
    DEFAULT_TARGETS,
    LORA_RANK_AXIS,
    LoRAConfig,
    LoRAError,
    LoRAParam,
    apply_lora,
    linear_layers,
    lora_layers,
    lora_param_count,
    match_targets,
    merge_lora,
    merged_copy,
    remove_lora,
    unmerge_lora,
)
from mllm_jax.model.sharding import ShardingRules, state_shardings

# One layer keeps compiles short; path patterns are checked on an abstract 2-layer model.
CONFIG = preset("tiny", vocab_size=160, initializer_range=0.2, num_hidden_layers=1)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 160, (2, 12)), jnp.int32)
FORWARD = nnx.jit(lambda model, ids: model(ids))


@pytest.fixture(scope="module")
def base():
    return init_model(CONFIG, key=3)


def _randomize_b(model, key=7, std=0.3):
    """Non-zero B everywhere so the adapters change the output."""
    for i, linear in enumerate(lora_layers(model).values()):
        b = linear.lora.b
        b.set_value(jax.random.normal(jax.random.fold_in(jax.random.key(key), i), b.shape) * std)


def _params(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


def _lora_model(base, config: LoRAConfig | None = None, key=1):
    model = nnx.clone(base)
    apply_lora(model, config or LoRAConfig(), key)
    _randomize_b(model)
    return model


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets=()), "empty"),
        (dict(targets=("q_proj", "(")), "regex"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(LoRAError, match=message):
        LoRAConfig(**kwargs)


def test_config_defaults_are_the_reference_recipe():
    config = LoRAConfig()
    assert (config.rank, config.alpha, config.dropout, config.scale) == (8, 16.0, 0.0, 2.0)
    assert config.targets == DEFAULT_TARGETS
    assert LoRAConfig(targets="q_proj").targets == ("q_proj",)


# ------------------------------------------------------------------------- attach


def test_apply_lora_attaches_fresh_adapters_that_change_nothing(base):
    model = nnx.clone(base)
    before_params = _params(model)
    paths = apply_lora(model, LoRAConfig(rank=4), key=0)
    assert len(paths) == 7 * CONFIG.num_hidden_layers and "lm_head" not in paths
    assert paths == list(lora_layers(model))
    # Base parameters are exactly the nnx.Param state, adapters exactly the LoRAParam one.
    assert _params(model).keys() == before_params.keys()
    lora_state = nnx.to_flat_state(nnx.state(model, LoRAParam))
    assert len(lora_state) == 2 * len(paths)
    assert not any(isinstance(v, nnx.Param) for _, v in lora_state)
    for path in paths:
        linear = linear_layers(model)[path]
        a, b = linear.lora.a, linear.lora.b
        assert a.shape == (linear.in_features, 4) and b.shape == (4, linear.out_features)
        assert a.dtype == b.dtype == jnp.float32
        bound = 1 / math.sqrt(linear.in_features)
        values = np.asarray(a.get_value())
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.8 * bound
        assert not np.any(np.asarray(b.get_value()))
        kernel_axes = linear.kernel.get_metadata()["logical_axes"]
        assert a.get_metadata()["logical_axes"] == (kernel_axes[0], LORA_RANK_AXIS)
        assert b.get_metadata()["logical_axes"] == (LORA_RANK_AXIS, kernel_axes[1])
    # kaiming_uniform(a=sqrt(5)) as PEFT: variance 1/(3 fan_in) over all A entries.
    a = np.asarray(lora_layers(model)[paths[0]].lora.a.get_value())
    assert abs(a.var() * 3 * a.shape[0] - 1) < 0.1
    np.testing.assert_array_equal(np.asarray(FORWARD(model, IDS)), np.asarray(FORWARD(base, IDS)))
    assert lora_param_count(model) == sum(
        4 * (lin.in_features + lin.out_features) for lin in lora_layers(model).values()
    )


def test_same_key_same_adapters_and_fold_in_per_adapter(base):
    first, second = nnx.clone(base), nnx.clone(base)
    apply_lora(first, LoRAConfig(), key=5)
    apply_lora(second, LoRAConfig(targets=("q_proj",)), key=5)
    a_first = {p: np.asarray(lin.lora.a.get_value()) for p, lin in lora_layers(first).items()}
    a_second = {p: np.asarray(lin.lora.a.get_value()) for p, lin in lora_layers(second).items()}
    assert len({v.tobytes() for v in a_first.values()}) == len(a_first)  # all different
    third = nnx.clone(base)
    apply_lora(third, LoRAConfig(), key=5)
    for p, lin in lora_layers(third).items():
        np.testing.assert_array_equal(np.asarray(lin.lora.a.get_value()), a_first[p])
    assert set(a_second) == {p for p in a_first if p.endswith("q_proj")}


def test_target_patterns_select_by_name_or_path(base):
    two_layers = nnx.eval_shape(
        lambda: Qwen2ForCausalLM(CONFIG.replace(num_hidden_layers=2), rngs=nnx.Rngs(0))
    )
    paths = match_targets(two_layers, (r"(q|v)_proj", r"layers\.1\.mlp\.down_proj", "lm_head"))
    assert paths == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.mlp.down_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
        "lm_head",
    ]
    model = nnx.clone(base)
    assert apply_lora(model, LoRAConfig(targets=(r"layers\.0\.self_attn\.(k|o)_proj",)), 0) == [
        "layers.0.self_attn.k_proj",
        "layers.0.self_attn.o_proj",
    ]
    # Patterns fully match: "proj" alone is no module name and no path.
    with pytest.raises(LoRAError, match=r"\['proj'\]"):
        apply_lora(nnx.clone(base), LoRAConfig(targets=("proj",)), 0)


def test_unmatched_patterns_and_double_apply_are_errors(base):
    model = nnx.clone(base)
    with pytest.raises(LoRAError, match=r"\['v_prj'\] match no linear layer.*q_proj"):
        apply_lora(model, LoRAConfig(targets=("q_proj", "v_prj")), 0)
    assert not lora_layers(model)  # nothing attached on error
    apply_lora(model, LoRAConfig(targets=("q_proj",)), 0)
    with pytest.raises(LoRAError, match="already carry"):
        apply_lora(model, LoRAConfig(), 0)
    assert remove_lora(model) == [p for p in linear_layers(model) if p.endswith("q_proj")]
    assert not lora_layers(model)
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        merge_lora(model)


# ------------------------------------------------------------------------- forward


def test_forward_adds_scaled_low_rank_update(base):
    """One Linear against the formula in numpy: y = x W + b + (x A B) alpha / r."""
    model = _lora_model(base, LoRAConfig(rank=3, alpha=5.0))
    linear = model.layers[0].self_attn.q_proj
    x = np.random.default_rng(1).normal(size=(5, linear.in_features)).astype(np.float32)
    w, bias = np.asarray(linear.kernel.get_value()), np.asarray(linear.bias.get_value())
    a, b = np.asarray(linear.lora.a.get_value()), np.asarray(linear.lora.b.get_value())
    expected = x @ w + bias + (x @ a @ b) * (5.0 / 3)
    np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_float32_adapters(base):
    model = nnx.clone(base)
    model.config = CONFIG.replace(compute_dtype="bfloat16")
    for linear in linear_layers(model).values():
        linear.compute_dtype = jnp.bfloat16
    apply_lora(model, LoRAConfig(), 1)
    _randomize_b(model)
    linear = model.layers[0].mlp.up_proj
    assert linear.lora.compute_dtype == jnp.bfloat16 and linear.lora.a.dtype == jnp.float32
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, linear.in_features)), jnp.bfloat16)
    y = linear(x)
    assert y.dtype == jnp.bfloat16
    x32 = np.asarray(x, np.float32)
    expected = (
        x32 @ np.asarray(linear.kernel.get_value())
        + (x32 @ np.asarray(linear.lora.a.get_value()) @ np.asarray(linear.lora.b.get_value()))
        * 2.0
    )
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------- merge


def test_merge_unmerge_and_merged_copy(base):
    model = _lora_model(base)
    with_adapters = np.asarray(FORWARD(model, IDS))
    assert np.abs(with_adapters - np.asarray(FORWARD(base, IDS))).max() > 1e-2
    kernels = _params(model)

    copy = merged_copy(model)
    assert not lora_layers(copy) and not jax.tree.leaves(nnx.state(copy, LoRAParam))
    np.testing.assert_allclose(np.asarray(FORWARD(copy, IDS)), with_adapters, atol=1e-4)
    # The source is untouched: same kernels, adapters attached and unmerged.
    for path, value in _params(model).items():
        np.testing.assert_array_equal(value, kernels[path])
    assert all(not lin.lora.merged for lin in lora_layers(model).values())

    merged_paths = merge_lora(model)
    assert merged_paths == list(lora_layers(model)) and merge_lora(model) == []
    np.testing.assert_allclose(np.asarray(FORWARD(model, IDS)), with_adapters, atol=1e-4)
    for path, value in _params(copy).items():  # merge in place == merged copy
        np.testing.assert_array_equal(value, _params(model)[path])
    q = "layers.0.self_attn.q_proj"
    lin = lora_layers(model)[q]
    delta = np.asarray(lin.lora.a.get_value()) @ np.asarray(lin.lora.b.get_value()) * 2.0
    np.testing.assert_allclose(
        _params(model)[f"{q}.kernel"], kernels[f"{q}.kernel"] + delta, rtol=1e-6, atol=1e-6
    )

    assert unmerge_lora(model) == merged_paths and unmerge_lora(model) == []
    for path, value in _params(model).items():
        np.testing.assert_allclose(value, kernels[path], atol=1e-6)
    np.testing.assert_allclose(np.asarray(FORWARD(model, IDS)), with_adapters, atol=1e-5)


def test_merge_into_bfloat16_base_is_float32_then_cast():
    base16 = init_model(CONFIG.replace(param_dtype="bfloat16"), key=3)
    model = nnx.clone(base16)
    apply_lora(model, LoRAConfig(targets=("o_proj",)), 1)
    _randomize_b(model, std=0.05)
    linear = model.layers[0].self_attn.o_proj
    w16 = np.asarray(linear.kernel.get_value())
    delta = np.asarray(linear.lora.delta())
    merge_lora(model)
    merged = linear.kernel.get_value()
    assert merged.dtype == jnp.bfloat16 and linear.lora.a.dtype == jnp.float32
    expected = (w16.astype(np.float32) + delta).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(merged), expected)
    unmerge_lora(model)
    back = np.asarray(linear.kernel.get_value(), np.float32)
    # Two bf16 roundings (merge, unmerge): within a few bf16 ulps of the original.
    np.testing.assert_allclose(back, w16.astype(np.float32), rtol=2**-7, atol=2**-12)


# ------------------------------------------------------------------------- training


def test_jitted_lora_step_differentiates_and_updates_only_adapters(base):
    model = _lora_model(base, LoRAConfig(rank=4))
    base_before = _params(model)
    lora_before = {
        p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))
    }
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=LoRAParam)
    targets = jnp.roll(IDS, -1, axis=1)

    @nnx.jit
    def step(model, optimizer, ids, targets):
        def loss_fn(model):
            logits = model(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        optimizer.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(5):
        loss, grads = step(model, optimizer, IDS, targets)
        losses.append(float(loss))
    flat_grads = nnx.to_flat_state(grads)
    assert len(flat_grads) == len(lora_before)
    assert all(isinstance(v, LoRAParam) for _, v in flat_grads)
    assert {p for p, _ in flat_grads} == set(lora_before)
    assert all(np.any(np.asarray(v.get_value())) for _, v in flat_grads)
    for path, value in _params(model).items():
        np.testing.assert_array_equal(value, base_before[path])
    lora_after = {
        p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))
    }
    assert all(not np.array_equal(lora_after[p], lora_before[p]) for p in lora_before)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------- dropout


def test_dropout_is_off_until_train_mode_and_deterministic_per_key(base):
    plain = _lora_model(base, LoRAConfig(), key=1)
    dropped = _lora_model(base, LoRAConfig(dropout=0.5), key=1)
    expected = np.asarray(FORWARD(plain, IDS))
    # Created inactive: inference never drops.
    np.testing.assert_array_equal(np.asarray(FORWARD(dropped, IDS)), expected)
    twin = _lora_model(base, LoRAConfig(dropout=0.5), key=1)
    dropped.train()
    twin.train()
    first, second = np.asarray(FORWARD(dropped, IDS)), np.asarray(FORWARD(dropped, IDS))
    assert np.abs(first - expected).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3  # the stream advances per call
    np.testing.assert_array_equal(np.asarray(FORWARD(twin, IDS)), first)  # same key, same masks
    np.testing.assert_array_equal(np.asarray(FORWARD(twin, IDS)), second)
    # One stream per adapter, each with its own key.
    keys = [
        np.asarray(jax.random.key_data(v.get_value())).tobytes()
        for _, v in nnx.to_flat_state(nnx.state(dropped, nnx.RngKey))
    ]
    assert len(set(keys)) == len(keys) == len(lora_layers(dropped))
    dropped.eval()
    np.testing.assert_array_equal(np.asarray(FORWARD(dropped, IDS)), expected)


def _functional_step(graphdef, remat):
    """A train step as a jax.jit trainer writes it: trainable LoRAParam, the RngState
    carried in and out, the rest frozen; per-layer remat on request."""
    targets = jnp.roll(IDS, -1, axis=1)

    @jax.jit
    def step(params, rngs, rest):
        def loss_fn(params):
            # copy=True: fresh Variables at this trace level, or nnx.remat refuses to
            # update the non-differentiated ones from inside jax.grad.
            model = nnx.merge(graphdef, params, rngs, rest, copy=True)
            logits = model(IDS, remat=remat)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return loss, nnx.state(model, nnx.RngState)

        (loss, new_rngs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_rngs

    return step


def test_dropout_in_a_functional_jitted_step_carries_the_rng_state(base):
    """The advanced RngState comes out of the step; feeding the same state replays the
    same masks (what a resumed run relies on), also under per-layer remat."""
    model = _lora_model(base, LoRAConfig(dropout=0.3), key=2)
    model.train()
    graphdef, params, rngs, rest = nnx.split(model, LoRAParam, nnx.RngState, ...)
    step = _functional_step(graphdef, remat=True)
    loss0, grads0, rngs1 = step(params, rngs, rest)
    loss1, _, rngs2 = step(params, rngs1, rest)
    loss0_again, grads0_again, _ = step(params, rngs, rest)
    assert float(loss0) != float(loss1)
    assert float(loss0) == float(loss0_again)
    for g, h in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads0_again), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(h))
    counts = [int(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(rngs2, nnx.RngCount))]
    assert len(counts) == len(lora_layers(model)) and set(counts) == {2}


@pytest.mark.slow
def test_dropout_masks_survive_rematerialisation(base):
    """Gradients with dropout are the same with and without per-layer remat: the
    recomputation redraws the very same masks."""
    model = _lora_model(base, LoRAConfig(dropout=0.3), key=2)
    model.train()
    graphdef, params, rngs, rest = nnx.split(model, LoRAParam, nnx.RngState, ...)
    loss, grads, _ = _functional_step(graphdef, remat=True)(params, rngs, rest)
    loss_plain, grads_plain, _ = _functional_step(graphdef, remat=False)(params, rngs, rest)
    np.testing.assert_allclose(float(loss), float(loss_plain), rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-7)
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------- sharding


def test_adapters_shard_by_logical_axes_and_match_single_device(base):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rules = ShardingRules.default()
    single = _lora_model(base, LoRAConfig(), key=4)
    expected = np.asarray(FORWARD(single, IDS))

    sharded = nnx.clone(base)
    shardings = state_shardings(nnx.state(sharded), mesh, rules)
    nnx.update(sharded, jax.device_put(nnx.state(sharded), shardings))
    apply_lora(sharded, LoRAConfig(), key=4, mesh=mesh, rules=rules)
    _randomize_b(sharded)
    q = sharded.layers[0].self_attn.q_proj.lora
    assert q.a.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    # Re-place B (randomised eagerly) from the state's metadata, as a trainer does.
    lora_state = nnx.state(sharded, LoRAParam)
    nnx.update(sharded, jax.device_put(lora_state, state_shardings(lora_state, mesh, rules)))
    assert q.b.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    down = sharded.layers[0].mlp.down_proj.lora
    assert down.a.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    assert down.b.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_allclose(np.asarray(FORWARD(sharded, IDS)), expected, atol=1e-5)
    # Merging sharded arrays keeps each kernel's sharding and equals the unsharded merge.
    merge_lora(sharded)
    merge_lora(single)
    kernel = sharded.layers[0].self_attn.q_proj.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for path, value in _params(single).items():
        np.testing.assert_allclose(_params(sharded)[path], value, rtol=1e-6, atol=1e-6)
