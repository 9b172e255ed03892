"""`Linear`: the one projection module of the model.

Every projection of the network (q/k/v/o, gate/up/down, an untied LM head) is a `Linear`
and goes through `Linear.__call__`, so an adapter (LoRA) can be attached here alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.model.layers import param


class Linear(nnx.Module):
    """y = x @ kernel + bias.

    kernel: param_dtype[in_features, out_features] (transposed w.r.t. torch's weight),
    bias: param_dtype[out_features] or None. `axes` are the logical axis names of the
    kernel dims; `units` the granularity at which a dim may be sharded (e.g. head_dim
    for a dim that concatenates heads, so heads are never split).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        units: tuple[int, int] = (1, 1),
        use_bias: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        init = nnx.initializers.normal(init_std)
        self.kernel = param(
            init(rngs.params(), (in_features, out_features), param_dtype), axes, units
        )
        self.bias = (
            param(jnp.zeros((out_features,), param_dtype), (axes[1],), (units[1],))
            if use_bias
            else None
        )
        # Slot for a LoRA adapter (`mllm_jax.model.lora.apply_lora`); declared as data so
        # a module can be attached later.
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """x: [..., in_features] -> [..., out_features] in out_dtype (default compute dtype).

        The matmul takes inputs in the compute dtype and accumulates in float32.
        """
        dtype = self.compute_dtype
        lead = x.shape[:-1]
        # One [N, in] x [in, out] matmul (a free reshape): with [batch, seq, in] inputs
        # the weight gradient contracts two dims, and XLA:CPU then materialises the
        # upstream gradient transposed (about 8x slower LoRA backward of an MLP).
        x = x.reshape(-1, x.shape[-1])
        y = jnp.matmul(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            preferred_element_type=jnp.float32,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora is not None:
            y = self.lora(x, y)
        return y.astype(out_dtype or dtype).reshape(*lead, y.shape[-1])
