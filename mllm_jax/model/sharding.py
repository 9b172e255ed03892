"""Activation sharding constraints, active only when a caller supplies a mesh + rules.

The model hard-codes no mesh: without an `ActivationSharding` every constraint below is
the identity and the model runs unconstrained (one device, or whatever the caller's jit
decides). A trainer that shards parameters (FSDP on `embed`, tensor parallelism on
`heads` / `mlp`) passes one, and the layers pin their activations to the matching
layout: the batch dim over the batch mesh axes, the head / mlp dims over the tensor axis
where whole heads divide. Without these pins XLA's sharding propagation may pick, for
example, the embed sharding of a weight for the residual stream and then reshard it
with an "involuntary full rematerialization" per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationSharding:
    """Logical activation axes -> mesh axes (`rules`: a `mllm_jax.train.mesh.ShardingRules`).

    Hashed by identity (it is static data of a traced call).
    """

    mesh: Mesh
    rules: Any

    def constrain(
        self, x: jax.Array, axes: Sequence[str | None], units: Sequence[int] | None = None
    ) -> jax.Array:
        """x pinned to the sharding of its logical `axes` (dims whose mesh axes do not
        divide them, in `units`, stay replicated)."""
        from mllm_jax.train.mesh import logical_to_spec

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
