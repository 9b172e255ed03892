"""Exact label scoring when a class is spelled with several tokens (more than 10 classes).

`score_chunks_spelled` is `engine.score_chunks` for label sets whose codes are spelled
with one or more digit tokens (`infer.labels`). The probability of class c at a slot is
the teacher-forced probability of its whole spelling, every digit and then the token
that closes the label in the answer (``},`` or ``}]``):

    log p(c) = log P(d1 | context) + log P(d2 | context, d1) + ... + log P(close | ..., dn)

each factor over the full vocabulary; the K class scores are then normalised over the
classes (a log-softmax). Scoring the closing token is what tells "1" from "12": both start
with "1"; class 1 continues with "},", class 12 with "2". Nothing is sampled.

How: the shared prefix is read only, as in `engine`; each row's answer is appended to its
own KV cache slot by slot. At a slot the model's next-token distribution gives every
first digit; then, class by class (a scan), the class's digits are written into the
row's cache after the slot, scored, and taken back (the cache's fill level and segment
ids are restored, so the written slots are empty again and the next write reuses them).
The class with the highest score, the model's own greedy answer, is then written for
real, followed by the fixed tokens up to the next slot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.infer.engine import extend_queries
from mllm_jax.model import KVCache


def _spelled_log_probs(model, cache, prefix, hidden, next_position, spell, lengths, closers):
    """f32[B, K] class log-probabilities at one slot (normalised over the K classes).

    hidden: [B, embed] final hidden state of the token before the slot; next_position:
    i32[B] the position of the label's first token; spell: i32[K, L] left-aligned digit
    tokens; lengths: i32[K]; closers: i32[B] the token after the label. The cache is
    returned with the same contents and fill level.
    """
    b = hidden.shape[0]
    width = spell.shape[1]
    first = jax.nn.log_softmax(model.logits(hidden), axis=-1)  # [B, V]
    start = jnp.take(first, spell[:, 0], axis=-1)  # [B, K]
    steps = jnp.arange(width)

    def one_class(cache, xs):
        tokens, n = xs  # i32[L], i32[]
        segments = jnp.broadcast_to((steps < n).astype(jnp.int32), (b, width))
        positions = next_position[:, None] + steps[None, :]
        ids = jnp.broadcast_to(tokens, (b, width))
        hid, written = model(ids, positions, segments, cache, prefix=prefix, return_hidden=True)
        log_probs = jax.nn.log_softmax(model.logits(hid), axis=-1)  # [B, L, V]
        # After digit j comes digit j+1, and after the last digit the closing token.
        following = jnp.concatenate([tokens[1:], tokens[:1]])
        targets = jnp.where(steps[None, :] < n - 1, following[None, :], closers[:, None])
        picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        total = jnp.sum(jnp.where(steps[None, :] < n, picked, 0.0), axis=-1)  # [B]
        # Take the class's tokens back: the next class (and the next step) writes at the
        # same slots; restoring the segment ids too keeps the cache exactly as it was.
        restored = dataclasses.replace(
            written, positions=cache.positions, segment_ids=cache.segment_ids, length=cache.length
        )
        return restored, total

    cache, rest = jax.lax.scan(one_class, cache, (spell, lengths))  # rest: [K, B]
    return jax.nn.log_softmax(start + rest.T, axis=-1), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def score_chunks_spelled(
    graphdef,
    state,
    prefix: KVCache | None,
    query_ids,
    query_positions,
    query_segments,
    fixed_ids,
    fixed_segments,
    spell,
    lengths,
    right_spell,
    right_mask,
    closers,
    *,
    chunk: int,
) -> jax.Array:
    """Class log-probabilities at every answer slot of B chunks, labels of any length.

    query_*: i32[B, Tq], left-padded (segment 0), each row ending with the answer head
    '[{"id": 0, "label": '. fixed_ids, fixed_segments: i32[R-1, F] the answer's fixed
    tokens between slots (`labels.fixed_steps`). spell: i32[K, L], lengths: i32[K]
    (`LabelSpelling`); right_spell, right_mask: i32[K, L] the same right-aligned (how the
    predicted label is written). closers: i32[B, R] the token after each slot's label.
    Returns f32[B, R, K] log-probabilities, normalised over the K classes.
    """
    model = nnx.merge(graphdef, state)
    b, tq = query_ids.shape
    steps, fixed_width = fixed_ids.shape
    width = spell.shape[1]
    # Room for the answer and for one class's digits scored past its end.
    cache = KVCache.create(model.config, b, tq + steps * (width + fixed_width) + width)
    last, cache = extend_queries(
        model, query_ids, query_positions, query_segments, cache, prefix, chunk
    )
    position = query_positions[:, -1] + 1
    first, cache = _spelled_log_probs(
        model, cache, prefix, last, position, spell, lengths, closers[:, 0]
    )

    def step(carry, xs):
        cache, previous, next_position = carry
        ids, segments, close = xs
        # The previous slot's predicted label (right-aligned), then the fixed tokens.
        ids = jnp.concatenate([right_spell[previous], jnp.broadcast_to(ids, (b, fixed_width))], 1)
        segments = jnp.concatenate(
            [right_mask[previous], jnp.broadcast_to(segments, (b, fixed_width))], axis=1
        )
        positions = next_position[:, None] + jnp.cumsum(segments, axis=1) - 1
        positions = jnp.where(segments > 0, positions, 0)
        hidden, cache = model(ids, positions, segments, cache, prefix=prefix, return_hidden=True)
        next_position = next_position + jnp.sum(segments, axis=1)
        log_probs, cache = _spelled_log_probs(
            model, cache, prefix, hidden[:, -1], next_position, spell, lengths, close
        )
        return (cache, jnp.argmax(log_probs, -1), next_position), log_probs

    start = (cache, jnp.argmax(first, -1), position)
    _, rest = jax.lax.scan(step, start, (fixed_ids, fixed_segments, closers[:, 1:].T))
    return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
