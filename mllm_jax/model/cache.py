"""The key/value cache: a pytree of fixed-size buffers, so decoding steps jit once.

A model call with a cache writes its T new tokens at slots [length, length + T) of every
row (one shared write index; rows of different lengths are left-padded with segment id
0) and attends over all slots under the usual position/segment mask; empty slots have
segment id 0 and are never attended.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mllm_jax.model.config import Qwen2Config
from mllm_jax.model.sharding import ShardingRules, logical_to_spec

# Logical axis names of the per-layer key / value buffers.
CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """keys, values: per layer [batch, max_len, kv_heads, head_dim];
    positions, segment_ids: i32[batch, max_len] (segment 0 = empty slot or padding);
    length: i32[] slots filled so far (the next write index)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    positions: jax.Array
    segment_ids: jax.Array
    length: jax.Array

    @classmethod
    def create(
        cls, config: Qwen2Config, batch: int, max_len: int, dtype: jnp.dtype | None = None
    ) -> KVCache:
        """An empty cache; dtype defaults to the model's compute dtype."""
        dtype = jnp.dtype(dtype or config.compute_dtype)
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        layers = config.num_hidden_layers
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    def shardings(self, mesh: jax.sharding.Mesh, rules=None) -> KVCache:
        """A KVCache-shaped tree of NamedShardings (for `jax.device_put` / jit
        out_shardings): keys/values by the logical axes `CACHE_AXES`, positions and
        segment ids by (batch, cache_seq), length replicated. rules default to
        `ShardingRules.default()`."""
        rules = rules or ShardingRules.default()

        def named(axes: tuple[str, ...], shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
            return jax.sharding.NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

        kv = named(CACHE_AXES, self.keys[0].shape)
        meta = named(CACHE_AXES[:2], self.positions.shape)
        return KVCache(
            keys=(kv,) * len(self.keys),
            values=(kv,) * len(self.values),
            positions=meta,
            segment_ids=meta,
            length=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        )

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    def write_metadata(self, positions: jax.Array, segment_ids: jax.Array) -> KVCache:
        """Records the positions / segment ids i32[batch, T] of T new tokens (keys and
        values are written per layer by `write_layer`) and advances `length`."""
        start = (0, self.length)
        return dataclasses.replace(
            self,
            positions=jax.lax.dynamic_update_slice(
                self.positions, positions.astype(jnp.int32), start
            ),
            segment_ids=jax.lax.dynamic_update_slice(
                self.segment_ids, segment_ids.astype(jnp.int32), start
            ),
            length=self.length + positions.shape[1],
        )


def write_layer(
    keys: jax.Array, values: jax.Array, new_k: jax.Array, new_v: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Writes new_k/new_v [B, T, K, D] into one layer's buffers [B, S, K, D] at slot `index`."""
    start = (0, index, 0, 0)
    return (
        jax.lax.dynamic_update_slice(keys, new_k.astype(keys.dtype), start),
        jax.lax.dynamic_update_slice(values, new_v.astype(values.dtype), start),
    )
