"""The model as the train step sees it: graph definitions (train mode, eval mode) plus
three pytrees of arrays, each with its sharding on the mesh:

    trainable  fp32 master weights: differentiated and optimized
    rngs       `nnx.RngState` (LoRA dropout streams): advanced by every step, checkpointed
    frozen     the rest (LoRA mode: the base weights, stored in bf16)

Mode "full": every `nnx.Param` trains. Mode "lora": only the adapter variables
(`mllm_jax.model.lora.LoRAParam`, deliberately not an `nnx.Param` subclass) train; the
filter below is the only place that decides what reaches the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllm_jax.foundation.distributed import device_put_global
from mllm_jax.model.lora import LoRAParam
from mllm_jax.model.sharding import ShardingRules, state_shardings


def trainable_filter(mode: str) -> Any:
    """The nnx filter of the trainable variables of `mode` ("full" | "lora")."""
    if mode == "full":
        return nnx.Param
    if mode == "lora":
        return LoRAParam
    raise ValueError(f"unknown training mode {mode!r} (expected 'lora' or 'full')")


@dataclasses.dataclass
class SplitModel:
    """Graph definitions + trainable / rng / frozen states with their NamedShardings.

    `graphdef` has stochastic layers active (`model.train()`), `eval_graphdef` inactive.
    """

    graphdef: nnx.GraphDef
    eval_graphdef: nnx.GraphDef
    trainable: nnx.State
    rngs: nnx.State
    frozen: nnx.State
    trainable_shardings: nnx.State
    rngs_shardings: nnx.State
    frozen_shardings: nnx.State

    def merge(self, trainable: nnx.State | None = None, *, train: bool = False) -> nnx.Module:
        """A module of the current (or the given trainable) state, in eval mode unless
        `train`."""
        return nnx.merge(
            self.graphdef if train else self.eval_graphdef,
            self.trainable if trainable is None else trainable,
            self.rngs,
            self.frozen,
        )


def _cast(state: nnx.State, dtype: Any, shardings: nnx.State) -> nnx.State:
    dtype = jnp.dtype(dtype)

    def cast(x):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(dtype) if floating and x.dtype != dtype else x

    return jax.jit(lambda s: jax.tree.map(cast, s), out_shardings=shardings)(state)


def _split(model: nnx.Module, mode: str) -> tuple[Any, Any, nnx.State, nnx.State, nnx.State]:
    """(train graphdef, eval graphdef, trainable, rngs, frozen) of `model`; ValueError if
    nothing would train."""
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, trainable, rngs, frozen = nnx.split(model, trainable_filter(mode), nnx.RngState, ...)
    model.eval()
    if not jax.tree.leaves(trainable):
        raise ValueError(
            f"mode {mode!r}: the model has no trainable variables"
            + (" (was apply_lora called?)" if mode == "lora" else "")
        )
    return graphdef, eval_graphdef, trainable, rngs, frozen


def split_model(
    model: nnx.Module,
    mode: str,
    mesh: Mesh,
    rules: ShardingRules,
    *,
    master_dtype: Any = jnp.float32,
    frozen_dtype: Any = jnp.bfloat16,
) -> SplitModel:
    """Splits `model` for training and places every part on `mesh`.

    Trainable arrays are cast to `master_dtype`, frozen floating arrays (LoRA mode) to
    `frozen_dtype`. Raises ValueError if nothing would train.
    """
    graphdef, eval_graphdef, trainable, rngs, frozen = _split(model, mode)
    t_shard = state_shardings(trainable, mesh, rules)
    r_shard = state_shardings(rngs, mesh, rules)
    f_shard = state_shardings(frozen, mesh, rules)
    trainable = _cast(trainable, master_dtype, t_shard)
    frozen = (
        _cast(frozen, frozen_dtype, f_shard)
        if mode == "lora"
        else device_put_global(frozen, f_shard)
    )
    rngs = device_put_global(rngs, r_shard)  # made whole on each process (same seed)
    return SplitModel(graphdef, eval_graphdef, trainable, rngs, frozen, t_shard, r_shard, f_shard)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def optimizer_shardings(
    tx: optax.GradientTransformation, trainable: nnx.State, shardings: nnx.State, mesh: Mesh
) -> Any:
    """Shardings of `tx`'s state: parameter-shaped leaves (moments) like their parameter,
    the rest (step counts) replicated."""
    abstract = jax.eval_shape(tx.init, trainable)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def init_optimizer(
    tx: optax.GradientTransformation, trainable: nnx.State, shardings: Any
) -> optax.OptState:
    return jax.jit(tx.init, out_shardings=shardings)(trainable)


def count_params(state: nnx.State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))


def abstract_split(
    model: nnx.Module,
    mode: str,
    mesh: Mesh,
    rules: ShardingRules,
    *,
    master_dtype: Any = jnp.float32,
    frozen_dtype: Any = jnp.bfloat16,
) -> SplitModel:
    """`split_model` of an abstract model (`nnx.eval_shape`): the same split, dtypes and
    shardings, with `jax.ShapeDtypeStruct` states, nothing allocated (for compiling the
    train step ahead of time, e.g. for a mesh this host does not have)."""
    graphdef, eval_graphdef, trainable, rngs, frozen = _split(model, mode)

    def with_dtype(state: nnx.State, dtype: Any) -> nnx.State:
        def one(x):
            floating = jnp.issubdtype(x.dtype, jnp.floating)
            return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if floating else x.dtype)

        return jax.tree.map(one, state)

    trainable = with_dtype(trainable, master_dtype)
    if mode == "lora":
        frozen = with_dtype(frozen, frozen_dtype)
    return SplitModel(
        graphdef,
        eval_graphdef,
        trainable,
        rngs,
        frozen,
        state_shardings(trainable, mesh, rules),
        state_shardings(rngs, mesh, rules),
        state_shardings(frozen, mesh, rules),
    )
