"""The device side of inference: prefix prefill, slot-by-slot label scoring, generation.

Three jitted functions over a split model (`graphdef` static, `state` traced):

- `prefix_cache`: the shared prefix, batch 1, `chunk` tokens per model call, left-padded
  to a whole number of chunks (so prefixes of similar length share one compilation).
- `score_chunks`: B query parts continue the prefix (read only, never copied: attention
  over it is merged with attention over each row's own cache by log-sum-exp); then the
  answer is produced slot by slot. At each label slot the next-token distribution
  restricted to the label tokens gives that row's class probabilities, its argmax (the
  model's own greedy prediction, never the true label) is written into the slot, and the
  fixed tokens up to the next slot follow, in one model call per slot, appended to the
  row's KV cache (nothing recomputed).
- `decode_chunks`: greedy decoding after the query parts, keeping at every step the
  log-probabilities of the label tokens (for the probabilities of the JSON mode).

With `prefix=None` the query parts must hold the whole prompt: that is the "re-encode the
prefix for every chunk" path the benchmark compares against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.model import KVCache, Qwen2ForCausalLM
from mllm_jax.model.decoding import prefill

MAX_LABELS = 10
"""Label tokens are the digits 0..9; fewer classes mask the rest."""


def label_logits(model: Qwen2ForCausalLM, hidden: jax.Array, token_ids: jax.Array) -> jax.Array:
    """LM-head logits of a few tokens only: hidden [..., embed] -> f32[..., len(token_ids)].

    Equal to `model.logits(hidden)[..., token_ids]` without the full-vocabulary matmul
    (on a tiny model the vocabulary projection costs 100x the layers).
    """
    dtype = jnp.dtype(model.config.compute_dtype)
    head = model.lm_head
    if head is None:
        rows = jnp.take(model.embed_tokens.embedding[...], token_ids, axis=0)
        return jnp.einsum(
            "...e,ke->...k",
            hidden.astype(dtype),
            rows.astype(dtype),
            preferred_element_type=jnp.float32,
        )
    if head.bias is None and head.lora is None:
        columns = jnp.take(head.kernel[...], token_ids, axis=1)
        return jnp.matmul(
            hidden.astype(dtype), columns.astype(dtype), preferred_element_type=jnp.float32
        )
    return jnp.take(model.logits(hidden), token_ids, axis=-1)


def _label_log_probs(model, hidden, label_tokens, n_labels) -> jax.Array:
    """f32[B, MAX_LABELS] log-softmax over the first n_labels label tokens (rest -inf)."""
    logits = label_logits(model, hidden, label_tokens)
    valid = jnp.arange(MAX_LABELS) < n_labels
    return jax.nn.log_softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)


def extend_queries(model, ids, positions, segments, cache, prefix, chunk: int):
    """Appends [B, T] tokens to `cache`, attending also to `prefix`; `chunk` tokens per
    model call (T <= chunk or a multiple of it). Returns (final hidden of the last
    token [B, embed], cache)."""
    b, t = ids.shape
    if t <= chunk:
        hidden, cache = model(ids, positions, segments, cache, prefix=prefix, return_hidden=True)
        return hidden[:, -1], cache
    if t % chunk:
        raise ValueError(f"{t} query tokens are not a multiple of the chunk {chunk}")
    n = t // chunk

    def split(x):
        return jnp.moveaxis(x.reshape(b, n, chunk), 1, 0)

    def step(carry, xs):
        hidden, carry = model(*xs, carry, prefix=prefix, return_hidden=True)
        return carry, hidden[:, -1]

    cache, last = jax.lax.scan(step, cache, (split(ids), split(positions), split(segments)))
    return last[-1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def prefix_cache(graphdef, state, ids, positions, segments, *, chunk: int) -> KVCache:
    """ids, positions, segments: i32[1, S] (S a multiple of chunk, left padding has
    segment 0) -> a batch-1 KVCache of S slots."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.create(model.config, 1, ids.shape[1])
    _, cache = prefill(model, ids, positions, segments, cache, chunk_size=chunk)
    return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def score_chunks(
    graphdef,
    state,
    prefix: KVCache | None,
    query_ids,
    query_positions,
    query_segments,
    step_ids,
    step_segments,
    label_tokens,
    n_labels,
    *,
    chunk: int,
) -> jax.Array:
    """Label log-probabilities at every answer slot of B chunks.

    query_*: i32[B, Tq], left-padded (segment 0), each row ending with the answer head.
    step_ids, step_segments: i32[R-1, W] the answer steps (`AnswerFrame.steps`): the
    first real token of a step is the previous slot's label, filled here with the
    model's prediction. label_tokens: i32[MAX_LABELS]; n_labels: i32[] classes K.
    Returns f32[B, R, MAX_LABELS] log-probabilities (-inf beyond K).
    """
    model = nnx.merge(graphdef, state)
    b, tq = query_ids.shape
    steps, width = step_ids.shape
    cache = KVCache.create(model.config, b, tq + steps * width)
    last, cache = extend_queries(
        model, query_ids, query_positions, query_segments, cache, prefix, chunk
    )
    first = _label_log_probs(model, last, label_tokens, n_labels)

    def step(carry, xs):
        cache, previous, next_position = carry
        ids, segments = xs
        placeholder = jnp.argmax(segments)  # first real token of the step
        ids = jnp.where(
            jnp.arange(width) == placeholder,
            label_tokens[previous][:, None],
            jnp.broadcast_to(ids, (b, width)),
        )
        positions = next_position[:, None] + jnp.cumsum(segments) - 1
        positions = jnp.where(segments > 0, positions, 0)
        segs = jnp.broadcast_to(segments, (b, width))
        hidden, cache = model(ids, positions, segs, cache, prefix=prefix, return_hidden=True)
        log_probs = _label_log_probs(model, hidden[:, -1], label_tokens, n_labels)
        carry = (cache, jnp.argmax(log_probs, -1), next_position + jnp.sum(segments))
        return carry, log_probs

    start = (cache, jnp.argmax(first, -1), query_positions[:, -1] + 1)
    _, rest = jax.lax.scan(step, start, (step_ids, step_segments))
    return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "max_new_tokens"))
def decode_chunks(
    graphdef,
    state,
    prefix: KVCache | None,
    query_ids,
    query_positions,
    query_segments,
    eos_ids,
    pad_id,
    label_tokens,
    n_labels,
    *,
    chunk: int,
    max_new_tokens: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy continuation of B query parts (the prompt ends with the assistant header).

    Returns (tokens i32[B, max_new_tokens] padded with pad_id after the end, lengths
    i32[B] tokens generated with the end-of-sequence token, label log-probabilities
    f32[B, max_new_tokens, MAX_LABELS] of the distribution each token was drawn from).
    """
    model = nnx.merge(graphdef, state)
    b, tq = query_ids.shape
    cache = KVCache.create(model.config, b, tq + max_new_tokens)
    last, cache = extend_queries(
        model, query_ids, query_positions, query_segments, cache, prefix, chunk
    )

    def pick(hidden):
        logits = model.logits(hidden)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        valid = jnp.arange(MAX_LABELS) < n_labels
        labels = jnp.where(valid, jnp.take(logits, label_tokens, axis=-1), -jnp.inf)
        return token, jax.nn.log_softmax(labels, axis=-1)

    def is_eos(token):
        return (token[:, None] == eos_ids[None, :]).any(axis=-1)

    token, log_probs = pick(last)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    label_lp = jnp.zeros((b, max_new_tokens, MAX_LABELS), jnp.float32).at[:, 0].set(log_probs)
    done = is_eos(token)
    lengths = jnp.where(done, 1, max_new_tokens).astype(jnp.int32)

    def cond(carry):
        step, *_, done, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, token, position, done, tokens, label_lp, lengths = carry
        ones = jnp.ones((b, 1), jnp.int32)
        hidden, cache = model(
            token[:, None], position[:, None], ones, cache, prefix=prefix, return_hidden=True
        )
        nxt, log_probs = pick(hidden[:, 0])
        nxt = jnp.where(done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        label_lp = jax.lax.dynamic_update_slice(label_lp, log_probs[:, None], (0, step, 0))
        ended = is_eos(nxt) & ~done
        lengths = jnp.where(ended, step + 1, lengths)
        return step + 1, cache, nxt, position + 1, done | ended, tokens, label_lp, lengths

    carry = (
        jnp.int32(1),
        cache,
        token,
        query_positions[:, -1] + 1,
        done,
        tokens,
        label_lp,
        lengths,
    )
    *_, tokens, label_lp, lengths = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths, label_lp
