"""Mesh, logical sharding rules, and the sharded model against one device
(8 simulated CPU devices, from tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from mllm_jax.foundation.mesh import MeshError, make_mesh
from mllm_jax.model import KVCache, init_model, load_hf, preset
from mllm_jax.model.sharding import ShardingRules, logical_to_spec

FORWARD = nnx.jit(lambda model, ids: model(ids))


def test_make_mesh_shapes_and_auto_axes():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(MeshError, match="3 x fsdp=1 x tensor=1 = 3 devices, but 8"):
        make_mesh(data=3)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_divisibility_and_collisions():
    mesh = make_mesh(fsdp=2, tensor=4)
    rules = ShardingRules.default()
    assert logical_to_spec(
        ("embed", "heads"), (64, 128), mesh, rules, units=(1, 16)
    ) == PartitionSpec("fsdp", "tensor")
    notes = []
    # 2 KV heads of 16 cannot be split over tensor=4 without splitting a head: replicated.
    spec = logical_to_spec(("embed", "kv_heads"), (64, 32), mesh, rules, units=(1, 16), notes=notes)
    assert spec == PartitionSpec("fsdp", None)
    assert len(notes) == 1 and "'kv_heads'" in notes[0]
    assert logical_to_spec(("batch", None), (4, 3), mesh, rules) == PartitionSpec(
        ("data", "fsdp"), None
    )
    assert logical_to_spec(("batch",), (3,), mesh, rules) == PartitionSpec(None)
    with pytest.raises(ValueError, match="both map to mesh axis 'tensor'"):
        logical_to_spec(("heads", "mlp"), (8, 8), mesh, rules)
    with pytest.raises(ValueError, match="repeats a mesh axis"):
        ShardingRules(embed=("fsdp", "fsdp"))
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'embd'"):
        logical_to_spec(("embd",), (8,), mesh, rules)


def test_sharding_rules_are_typed_per_logical_axis():
    rules = ShardingRules.default()
    assert rules.embed == ("fsdp",) and rules.seq == () and rules.batch == ("data", "fsdp")
    assert rules.replace(seq="data").mesh_axes("seq") == ("data",)
    with pytest.raises(KeyError, match="no logical axis 'embd' to set"):
        rules.replace(embd="fsdp")
    with pytest.raises(TypeError):
        ShardingRules(embd="fsdp")  # a typo is refused where the rules are made
    with pytest.raises(ValueError, match="give a mesh axis name"):
        ShardingRules(embed={"fsdp": 1})


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_checkpoint):
    return tiny_hf_checkpoint


def test_sharded_model_matches_single_device(checkpoint):
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 160, (4, 16)).astype(np.int32))
    single = np.asarray(FORWARD(load_hf(checkpoint), ids))
    mesh = make_mesh(fsdp=2, tensor=4)
    sharded = load_hf(checkpoint, mesh=mesh)
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    k = sharded.layers[0].self_attn.k_proj.kernel[...]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32, 16)  # [64, 64] over 2 x 4
    assert k.sharding.spec == PartitionSpec("fsdp", None)  # 2 KV heads stay whole
    assert sharded.embed_tokens.embedding[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    with jax.set_mesh(mesh):
        out = np.asarray(FORWARD(sharded, ids))
    np.testing.assert_allclose(out, single, atol=1e-5)


def test_init_model_straight_into_shardings():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = init_model(preset("tiny"), key=0, mesh=mesh)
    up = model.layers[1].mlp.up_proj.kernel[...]
    assert up.sharding.spec == PartitionSpec("fsdp", "tensor")
    reference = init_model(preset("tiny"), key=0)
    np.testing.assert_array_equal(
        np.asarray(up), np.asarray(reference.layers[1].mlp.up_proj.kernel[...])
    )


def test_kv_cache_shardings_follow_the_rules():
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    cache = KVCache.create(preset("tiny"), batch=4, max_len=8)
    placed = jax.device_put(cache, cache.shardings(mesh))
    # 2 KV heads cannot go over tensor=4: replicated by rule; batch over data x fsdp.
    assert placed.keys[0].sharding.spec == PartitionSpec(("data", "fsdp"), None, None, None)
    assert placed.positions.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert placed.keys[1].addressable_shards[0].data.shape == (2, 8, 2, 16)


def test_a_run_config_refuses_a_rule_for_an_unknown_logical_axis():
    from mllm_jax.foundation.config import ConfigError, from_dict
    from mllm_jax.runs.config import TrainConfig

    assert from_dict(TrainConfig, {"rules": {"seq": "data"}}).sharding_rules().seq == ("data",)
    with pytest.raises(ConfigError, match="no logical axis 'embd'"):
        from_dict(TrainConfig, {"rules": {"embd": "fsdp"}})
