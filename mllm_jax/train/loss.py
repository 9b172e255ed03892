"""Next-token cross-entropy on answer tokens only, with the LM head evaluated only there.

Most of a training sequence is prompt (the table rows); only the answer is scored. So the
final hidden states are gathered at a fixed number `budget` of answer positions per row
(the first `budget` True entries of `loss_mask`, padded) and only those go through the
vocab projection: [batch, budget, vocab] logits instead of [batch, seq, vocab]. The caller
guarantees no row has more than `budget` answer tokens (`batches.check_batch`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class AnswerSums(NamedTuple):
    """Sums over the answer tokens of a batch (divide by `tokens` for means)."""

    loss: jax.Array  # f32[]: summed cross-entropy
    tokens: jax.Array  # f32[]: number of answer tokens
    correct: jax.Array  # f32[]: answer tokens whose argmax is the target


def answer_positions(loss_mask: jax.Array, budget: int) -> tuple[jax.Array, jax.Array]:
    """The first `budget` answer positions of each row.

    loss_mask: bool[batch, seq]. Returns (positions i32[batch, budget], valid
    bool[batch, budget]); unused slots point at position 0 and are not valid.
    """
    mask = loss_mask.astype(bool)

    def one_row(row: jax.Array) -> jax.Array:
        return jnp.nonzero(row, size=budget, fill_value=0)[0].astype(jnp.int32)

    positions = jax.vmap(one_row)(mask)
    count = jnp.sum(mask, axis=1, dtype=jnp.int32)
    valid = jnp.arange(budget, dtype=jnp.int32)[None, :] < count[:, None]
    return positions, valid


def answer_loss_sums(
    hidden: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    lm_head,
    budget: int,
) -> AnswerSums:
    """Cross-entropy sums over the answer tokens.

    hidden: [batch, seq, embed] final-normed hidden states; targets: i32[batch, seq] (the
    next token); loss_mask: bool[batch, seq]; lm_head: [..., embed] -> f32[..., vocab]
    (the model's `logits`); budget: answer slots per row (static).
    """
    positions, valid = answer_positions(loss_mask, budget)
    picked = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)  # [B, K, E]
    labels = jnp.take_along_axis(targets, positions, axis=1)  # [B, K]
    logits = lm_head(picked).astype(jnp.float32)  # [B, K, V]
    # One max and one exp-sum pass over the vocab give both the cross-entropy and the
    # hit test (label logit == max; an exact tie counts as a hit), no separate argmax.
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1)) + peak[..., 0]
    picked_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    ce = lse - picked_logit
    hit = picked_logit >= peak[..., 0]
    weight = valid.astype(jnp.float32)
    return AnswerSums(
        loss=jnp.sum(ce * weight),
        tokens=jnp.sum(weight),
        correct=jnp.sum(hit * weight),
    )


def full_logits_loss_sums(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> AnswerSums:
    """The same sums from full logits f32[batch, seq, vocab] (a test reference)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weight = loss_mask.astype(jnp.float32)
    hit = jnp.argmax(logits, axis=-1) == targets
    return AnswerSums(jnp.sum(ce * weight), jnp.sum(weight), jnp.sum(hit * weight))
