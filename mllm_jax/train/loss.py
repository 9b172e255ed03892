"""Next-token cross-entropy on answer tokens only, with the LM head evaluated only there.

Most of a training sequence is prompt (the table rows); only the answer is scored. So the
final hidden states are gathered at a fixed number `budget` of answer positions per row
(the first `budget` True entries of `loss_mask`, padded) and only those go through the
vocab projection: [batch, budget, vocab] logits instead of [batch, seq, vocab]. The caller
guarantees no row has more than `budget` answer tokens (`batches.check_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mllm_jax.encoding.tokens import TokenKind

N_KINDS = len(TokenKind)
LABEL = int(TokenKind.LABEL)
SHOT_LABEL = int(TokenKind.SHOT_LABEL)


class AnswerSums(NamedTuple):
    """Sums over the answer tokens of a batch (divide by `tokens` for means).

    `kind_*` split the same sums by the `TokenKind` of the target (index 1 frame, 2 label),
    so label-only numbers are never hidden by the JSON frame; they are per token, so a
    label of 10 and above counts once per digit. `shot_*` are over the shots' label tokens
    of prompts whose labels are all one token, scored among the label candidates only;
    `shot_excluded` counts the shot-label tokens of the other prompts (see
    `shot_label_sums`).
    """

    loss: jax.Array  # f32[]: summed cross-entropy
    tokens: jax.Array  # f32[]: number of answer tokens
    correct: jax.Array  # f32[]: answer tokens whose argmax is the target
    kind_loss: jax.Array  # f32[N_KINDS]
    kind_tokens: jax.Array  # f32[N_KINDS]
    kind_correct: jax.Array  # f32[N_KINDS]
    shot_loss: jax.Array  # f32[]
    shot_tokens: jax.Array  # f32[]
    shot_correct: jax.Array  # f32[]
    shot_excluded: jax.Array  # f32[]: shot-label tokens of prompts with multi-token labels


def zero_sums() -> AnswerSums:
    zero, kinds = jnp.zeros((), jnp.float32), jnp.zeros((N_KINDS,), jnp.float32)
    return AnswerSums(zero, zero, zero, kinds, kinds, kinds, zero, zero, zero, zero)


def add_sums(a: AnswerSums, b: AnswerSums) -> AnswerSums:
    return AnswerSums(*(x + y for x, y in zip(a, b, strict=True)))


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
    token_kind: jax.Array | None = None,
) -> AnswerSums:
    """Cross-entropy sums over the answer tokens.

    hidden: [batch, seq, embed] final-normed hidden states; targets: i32[batch, seq] (the
    next token); loss_mask: bool[batch, seq]; lm_head: [..., embed] -> f32[..., vocab]
    (the model's `logits`); budget: answer slots per row (static); token_kind:
    i32[batch, seq] target kinds (None: every answer token is frame). The `shot_*` sums
    are zero (see `shot_label_sums`).
    """
    positions, valid = answer_positions(loss_mask, budget)
    picked = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)  # [B, K, E]
    labels = jnp.take_along_axis(targets, positions, axis=1)  # [B, K]
    if token_kind is None:
        kinds = jnp.ones_like(labels)
    else:
        kinds = jnp.take_along_axis(token_kind.astype(jnp.int32), positions, axis=1)
    logits = lm_head(picked).astype(jnp.float32)  # [B, K, V]
    # One max and one exp-sum pass over the vocab give both the cross-entropy and the
    # hit test (label logit == max; an exact tie counts as a hit), no separate argmax.
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1)) + peak[..., 0]
    picked_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    ce = lse - picked_logit
    hit = picked_logit >= peak[..., 0]
    weight = valid.astype(jnp.float32)
    by_kind = jax.nn.one_hot(kinds, N_KINDS, dtype=jnp.float32) * weight[..., None]  # [B,K,4]
    zero = jnp.zeros((), jnp.float32)
    return AnswerSums(
        loss=jnp.sum(ce * weight),
        tokens=jnp.sum(weight),
        correct=jnp.sum(hit * weight),
        kind_loss=jnp.einsum("bk,bkn->n", ce, by_kind),
        kind_tokens=jnp.sum(by_kind, axis=(0, 1)),
        kind_correct=jnp.einsum("bk,bkn->n", hit.astype(jnp.float32), by_kind),
        shot_loss=zero,
        shot_tokens=zero,
        shot_correct=zero,
        shot_excluded=zero,
    )


def candidate_index(labels: jax.Array, candidates: tuple[int, ...]) -> jax.Array:
    """i32[...]: the index of each label token in `candidates` (0 where it is none)."""
    table = jnp.asarray(candidates, jnp.int32)
    return jnp.argmax(labels[..., None] == table, axis=-1).astype(jnp.int32)


def one_token_prompts(token_kind: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """bool[batch, seq]: the tokens of prompts (segments) whose labels are all one token.

    A label of 10 and above is several digit tokens, so in a prompt that shows one the
    distribution over the ten digits at a label's first token is over first digits ("1"
    stands for 1 and for 10-19), not over classes: softmax-over-digit metrics are defined
    only for the other prompts. A multi-token label is found as two label tokens in a row
    (labels are always separated by other tokens). token_kind, segment_ids: i32[batch, seq].
    """
    label = (token_kind == LABEL) | (token_kind == SHOT_LABEL)
    second = label & jnp.pad(label[:, :-1], ((0, 0), (1, 0)))  # a label token after another
    n = segment_ids.shape[1] + 1

    def one_row(second_row: jax.Array, segments: jax.Array) -> jax.Array:
        multi = jax.ops.segment_max(second_row.astype(jnp.int32), segments, num_segments=n)
        return multi[segments] <= 0

    return jax.vmap(one_row)(second, segment_ids)


def shot_label_mask(token_kind: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """bool[batch, seq]: the shot-label tokens the shot-label loss scores (those of
    prompts whose labels are all one token, `one_token_prompts`; segment_ids None: all)."""
    shots = token_kind == SHOT_LABEL
    if segment_ids is None:
        return shots
    return shots & one_token_prompts(token_kind, segment_ids)


def shot_label_sums(
    hidden: jax.Array,
    targets: jax.Array,
    token_kind: jax.Array,
    candidate_logits: Callable[[jax.Array], jax.Array],
    candidates: tuple[int, ...],
    budget: int,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(summed cross-entropy, count, correct, excluded) over the shots' label tokens.

    Each shot's label is predicted from its features and the shots before it: the
    in-context curve itself, with one label signal per shot instead of one per query.
    The softmax runs over the label candidates only (the digit tokens: `candidates`,
    `candidate_logits(h) -> f32[..., len(candidates)]`), so the LM head costs nothing
    at these positions. That softmax is a distribution over classes only where every
    label is one digit: with `segment_ids`, prompts showing a label of 10 and above are
    left out (`one_token_prompts`) and their shot-label tokens counted in `excluded`
    (their labels still get the answer loss, every digit). hidden: [batch, seq, embed];
    targets, token_kind, segment_ids: i32[batch, seq]; budget: shot-label slots per row
    (static; rows with more are cut at `budget`).
    """
    mask = shot_label_mask(token_kind, segment_ids)
    excluded = jnp.sum((token_kind == SHOT_LABEL) & ~mask, dtype=jnp.float32)
    positions, valid = answer_positions(mask, budget)
    picked = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)  # [B, K, E]
    labels = candidate_index(jnp.take_along_axis(targets, positions, axis=1), candidates)
    logits = candidate_logits(picked).astype(jnp.float32)  # [B, K, C]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hit = jnp.argmax(logits, axis=-1) == labels
    weight = valid.astype(jnp.float32)
    return jnp.sum(ce * weight), jnp.sum(weight), jnp.sum(hit * weight), excluded


def full_logits_loss_sums(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> AnswerSums:
    """The same sums from full logits f32[batch, seq, vocab] (a test reference)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weight = loss_mask.astype(jnp.float32)
    hit = jnp.argmax(logits, axis=-1) == targets
    frame = jnp.zeros((N_KINDS,), jnp.float32).at[int(TokenKind.FRAME)]
    zero = jnp.zeros((), jnp.float32)
    loss, tokens, correct = jnp.sum(ce * weight), jnp.sum(weight), jnp.sum(hit * weight)
    return AnswerSums(
        loss,
        tokens,
        correct,
        frame.set(loss),
        frame.set(tokens),
        frame.set(correct),
        zero,
        zero,
        zero,
        zero,
    )
