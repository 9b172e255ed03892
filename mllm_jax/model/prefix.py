"""Prefix reuse: run a long shared prompt prefix once, then score many query chunks.

For many-shot in-context learning the prompt is (instructions + training rows) followed
by a chunk of queries. `prefill_prefix` runs the prefix once with batch 1 and returns its
KV cache; `score_with_prefix` runs a batch of B query chunks that each continue that
prefix. The prefix cache is shared by all B rows without being copied (attention over
the prefix and over the queries is computed separately and merged exactly through the
log-sum-exp of each part), and nothing is appended to it, so it can be reused for the
next batch. The result equals running prefix + queries[b] from scratch for every b.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllm_jax.model.cache import KVCache
from mllm_jax.model.decoding import prefill
from mllm_jax.model.qwen2 import Qwen2ForCausalLM, positions_from_segments


def prefill_prefix(
    model: Qwen2ForCausalLM, prefix_ids: jax.Array, *, chunk_size: int | None = None
) -> KVCache:
    """prefix_ids: i32[P] or i32[1, P] -> batch-1 KVCache holding the prefix (segment 1,
    positions 0..P-1). chunk_size: tokens per model call during the prefill."""
    ids = jnp.asarray(prefix_ids, jnp.int32)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"prefix_ids must be [P] or [1, P], got shape {ids.shape}")
    p = ids.shape[1]
    slots = p if chunk_size is None or chunk_size >= p else -(-p // chunk_size) * chunk_size
    cache = KVCache.create(model.config, 1, slots)
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    segments = jnp.ones((1, p), jnp.int32)
    _, cache = prefill(model, ids, positions, segments, cache, chunk_size=chunk_size)
    return cache


def score_with_prefix(
    model: Qwen2ForCausalLM,
    prefix: KVCache,
    query_ids: jax.Array,
    query_segment_ids: jax.Array | None = None,
    *,
    return_hidden: bool = False,
) -> jax.Array:
    """Runs B query chunks that each continue `prefix` and returns their outputs.

    query_ids: i32[B, T]. query_segment_ids: i32[B, T], 1 = a token that continues the
    prefix, 0 = padding (default all 1). Positions continue after the prefix's last.
    Returns f32[B, T, vocab] logits, or final-normed hidden [B, T, embed]. The prefix
    cache is read only.
    """
    query_ids = jnp.asarray(query_ids, jnp.int32)
    b, t = query_ids.shape
    segments = (
        jnp.ones((b, t), jnp.int32)
        if query_segment_ids is None
        else jnp.asarray(query_segment_ids, jnp.int32)
    )
    start = jnp.max(jnp.where(prefix.segment_ids != 0, prefix.positions, -1)) + 1
    positions = start + positions_from_segments(jnp.where(segments != 0, 1, 0))
    return model(query_ids, positions, segments, prefix=prefix, return_hidden=return_hidden)
