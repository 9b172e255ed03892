"""Small building blocks: parameters with logical axis names, RMSNorm, token embedding.

Every parameter carries flax variable metadata `logical_axes` (one name or None per
dim, e.g. ("vocab", "embed")) and `axis_units` (a dim is only ever sharded in whole
units, e.g. whole heads). `mllm_jax.train.mesh` maps the names onto a mesh. These
layers take at most an optional `ActivationSharding`; the model's placement helpers
(`Qwen2ForCausalLM` sharded init, `cache`, `hf`, `lora`) import the trainer's mesh rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.model.sharding import ActivationSharding, constrain

LOGICAL_AXES = "logical_axes"
AXIS_UNITS = "axis_units"


def param(
    value: jax.Array, axes: tuple[str | None, ...], units: tuple[int, ...] | None = None
) -> nnx.Param:
    """An nnx.Param tagged with logical axis names (and sharding units) per dim."""
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} logical axes {axes} for a {value.ndim}-d parameter")
    units = tuple(units) if units is not None else (1,) * value.ndim
    return nnx.Param(value, **{LOGICAL_AXES: tuple(axes), AXIS_UNITS: units})


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32.

    scale: param_dtype[dim] (torch's `weight`). As transformers, the normalised value is
    cast back to the input dtype before the scale multiplies it.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> same shape and dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table: embedding: param_dtype[vocab, embed] (torch's `weight`)."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.compute_dtype = compute_dtype
        init = nnx.initializers.normal(init_std)
        self.embedding = param(
            init(rngs.params(), (vocab_size, dim), param_dtype), ("vocab", "embed")
        )

    def __call__(self, ids: jax.Array, sharding: ActivationSharding | None = None) -> jax.Array:
        """ids: i32[batch, seq] -> [batch, seq, embed] in the compute dtype.

        With a `sharding`, the table's embed dim is gathered first (as FSDP does for every
        weight) so the rows come out sharded like the ids (batch), not over embed.
        """
        table = constrain(self.embedding[...], sharding, ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: x: [..., embed] -> f32[..., vocab] = x @ embedding^T."""
        table = self.embedding[...].astype(self.compute_dtype)
        return jnp.einsum(
            "...e,ve->...v", x.astype(self.compute_dtype), table, preferred_element_type=jnp.float32
        )
