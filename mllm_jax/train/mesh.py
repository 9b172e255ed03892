"""Device mesh and logical-axis sharding rules.

Parameters (and any array we choose) carry logical axis names such as "embed" or
"heads"; `ShardingRules` maps each name to mesh axes, and `logical_to_spec` turns the
names of one array into a PartitionSpec for a given mesh. A dim that its mesh axes do
not divide is replicated (and the decision recorded), never sharded unevenly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """Mesh sizes that the available devices cannot form."""


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types.

    One of the sizes may be -1: it takes the remaining devices. Auto (not jax 0.10's
    default Explicit) lets XLA propagate shardings through e.g. a sharded embedding
    gather, which Explicit axes reject.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise MeshError(f"{len(devices)} devices do not split into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s < 1 for s in sizes):
        raise MeshError(f"mesh sizes must be >= 1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if math.prod(sizes) != len(devices):
        raise MeshError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {len(devices)} are available (set the config's mesh sizes to "
            "match, or one of them to -1 to take the rest)"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated)."""

    rules: Mapping[str, MeshAxes]

    def __post_init__(self) -> None:
        clean: dict[str, tuple[str, ...]] = {}
        for name, axes in dict(self.rules).items():
            axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if len(set(axes_t)) != len(axes_t):
                raise ValueError(f"sharding rule {name!r} -> {axes} repeats a mesh axis")
            clean[name] = axes_t
        object.__setattr__(self, "rules", MappingProxyType(clean))

    @classmethod
    def default(cls) -> ShardingRules:
        """FSDP over the embedding dim, tensor parallelism over heads / mlp / vocab."""
        return cls(
            {
                "batch": ("data", "fsdp"),
                "seq": None,
                "embed": "fsdp",
                "vocab": "tensor",
                "heads": "tensor",
                "kv_heads": "tensor",
                "head_dim": None,
                "mlp": "tensor",
                "norm": None,
                "cache_seq": None,
                "lora_rank": None,  # LoRA A/B inner dim (mllm_jax.model.lora): tiny, replicated
            }
        )

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        if name not in self.rules:
            raise KeyError(
                f"no sharding rule for logical axis {name!r}; known: {sorted(self.rules)}"
            )
        return self.rules[name]

    def replace(self, **changes: MeshAxes) -> ShardingRules:
        return ShardingRules({**self.rules, **changes})


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

    from mllm_jax.model.layers import AXIS_UNITS, LOGICAL_AXES

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
