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
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mllm_jax.model.sharding import ActivationSharding
from mllm_jax.train.batches import batch_sharding
from mllm_jax.train.loss import AnswerSums, answer_loss_sums
from mllm_jax.train.mesh import ShardingRules
from mllm_jax.train.state import SplitModel, replicated

Batch = dict[str, jax.Array]


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
) -> tuple[AnswerSums, nnx.State]:
    """Forward of one micro-batch (each array [batch, seq]) -> (answer-token sums, the rng
    state after the call)."""
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
    sums = answer_loss_sums(hidden, micro["targets"], micro["loss_mask"], model.logits, budget)
    return sums, nnx.state(model, nnx.RngState)


def _zero_sums() -> AnswerSums:
    zero = jnp.zeros((), jnp.float32)
    return AnswerSums(zero, zero, zero)


def _add(a: AnswerSums, b: AnswerSums) -> AnswerSums:
    return AnswerSums(*(x + y for x, y in zip(a, b, strict=True)))


def make_train_step(
    split: SplitModel,
    tx: optax.GradientTransformation,
    opt_shardings: Any,
    mesh: Mesh,
    *,
    budget: int,
    remat: bool | str,
    rules: ShardingRules | None = None,
) -> Callable[..., tuple[nnx.State, optax.OptState, nnx.State, dict[str, jax.Array]]]:
    """`step(trainable, opt_state, rngs, frozen, batch, lr)
    -> (trainable, opt_state, rngs, metrics)`.

    `tx` gives the update direction (`optim.make_optimizer`); the step applies
    `-lr * direction`, lr: f32[] (so one compiled step serves every stage's schedule).
    batch: dict of [grad_accum, batch, seq] arrays. metrics: f32 scalars `loss` (mean
    over answer tokens), `accuracy`, `answer_tokens`, `grad_norm` (before clipping).
    trainable, opt_state and rngs are donated. remat: per-layer policy name or bool
    (`mllm_jax.model.remat`). rules: the parameters' sharding rules; given, the model
    pins its activations to the matching layout on `mesh` (`mllm_jax.model.sharding`).
    """
    graphdef = split.graphdef
    sharding = None if rules is None else ActivationSharding(mesh, rules)

    def loss_and_aux(trainable, rngs, frozen, micro):
        sums, rngs = _answer_sums(
            graphdef, trainable, rngs, frozen, micro, budget=budget, remat=remat, sharding=sharding
        )
        return sums.loss, (sums, rngs)

    grad_fn = jax.grad(loss_and_aux, has_aux=True)

    def step(trainable, opt_state, rngs, frozen, batch, lr):
        def accumulate(carry, micro):
            grads, sums, rngs = carry
            g, (s, rngs) = grad_fn(trainable, rngs, frozen, micro)
            return (jax.tree.map(jnp.add, grads, g), _add(sums, s), rngs), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, sums, rngs), _ = jax.lax.scan(accumulate, (zeros, _zero_sums(), rngs), batch)
        denom = jnp.maximum(sums.tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        direction, opt_state = tx.update(grads, opt_state, trainable)
        trainable = jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), trainable, direction)
        metrics = {
            "loss": sums.loss / denom,
            "accuracy": sums.correct / denom,
            "answer_tokens": sums.tokens,
            "grad_norm": grad_norm,
        }
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
    split: SplitModel, mesh: Mesh, *, budget: int
) -> Callable[[nnx.State, nnx.State, nnx.State, Batch], AnswerSums]:
    """`eval_step(trainable, rngs, frozen, batch) -> AnswerSums` summed over a stacked
    batch [micro, batch, seq], in eval mode (no dropout, no gradients, no remat)."""
    graphdef = split.eval_graphdef

    def evaluate(trainable, rngs, frozen, batch):
        def one(sums, micro):
            s, _ = _answer_sums(
                graphdef, trainable, rngs, frozen, micro, budget=budget, remat=False
            )
            return _add(sums, s), None

        sums, _ = jax.lax.scan(one, _zero_sums(), batch)
        return sums

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
