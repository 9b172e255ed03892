"""The MLP-SCM activation family (reference ``tabicl.prior.activations``).

Every layer draws one of 28 entries: 18 fixed functions and 10 copies of a random
sine sum (``RandomFunctionActivation``), each wrapped as standardise -> random affine
(scale exp(2 N), shift N) -> function. The reference's extra "random choice" entries
resolve to a uniform pick among the same 28, which ``hparams`` folds into the per-layer
probabilities.

The sine sum draws 256 frequencies f ~ U(0, 256) with weights ~ f^-d N(0, 1),
d ~ logU(0.7, 3), normalised. We evaluate only the ``sine_terms`` terms of largest
|weight| (32 keep 98.8% of the weight energy on average, 92% at the 5th percentile),
with a polynomial sine, since this activation dominates the reference's run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.prior import rng

N_FIXED = 18
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _fixed() -> list[Callable[[jax.Array], jax.Array]]:
    """The 18 fixed activations, in the reference's order, with torch's defaults."""
    return [
        jnp.tanh,
        lambda x: jnp.where(x >= 0, x, 0.01 * x),  # LeakyReLU
        lambda x: jnp.where(x > 0, x, jnp.expm1(x)),  # ELU
        lambda x: x,  # Identity
        lambda x: _SELU_SCALE * jnp.where(x > 0, x, _SELU_ALPHA * jnp.expm1(x)),  # SELU
        lambda x: x * jax.nn.sigmoid(x),  # SiLU
        lambda x: jnp.maximum(x, 0.0),  # ReLU
        lambda x: jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(x))),  # Softplus(threshold=20)
        lambda x: jnp.clip(x, 0.0, 6.0),  # ReLU6
        lambda x: jnp.clip(x, -1.0, 1.0),  # Hardtanh
        lambda x: jnp.where(x >= 0, 1.0, -1.0),  # sign
        lambda x: jnp.exp(-(x * x)),  # RBF
        jnp.exp,
        lambda x: jnp.sqrt(jnp.abs(x)),
        lambda x: (jnp.abs(x) <= 1.0).astype(x.dtype),  # unit-interval indicator
        rng.sin,
        lambda x: x * x,
        jnp.abs,
    ]


def standardise(x: jax.Array) -> jax.Array:
    """Column-wise (x - mean) / (unbiased std + 1e-6), reference ``StdScaleLayer``."""
    mean = x.mean(axis=0)
    std = jnp.sqrt(((x - mean) ** 2).sum(axis=0) / (x.shape[0] - 1))
    return (x - mean) / (std + 1e-6)


def sine_sum(stream: rng.Stream, x: jax.Array, terms: int, table: int) -> jax.Array:
    """Reference ``RandomFunctionActivation`` truncated to the ``terms`` largest weights.

    Args:
        stream: draws frequencies, phases, decay and weights.
        x: f32[rows, width] input (standardised here, as in the reference).
        terms: static number of terms kept out of 256.
        table: static; 0 evaluates every element directly, otherwise the function is
            tabulated at ``table`` points (a multiple of 128) spanning the input's range
            and linearly interpolated (error <= h^2/8 * sum |w| f^2, h the spacing).

    Returns:
        f32[rows, width] sum_k w_k sin(f_k z + b_k) over the kept terms.
    """
    n = 256
    freqs = n * rng.uniform(rng.fold(stream, 0), (n,))
    b_turns = rng.uniform(rng.fold(stream, 1), (n,))  # phases 2*pi*U, in turns
    decay = jnp.exp(rng.uniform_in(rng.fold(stream, 2), math.log(0.7), math.log(3.0)))
    factors = freqs**-decay
    factors = factors / jnp.sqrt(jnp.sum(factors * factors))
    w = factors * rng.normal(rng.fold(stream, 3), (n,))
    if terms < n:  # the order of the terms does not matter; keeping all needs no sort
        _, top = jax.lax.top_k(jnp.abs(w), terms)
        freqs, b_turns, w = freqs[top], b_turns[top], w[top]
    f_turns = freqs * np.float32(1.0 / (2.0 * math.pi))
    z = standardise(x)

    def evaluate(points):
        def term(k, acc):
            return acc + w[k] * rng.sin_turns(points * f_turns[k] + b_turns[k])

        return jax.lax.fori_loop(0, terms, term, jnp.zeros_like(points), unroll=min(terms, 4))

    if not table:
        return evaluate(z)
    # Table at `table` points spanning [min z, max z], read with two clipped gathers.
    # Point j = 128 a + c: the phase splits into a row part A[a] and a column part B[c],
    # and sin(A + B) = sin A cos B + cos A sin B turns the table into one
    # [a, 2 terms] x [2 terms, 128] product: (a + 128) x terms sines instead of
    # table x terms (the sines were most of a small MLP task's time).
    lo, hi = z.min(), z.max()
    step = (hi - lo) / (table - 1)
    a = jnp.arange(table // 128, dtype=jnp.float32)
    c = jnp.arange(128, dtype=jnp.float32)
    row_phase = (lo + (128.0 * step) * a)[:, None] * f_turns[None, :] + b_turns[None, :]
    col_phase = (step * c)[None, :] * f_turns[:, None]  # [terms, 128]
    by_row = jnp.concatenate(
        [w * rng.sin_turns(row_phase), w * rng.sin_turns(row_phase + 0.25)], axis=1
    )  # [a, 2 terms]: w sin A, w cos A
    by_col = jnp.concatenate(
        [rng.sin_turns(col_phase + 0.25), rng.sin_turns(col_phase)], axis=0
    )  # [2 terms, 128]: cos B, sin B
    values = jnp.matmul(by_row, by_col, precision=jax.lax.Precision.HIGHEST).reshape(-1)
    t = (z - lo) / jnp.maximum(step, 1e-30)
    i = jnp.clip(jnp.floor(t), 0, table - 2)
    frac = t - i
    i = i.astype(jnp.int32)
    left = jnp.take(values, i, mode="clip")
    right = jnp.take(values, i + 1, mode="clip")
    return left + (right - left) * frac


def activation(
    stream: rng.Stream,
    h: jax.Array,
    n_cols: jax.Array,
    probs: jax.Array,
    sine_terms: int,
    sine_table: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """One layer's activation: draw its kind, standardise, random affine, apply.

    Args:
        stream: random stream of this layer's activation.
        h: f32[rows, width] pre-activation (zero beyond ``n_cols``).
        n_cols: i32 real columns.
        probs: f32[28] probabilities of the 28 kinds.
        sine_terms: static, terms kept in the sine sum.
        sine_table: static, points of its interpolation table (0: direct).

    Returns:
        (f32[rows, width] activation, zero beyond ``n_cols``; i32 kind drawn).
    """
    kind = rng.categorical(rng.fold(stream, 0), probs)
    scale = jnp.exp(2.0 * rng.normal(rng.fold(stream, 1)))
    shift = rng.normal(rng.fold(stream, 2))
    v = scale * (standardise(h) + shift)
    fixed = [lambda v, s, f=f: f(v) for f in _fixed()]
    branches = [*fixed, lambda v, s: sine_sum(s, v, sine_terms, sine_table)]
    out = jax.lax.switch(jnp.minimum(kind, N_FIXED), branches, v, rng.fold(stream, 3))
    return jnp.where(jnp.arange(h.shape[1]) < n_cols, out, 0.0), kind
