"""Root causes: the independent input columns of an SCM (reference ``XSampler``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np

from mllm_jax.prior import rng
from mllm_jax.prior.hparams import SAMPLING_MIXED, SAMPLING_NORMAL, SAMPLING_UNIFORM

_MAX_CATEGORIES = 20  # multinomial causes have randint(2, 20) categories
_ZIPF_CLIP = 10  # zipf causes are clamped at 10


def _std(x: jax.Array, axis: int = 0) -> jax.Array:
    """Unbiased standard deviation (torch's default)."""
    n = x.shape[axis]
    mean = x.mean(axis=axis, keepdims=True)
    return jnp.sqrt(((x - mean) ** 2).sum(axis=axis) / (n - 1))


def _normal(stream: rng.Stream, rows: int, width: int, pre_stats: jax.Array) -> jax.Array:
    means = rng.normal(rng.fold(stream, 1), (width,))
    means, stds = rng.materialised(
        (means, jnp.abs(rng.normal(rng.fold(stream, 2), (width,)) * means))
    )
    z = rng.normal(rng.fold(stream, 3), (rows, width))
    return jnp.where(pre_stats, means + stds * z, z)


def _transposed(table: jax.Array) -> jax.Array:
    """f32[k, width] copy of a per-column table f32[width, k].

    In its own buffer: fused into a [rows, width] loop, the transpose turns every read
    of the table into a strided one (counting categories ran about 8x slower).
    """
    return rng.materialised(table.T)


def _count_below(u: jax.Array, cdf_t: jax.Array) -> jax.Array:
    """f32[rows, width]: how many of a column's cdf values (f32[k, width]) are <= u."""
    count = jnp.zeros(u.shape, jnp.int32)
    for j in range(cdf_t.shape[0]):
        count = count + (u >= cdf_t[j]).astype(jnp.int32)
    return count.astype(jnp.float32)


def _multinomial(stream: rng.Stream, rows: int, width: int) -> jax.Array:
    """Per column: codes from randint(2, 20) categories with U(0,1) weights, standardised."""
    n_cat = rng.randint(rng.fold(stream, 1), 2, _MAX_CATEGORIES + 1, (width,))
    weights = rng.uniform(rng.fold(stream, 2), (width, _MAX_CATEGORIES))
    weights = jnp.where(jnp.arange(_MAX_CATEGORIES) < n_cat[:, None], weights, 0.0)
    cdf_t = _transposed(jnp.cumsum(weights, axis=1))
    u = rng.uniform(rng.fold(stream, 3), (rows, width)) * cdf_t[-1]
    codes = jnp.minimum(_count_below(u, cdf_t), rng.materialised((n_cat - 1).astype(jnp.float32)))
    return (codes - codes.mean(axis=0)) / _std(codes)


def _zipf(stream: rng.Stream, rows: int, width: int) -> jax.Array:
    """Per column: Zipf(a ~ U(2, 4)) clamped at 10, centred (not scaled)."""
    a = rng.uniform_in(rng.fold(stream, 1), 2.0, 4.0, (width,))
    k = jnp.arange(1, _ZIPF_CLIP, dtype=jnp.float32)
    pmf = k[None, :] ** (-a[:, None]) / jsp.zeta(a, 1.0)[:, None]  # P(1..9)
    cdf = jnp.cumsum(pmf, axis=1)
    u = rng.uniform(rng.fold(stream, 2), (rows, width))
    x = 1.0 + _count_below(u, _transposed(cdf))
    return x - x.mean(axis=0)


def _uniform(stream: rng.Stream, rows: int, width: int) -> jax.Array:
    """U[0, 1) on the grid of the reference's ``torch.rand``: the 2^24 multiples of 2^-24.

    Not ``rng.uniform``: its odd multiples of 2^-25 do not exist in float32 above 0.5 and
    round onto a 2^-23 grid there, so a column's values tied 1.5x as often as the
    reference's (seen in ``feature_distinct_fraction``, docs/prior.md "Tree tasks").
    """
    return (rng.bits(stream, (rows, width)) >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def _mixed(
    task: rng.Stream, stream: rng.Stream, rows: int, width: int, pre_stats: jax.Array
) -> jax.Array:
    """Per column one of four kinds, with task-level probabilities drawn from ``task``."""
    # Per-column choices in buffers of their own: fused, they were hashed again per row.
    p, u = rng.materialised(
        (
            0.66 * rng.uniform(rng.fold(task, 0), (3,)),
            rng.uniform(rng.fold(stream, 1), (3, width)),
        )
    )
    p_zipf, p_multi, p_normal = p
    # Barriers keep the four draws in separate loops (one fused loop compiles for minutes).
    normal, multi, zipf, unif = jax.lax.optimization_barrier(
        (
            _normal(rng.fold(stream, 2), rows, width, pre_stats),
            _multinomial(rng.fold(stream, 3), rows, width),
            _zipf(rng.fold(stream, 4), rows, width),
            _uniform(rng.fold(stream, 5), rows, width),
        )
    )
    return jnp.where(
        u[0] > p_normal,
        normal,
        jnp.where(u[1] > p_multi, multi, jnp.where(u[2] > p_zipf, zipf, unif)),
    )


def sample_causes(
    stream: rng.Stream,
    rows: int,
    width: int,
    n_cols: jax.Array,
    sampling: jax.Array,
    pre_stats: jax.Array,
    tile: jax.Array | int = 0,
) -> jax.Array:
    """Root causes of one task: columns ``tile * width`` on of them.

    Args:
        stream: random stream of the task's causes.
        rows, width: static output shape.
        n_cols: i32 number of real columns here (the rest are zero).
        sampling: SAMPLING_NORMAL (N(0,1), or per-column N(m, |s*m|) with pre_stats),
            SAMPLING_UNIFORM (U[0,1), on torch.rand's 2^-24 grid) or SAMPLING_MIXED (per
            column one of normal, multinomial, zipf, uniform with task-level
            probabilities).
        pre_stats: bool, per-column means and stds for normal causes.
        tile: i32, which block of ``width`` columns: each block draws its columns from
            a stream of its own, and the task-level choices from ``stream``.

    Returns:
        f32[rows, width].
    """
    columns = rng.fold(stream, 1 + jnp.asarray(tile))
    branches = [None] * 3
    branches[SAMPLING_NORMAL] = lambda s: _normal(s, rows, width, pre_stats)
    branches[SAMPLING_MIXED] = lambda s: _mixed(stream, s, rows, width, pre_stats)
    branches[SAMPLING_UNIFORM] = lambda s: _uniform(s, rows, width)
    x = jax.lax.switch(sampling, branches, columns)
    return jnp.where(jnp.arange(width) < n_cols, x, 0.0)


TILE = 16  # columns of causes drawn together


def in_tiles(
    stream: rng.Stream,
    rows: int,
    n_cols: jax.Array,
    sampling: jax.Array,
    pre_stats: jax.Array,
    update: Callable[[jax.Array, jax.Array, Any], Any],
    init: Any,
) -> Any:
    """Draws a task's ``n_cols`` root causes in blocks of ``TILE`` columns, as many blocks
    as they need, and folds them into a carry: ``carry = update(t, causes, carry)`` for
    block t (causes f32[rows, TILE], columns ``t * TILE`` on, zero beyond ``n_cols``).

    A task has 1-50 causes while its padded width reaches 512: drawing only the blocks
    it needs keeps the work, and the compiled code, to one block's worth.
    """

    def block(t, carry):
        causes = sample_causes(stream, rows, TILE, n_cols - t * TILE, sampling, pre_stats, t)
        return update(t, causes, carry)

    return jax.lax.fori_loop(0, (n_cols + TILE - 1) // TILE, block, init)


def padded(n: int) -> int:
    """``n`` rounded up to whole blocks of ``TILE`` columns."""
    return -(-n // TILE) * TILE
