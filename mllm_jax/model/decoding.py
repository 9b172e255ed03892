"""Greedy generation with a KV cache, and chunked prefill.

Prompts of different lengths are left-padded (segment id 0, never attended; positions
of the real tokens start at 0), so one shared cache write index serves the batch. The
whole generation (prefill + decode loop) is one jitted function; the decode loop is a
`lax.while_loop` that stops when every row has produced an end-of-sequence token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.model.cache import KVCache
from mllm_jax.model.qwen2 import Qwen2ForCausalLM


def prefill(
    model: Qwen2ForCausalLM,
    input_ids: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    cache: KVCache,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """Runs a prompt into `cache`, `chunk_size` tokens per model call (all at once if None).

    input_ids, positions, segment_ids: i32[B, T]. Chunks are processed by `lax.scan`
    (one compiled model call); if T is not a multiple of chunk_size the prompt is
    left-padded with segment-0 tokens, which occupy cache slots but are never attended.
    Returns (hidden state of the last token [B, embed], updated cache).
    """
    b, t = input_ids.shape
    if chunk_size is None or chunk_size >= t:
        hidden, cache = model(input_ids, positions, segment_ids, cache, return_hidden=True)
        return hidden[:, -1], cache
    n = -(-t // chunk_size)
    pad = n * chunk_size - t

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (pad, 0)))
        return jnp.moveaxis(x.reshape(b, n, chunk_size), 1, 0)

    def step(carry: KVCache, chunk):
        ids, pos, seg = chunk
        hidden, carry = model(ids, pos, seg, carry, return_hidden=True)
        return carry, hidden[:, -1]

    cache, last = jax.lax.scan(
        step, cache, (split(input_ids), split(positions), split(segment_ids))
    )
    return last[-1], cache


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, ...]:
    """(ids, positions, segment_ids): i32[B, max_len] each, prompts right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("decode_greedy needs at least one prompt and no empty prompts")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    positions = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        ids[row, start:] = prompt
        segments[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    return ids, positions, segments


@dataclasses.dataclass(frozen=True)
class DecodingResult:
    """tokens: i32[B, max_new_tokens] (pad after the end); lengths: i32[B] tokens
    generated per row, the end-of-sequence token included."""

    tokens: np.ndarray
    lengths: np.ndarray

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "prefill_chunk"))
def _generate(
    graphdef, state, ids, positions, segments, eos_ids, pad_id, *, max_new_tokens, prefill_chunk
):
    model = nnx.merge(graphdef, state)
    b, t = ids.shape
    if prefill_chunk is not None and prefill_chunk < t:
        t = -(-t // prefill_chunk) * prefill_chunk  # prefill pads to whole chunks
    cache = KVCache.create(model.config, b, t + max_new_tokens)
    last_hidden, cache = prefill(model, ids, positions, segments, cache, chunk_size=prefill_chunk)

    def is_eos(tok):
        return (tok[:, None] == eos_ids[None, :]).any(axis=-1)

    first = jnp.argmax(model.logits(last_hidden), axis=-1).astype(jnp.int32)
    done = is_eos(first)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    lengths = jnp.where(done, 1, max_new_tokens).astype(jnp.int32)
    pos = positions[:, -1] + 1

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, tok, pos, done, out, lengths = carry
        ones = jnp.ones((b, 1), jnp.int32)
        logits, cache = model(tok[:, None], pos[:, None], ones, cache)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        ended = is_eos(nxt) & ~done
        lengths = jnp.where(ended, step + 1, lengths)
        return step + 1, cache, nxt, pos + 1, done | ended, out, lengths

    carry = (jnp.int32(1), cache, first, pos, done, out, lengths)
    *_, out, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths


def decode_greedy(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prefill_chunk: int | None = None,
) -> DecodingResult:
    """Greedy (argmax) continuation of each token-id prompt, up to max_new_tokens or
    the first end-of-sequence token (default: the config's eos ids)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config
    if eos_token_id is None:
        eos = cfg.eos_token_ids
    else:
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)
    for row, prompt in enumerate(prompts):
        bad = [tok for tok in prompt if not 0 <= tok < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {row}: token ids {bad[:5]} outside [0, {cfg.vocab_size})")
    ids, positions, segments = left_pad(prompts, pad)
    graphdef, state = nnx.split(model)
    tokens, lengths = _generate(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(positions),
        jnp.asarray(segments),
        jnp.asarray(eos, jnp.int32).reshape(-1),
        jnp.int32(pad),
        max_new_tokens=max_new_tokens,
        prefill_chunk=prefill_chunk,
    )
    return DecodingResult(np.asarray(tokens), np.asarray(lengths))
