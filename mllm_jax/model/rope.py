"""Rotary position embeddings (RoPE), plain or YaRN-scaled, as transformers computes them
for Qwen2 (`modeling_rope_utils._compute_yarn_parameters`).

Frequencies are computed once on the host in float32; the rotation runs in float32 and
is cast back to the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.model.config import Qwen2Config, YarnScaling


def _yarn_attention_factor(scaling: YarnScaling) -> float:
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return mscale(scaling.factor)


def _yarn_inverse_frequencies(dim: int, base: float, scaling: YarnScaling) -> np.ndarray:
    def correction_dim(rotations: float) -> float:
        orig = scaling.original_max_position_embeddings
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    return (
        interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    ).astype(np.float32)


def rope_frequencies(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """(inverse frequencies f32[head_dim // 2], attention factor that scales cos and sin)."""
    dim, base = config.head_dim, config.rope_theta
    if config.rope_scaling is None:
        inv = np.float32(1.0) / (
            np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        )
        return inv.astype(np.float32), 1.0
    scaling = config.rope_scaling
    return _yarn_inverse_frequencies(dim, base, scaling), _yarn_attention_factor(scaling)


def rope_tables(
    positions: jax.Array, inv_freq: np.ndarray, attention_factor: float
) -> tuple[jax.Array, jax.Array]:
    """cos, sin: f32[batch, seq, head_dim // 2] for positions: i32[batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x: [batch, seq, heads, head_dim] by the tables cos/sin: f32[batch, seq, head_dim//2].

    Half-split convention (transformers' `rotate_half`), not interleaved pairs.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
