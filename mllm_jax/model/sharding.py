"""The model's sharding rules: logical axis names, how they map to mesh axes, and the
activation constraints that use them.

Every parameter carries logical axis names (flax variable metadata `logical_axes`, one
name or None per dim, e.g. ("vocab", "embed")) and sharding units (`axis_units`: a dim is
only ever sharded in whole units, e.g. whole heads). `ShardingRules` maps each logical
name to mesh axes; `logical_to_spec` turns the names of one array into a PartitionSpec
for a given mesh. A dim that its mesh axes do not divide is replicated (and the decision
recorded), never sharded unevenly.

The model hard-codes no mesh: without an `ActivationSharding` every constraint is the
identity and the model runs unconstrained (one device, or whatever the caller's jit
decides). A trainer that shards parameters (FSDP on `embed`, tensor parallelism on
`heads` / `mlp`) passes one, and the layers pin their activations to the matching
layout. Without these pins XLA's sharding propagation may pick, for example, the embed
sharding of a weight for the residual stream and then reshard it with an "involuntary
full rematerialization" per layer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from collections.abc import Sequence
from typing import Any, Literal

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# The flax variable metadata keys every parameter carries.
LOGICAL_AXES = "logical_axes"
AXIS_UNITS = "axis_units"

LogicalAxis = Literal[
    "batch",
    "seq",
    "embed",
    "vocab",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "norm",
    "cache_seq",
    "lora_rank",
]
LOGICAL_AXIS_NAMES: tuple[str, ...] = typing.get_args(LogicalAxis)

MeshAxes = str | tuple[str, ...] | None


def _as_axes(name: str, axes: MeshAxes) -> tuple[str, ...]:
    if axes is not None and not isinstance(axes, str | tuple | list):
        raise ValueError(
            f"sharding rule {name!r} -> {axes!r}: give a mesh axis name, a tuple of them or None"
        )
    axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if not all(isinstance(a, str) for a in axes_t):
        raise ValueError(f"sharding rule {name!r} -> {axes!r}: mesh axes must be names")
    if len(set(axes_t)) != len(axes_t):
        raise ValueError(f"sharding rule {name!r} -> {axes} repeats a mesh axis")
    return axes_t


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Mesh axes of each logical axis: a mesh axis name, a tuple of them, or None
    (replicated); stored as tuples. The defaults are FSDP over the embedding dim and
    tensor parallelism over heads / mlp / vocab."""

    batch: MeshAxes = ("data", "fsdp")
    seq: MeshAxes = None
    embed: MeshAxes = "fsdp"
    vocab: MeshAxes = "tensor"
    heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    mlp: MeshAxes = "tensor"
    norm: MeshAxes = None
    cache_seq: MeshAxes = None
    lora_rank: MeshAxes = None  # the LoRA A/B inner dim: tiny, replicated

    def __post_init__(self) -> None:
        for name in LOGICAL_AXIS_NAMES:
            object.__setattr__(self, name, _as_axes(name, getattr(self, name)))

    @classmethod
    def default(cls) -> ShardingRules:
        return cls()

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        """The mesh axes of logical axis `name` (() for None)."""
        if name is None:
            return ()
        if name not in LOGICAL_AXIS_NAMES:
            raise KeyError(
                f"no sharding rule for logical axis {name!r}; known: {sorted(LOGICAL_AXIS_NAMES)}"
            )
        return getattr(self, name)

    def replace(self, **changes: MeshAxes) -> ShardingRules:
        """These rules with some logical axes mapped elsewhere (KeyError naming an
        unknown logical axis)."""
        unknown = sorted(set(changes) - set(LOGICAL_AXIS_NAMES))
        if unknown:
            raise KeyError(
                f"no logical axis {unknown[0]!r} to set a sharding rule for; "
                f"known: {sorted(LOGICAL_AXIS_NAMES)}"
            )
        return dataclasses.replace(self, **changes)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: ShardingRules,
    *,
    units: Sequence[int] | None = None,
    notes: list[str] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names` and `shape` on `mesh`.

    A dim is sharded only if its mesh axes' total size divides shape[d] // units[d]
    (units: sharding granularity per dim, e.g. head_dim for concatenated heads);
    otherwise it is replicated and a note is logged (and appended to `notes`).
    Raises ValueError if two dims of the array would use the same mesh axis.
    """
    if names is None:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    units = tuple(units) if units is not None else (1,) * len(shape)
    used: dict[str, str] = {}
    spec: list[MeshAxes] = []
    for name, size, unit in zip(names, shape, units, strict=True):
        axes = tuple(a for a in rules.mesh_axes(name) if a in mesh.shape)
        for a in axes:
            if a in used:
                raise ValueError(
                    f"logical axes {tuple(names)}: {used[a]!r} and {name!r} both map to mesh axis {a!r}"
                )
            used[a] = name
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and (size % unit or (size // unit) % ways):
            msg = (
                f"axis {name!r} of size {size} (units of {unit}) is not divisible by mesh "
                f"axes {axes} = {ways}; replicated"
            )
            log.info(msg)
            if notes is not None:
                notes.append(msg)
            axes = ()
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def state_shardings(state: Any, mesh: Mesh, rules: ShardingRules, notes: list[str] | None = None):
    """The NamedSharding of every Variable of an nnx State (or abstract State), in the
    same tree structure (each Variable's value replaced by its sharding), from the
    variables' `logical_axes` metadata; arrays without it are replicated."""
    from flax import nnx

    def one(var: Any) -> Any:
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        meta = var.get_metadata()
        spec = logical_to_spec(
            meta.get(LOGICAL_AXES),
            var.get_value().shape,
            mesh,
            rules,
            units=meta.get(AXIS_UNITS),
            notes=notes,
        )
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationSharding:
    """Logical activation axes -> mesh axes, by `rules`, on `mesh`.

    Hashed by identity (it is static data of a traced call).
    """

    mesh: Mesh
    rules: ShardingRules

    def constrain(
        self, x: jax.Array, axes: Sequence[str | None], units: Sequence[int] | None = None
    ) -> jax.Array:
        """x pinned to the sharding of its logical `axes` (dims whose mesh axes do not
        divide them, in `units`, stay replicated)."""
        spec = logical_to_spec(tuple(axes), x.shape, self.mesh, self.rules, units=units)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def constrain(
    x: jax.Array,
    sharding: ActivationSharding | None,
    axes: Sequence[str | None],
    units: Sequence[int] | None = None,
) -> jax.Array:
    """`sharding.constrain(x, axes, units)`, or x itself without a sharding."""
    return x if sharding is None else sharding.constrain(x, axes, units)
