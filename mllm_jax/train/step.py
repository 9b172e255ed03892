"""The jitted train and eval steps, with explicit input/output shardings.

One optimizer step takes a stacked batch [grad_accum, batch, seq] (batch sharded over
(data, fsdp)), scans over the micro-batches summing the gradients of the summed answer
cross-entropy, divides by the step's total number of answer tokens (so accumulation
equals one large batch, as HF's `num_items_in_batch`), clips, and applies AdamW.
Gradients exist only for the trainable state; the rng state (dropout streams) is carried
through the micro-batches and returned; the frozen state is a plain input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mllm_jax.encoding.tokens import TokenKind
from mllm_jax.model.sharding import ActivationSharding, ShardingRules
from mllm_jax.runs.state import SplitModel, replicated
from mllm_jax.train.batches import batch_sharding
from mllm_jax.train.loss import (
    AnswerSums,
    add_sums,
    answer_loss_sums,
    answer_positions,
    shot_label_mask,
    shot_label_sums,
    zero_sums,
)

Batch = dict[str, jax.Array]
FRAME, LABEL = int(TokenKind.FRAME), int(TokenKind.LABEL)


def _answer_sums(
    graphdef: nnx.GraphDef,
    trainable: nnx.State,
    rngs: nnx.State,
    frozen: nnx.State,
    micro: Batch,
    *,
    budget: int,
    remat: bool | str,
    sharding: ActivationSharding | None = None,
    shots: ShotLabels | None = None,
    slots: bool = False,
) -> tuple[AnswerSums, nnx.State] | tuple[AnswerSums, nnx.State, dict[str, jax.Array]]:
    """Forward of one micro-batch (each array [batch, seq]) -> (answer-token sums, the rng
    state after the call); with `shots`, the shot-label sums are filled in; with `slots`
    (needs `shots`), also the label candidates' logits at the answer and shot-label slots
    (see `make_eval_step`)."""
    # copy=True: fresh Variables at this trace level. Reusing the jit-level Variables of
    # the non-differentiated states makes nnx.remat (per-layer remat) refuse to update
    # them from inside jax.grad ("Cannot mutate Param from a different trace level").
    model = nnx.merge(graphdef, trainable, rngs, frozen, copy=True)
    hidden = model(
        micro["input_ids"],
        micro["positions"],
        micro["segment_ids"],
        return_hidden=True,
        remat=remat,
        activation_sharding=sharding,
    )
    kind = micro.get("token_kind")
    sums = answer_loss_sums(
        hidden, micro["targets"], micro["loss_mask"], model.logits, budget, kind
    )
    if shots is not None and kind is not None:

        def candidate_logits(h: jax.Array) -> jax.Array:
            return model.logits_for(h, shots.candidates)

        segments = micro["segment_ids"]
        loss, count, correct, excluded = shot_label_sums(
            hidden,
            micro["targets"],
            kind,
            candidate_logits,
            shots.candidates,
            shots.budget,
            segments,
        )
        sums = sums._replace(
            shot_loss=loss, shot_tokens=count, shot_correct=correct, shot_excluded=excluded
        )
        if slots:
            positions, _ = answer_positions(micro["loss_mask"], budget)
            # the same slots as the shot-label loss (`label_metrics.shot_slots` follows)
            shot_positions, _ = answer_positions(shot_label_mask(kind, segments), shots.budget)

            def at(where: jax.Array) -> jax.Array:
                return candidate_logits(jnp.take_along_axis(hidden, where[:, :, None], axis=1))

            out = {"logits": at(positions), "shot_logits": at(shot_positions)}
            return sums, nnx.state(model, nnx.RngState), out
    return sums, nnx.state(model, nnx.RngState)


class ShotLabels(NamedTuple):
    """The shot-label auxiliary loss: `weight` times the mean cross-entropy of the shots'
    label tokens among `candidates` (the label token ids), `budget` slots per row."""

    weight: float
    budget: int
    candidates: tuple[int, ...]


def objective(sums: AnswerSums, shot_weight: float) -> jax.Array:
    """The differentiated sum: answer cross-entropy plus the weighted shot-label term,
    scaled so that dividing by the answer-token count gives answer mean + weight * shot
    mean (exact for one micro-batch per step)."""
    if not shot_weight:
        return sums.loss
    scale = jax.lax.stop_gradient(sums.tokens / jnp.maximum(sums.shot_tokens, 1.0))
    return sums.loss + shot_weight * scale * sums.shot_loss


def sums_metrics(sums: AnswerSums) -> dict[str, jax.Array]:
    """Means of the sums: loss/accuracy over all answer tokens, and label-only, frame-only
    and shot-label numbers (NaN where a kind had no tokens). Label numbers are per token
    (a label of 10 and above counts once per digit); shot-label numbers leave out prompts
    with such labels and count their tokens (`shot_label_tokens_excluded`)."""

    def mean(total: jax.Array, count: jax.Array) -> jax.Array:
        return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)

    denom = jnp.maximum(sums.tokens, 1.0)
    return {
        "loss": sums.loss / denom,
        "accuracy": sums.correct / denom,
        "answer_tokens": sums.tokens,
        "frame_loss": mean(sums.kind_loss[FRAME], sums.kind_tokens[FRAME]),
        "frame_accuracy": mean(sums.kind_correct[FRAME], sums.kind_tokens[FRAME]),
        "label_loss": mean(sums.kind_loss[LABEL], sums.kind_tokens[LABEL]),
        "label_accuracy": mean(sums.kind_correct[LABEL], sums.kind_tokens[LABEL]),
        "label_tokens": sums.kind_tokens[LABEL],
        "shot_label_loss": mean(sums.shot_loss, sums.shot_tokens),
        "shot_label_accuracy": mean(sums.shot_correct, sums.shot_tokens),
        # shot-label tokens of prompts with labels of 10 and above: not in the two above
        "shot_label_tokens_excluded": sums.shot_excluded,
    }


def make_train_step(
    split: SplitModel,
    tx: optax.GradientTransformation,
    opt_shardings: Any,
    mesh: Mesh,
    *,
    budget: int,
    remat: bool | str,
    rules: ShardingRules | None = None,
    shots: ShotLabels | None = None,
) -> Callable[..., tuple[nnx.State, optax.OptState, nnx.State, dict[str, jax.Array]]]:
    """`step(trainable, opt_state, rngs, frozen, batch, lr)
    -> (trainable, opt_state, rngs, metrics)`.

    `tx` gives the update direction (`optim.make_optimizer`); the step applies
    `-lr * direction`, lr: f32[] (so one compiled step serves every stage's schedule).
    batch: dict of [grad_accum, batch, seq] arrays. metrics: f32 scalars `loss` (mean
    over answer tokens), `accuracy`, `answer_tokens`, `grad_norm` (before clipping), and
    the label-only numbers of `sums_metrics`. shots: the shot-label auxiliary loss (its
    sums are measured whenever given, added to the objective when its weight is > 0).
    trainable, opt_state and rngs are donated. remat: per-layer policy name or bool
    (`mllm_jax.model.qwen2`). rules: the parameters' sharding rules; given, the model
    pins its activations to the matching layout on `mesh` (`mllm_jax.model.sharding`).
    """
    graphdef = split.graphdef
    sharding = None if rules is None else ActivationSharding(mesh, rules)

    shot_weight = shots.weight if shots is not None else 0.0

    def loss_and_aux(trainable, rngs, frozen, micro):
        sums, rngs = _answer_sums(
            graphdef,
            trainable,
            rngs,
            frozen,
            micro,
            budget=budget,
            remat=remat,
            sharding=sharding,
            shots=shots,
        )
        return objective(sums, shot_weight), (sums, rngs)

    grad_fn = jax.grad(loss_and_aux, has_aux=True)

    def step(trainable, opt_state, rngs, frozen, batch, lr):
        def accumulate(carry, micro):
            grads, sums, rngs = carry
            g, (s, rngs) = grad_fn(trainable, rngs, frozen, micro)
            return (jax.tree.map(jnp.add, grads, g), add_sums(sums, s), rngs), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, sums, rngs), _ = jax.lax.scan(accumulate, (zeros, zero_sums(), rngs), batch)
        denom = jnp.maximum(sums.tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        direction, opt_state = tx.update(grads, opt_state, trainable)
        trainable = jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), trainable, direction)
        metrics = {**sums_metrics(sums), "grad_norm": grad_norm}
        return trainable, opt_state, rngs, metrics

    rep = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(
            split.trainable_shardings,
            opt_shardings,
            split.rngs_shardings,
            split.frozen_shardings,
            batch_sharding(mesh),
            rep,
        ),
        out_shardings=(split.trainable_shardings, opt_shardings, split.rngs_shardings, rep),
        donate_argnums=(0, 1, 2),
    )


def make_eval_step(
    split: SplitModel, mesh: Mesh, *, budget: int, shots: ShotLabels | None = None
) -> Callable[..., Any]:
    """`eval_step(trainable, rngs, frozen, batch) -> AnswerSums` summed over a stacked
    batch [micro, batch, seq], in eval mode (no dropout, no gradients, no remat).

    With `shots`: `-> (AnswerSums, slots)`, slots a dict of the label candidates' logits
    for label-set metrics on the host: `logits` f32[micro, batch, budget, C] at the answer
    slots, `shot_logits` f32[micro, batch, shots.budget, C] at the shot-label slots.
    """
    graphdef = split.eval_graphdef

    def evaluate(trainable, rngs, frozen, batch):
        def one(sums, micro):
            out = _answer_sums(
                graphdef,
                trainable,
                rngs,
                frozen,
                micro,
                budget=budget,
                remat=False,
                shots=shots,
                slots=shots is not None,
            )
            return add_sums(sums, out[0]), (out[2] if shots is not None else None)

        sums, slots = jax.lax.scan(one, zero_sums(), batch)
        return (sums, slots) if shots is not None else sums

    return jax.jit(
        evaluate,
        in_shardings=(
            split.trainable_shardings,
            split.rngs_shardings,
            split.frozen_shardings,
            batch_sharding(mesh),
        ),
        out_shardings=replicated(mesh),
    )
