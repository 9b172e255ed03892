"""The device mesh a run trains on: (data, fsdp, tensor).

How parameters and activations map onto it is the model's business
(`mllm_jax.model.sharding.ShardingRules`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

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
