"""Fast counter-based random streams for the bulk draws of one task.

Task identity comes from JAX keys (``fold_in(key(seed), index)``); the bulk arrays of a
task (causes, weights, noise) come from a keyed integer hash of an element counter.
On CPU, XLA's threefry produces about 60-90 M numbers/s and its ``sin`` about 100 M/s,
while these fused integer hashes and the polynomial sine below run several times
faster, which the prior needs (a task draws about 10^5-10^6 numbers).

A stream is ``u32[2]``. ``fold(stream, tag)`` derives an independent sub-stream, so
every random quantity has a fixed address (task, attempt, layer, purpose) and does not
depend on what else is drawn.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Stream = jax.Array  # u32[2]

_GOLDEN = np.uint32(0x9E3779B9)
_TWO_PI = 2.0 * math.pi


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 integer finaliser (Wellons): full avalanche on u32."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def from_key(key: jax.Array) -> Stream:
    """The stream of a JAX PRNG key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def fold(stream: Stream, tag: int | jax.Array) -> Stream:
    """An independent sub-stream addressed by an integer tag."""
    t = jnp.asarray(tag).astype(jnp.uint32)
    a = _mix(stream[0] ^ _mix(t * _GOLDEN + stream[1]))
    b = _mix(stream[1] + _mix(a ^ (t + _GOLDEN)))
    return jnp.stack([a, b])


def _hash(stream: Stream, counters: jax.Array) -> jax.Array:
    return _mix(_mix(counters ^ stream[0]) + stream[1])


def bits(stream: Stream, shape: tuple[int, ...]) -> jax.Array:
    """u32[shape] uniformly random words."""
    # The barrier keeps the scalar chain that derived the stream out of the element-wise
    # fusion that consumes it; fused, XLA:CPU builds loops LLVM needs minutes to compile.
    stream = jax.lax.optimization_barrier(stream)
    n = math.prod(shape)
    ctr = jax.lax.iota(jnp.uint32, n).reshape(shape) if n else jnp.zeros(shape, jnp.uint32)
    return _hash(stream, ctr)


def _uniform_bits(b: jax.Array) -> jax.Array:
    return (b >> 8).astype(jnp.float32) * np.float32(2.0**-24) + np.float32(2.0**-25)


def uniform(stream: Stream, shape: tuple[int, ...] = ()) -> jax.Array:
    """f32[shape] uniform on the open interval (0, 1)."""
    return _uniform_bits(bits(stream, shape))


def uniform_in(stream: Stream, low, high, shape: tuple[int, ...] = ()) -> jax.Array:
    return low + (high - low) * uniform(stream, shape)


def randint(stream: Stream, low, high, shape: tuple[int, ...] = ()) -> jax.Array:
    """i32[shape] uniform on [low, high) (high > low; ranges far below 2^24)."""
    low = jnp.asarray(low, jnp.int32)
    span = (jnp.asarray(high, jnp.int32) - low).astype(jnp.float32)
    draw = jnp.floor(uniform(stream, shape) * span).astype(jnp.int32)
    return low + jnp.minimum(draw, jnp.maximum(span.astype(jnp.int32) - 1, 0))


def sin_turns(t: jax.Array) -> jax.Array:
    """sin(2*pi*t), max abs error ~4e-6, as fused multiply-adds (XLA:CPU's sin is scalar)."""
    r = t - jnp.round(t)
    r = jnp.where(r > 0.25, 0.5 - r, jnp.where(r < -0.25, -0.5 - r, r))
    z = r * r
    # Taylor coefficients of sin(2*pi*r) up to r^11 (|r| <= 1/4).
    p = np.float32(-15.094642576822)
    p = p * z + np.float32(42.058693944071)
    p = p * z + np.float32(-76.705859753061)
    p = p * z + np.float32(81.605249276075)
    p = p * z + np.float32(-41.341702240399)
    p = p * z + np.float32(6.283185307180)
    return r * p


def sin(x: jax.Array) -> jax.Array:
    """sin(x) through :func:`sin_turns`."""
    return sin_turns(x * np.float32(1.0 / _TWO_PI))


_PAIRED_NORMALS = 1 << 14  # from this many numbers on, both Box-Muller outputs are used


def normal(stream: Stream, shape: tuple[int, ...] = ()) -> jax.Array:
    """f32[shape] standard normal (Box-Muller).

    Large draws with an even leading size use both outputs of each pair (half the
    hashing and logarithms): the first half of the leading axis is r cos t, the second
    r sin t. Small draws use one output, which needs no intermediate buffers.
    """
    if shape and shape[0] % 2 == 0 and math.prod(shape) >= _PAIRED_NORMALS:
        u = uniform(stream, (2, shape[0] // 2, *shape[1:]))
        r, t = materialised((jnp.sqrt(-2.0 * jnp.log(u[0])), u[1]))
        quarter = np.array([0.25, 0.0], np.float32).reshape(2, *([1] * len(shape)))
        return (r[None] * sin_turns(t[None] + quarter)).reshape(shape)
    u = uniform(stream, (2, *shape))
    return _one_normal(u[0], u[1])


def _one_normal(u0: jax.Array, u1: jax.Array) -> jax.Array:
    """One Box-Muller output per pair of uniforms."""
    return jnp.sqrt(-2.0 * jnp.log(u0)) * sin_turns(u1 + np.float32(0.25))


def normal_columns(stream: Stream, rows: int, cols: int) -> jax.Array:
    """f32[cols, rows]: exactly ``normal(stream, (rows, cols)).T``, computed in that layout.

    For few columns: XLA:CPU vectorises along the minor axis, and a [rows, 9] draw ran
    about 10x slower per number than a [9, rows] one.
    """
    stream = jax.lax.optimization_barrier(stream)
    paired = rows % 2 == 0 and rows * cols >= _PAIRED_NORMALS
    lead = 2
    half = rows // 2 if paired else rows
    # The counter of element (k, r, c) of normal's [2, half, cols] uniforms, laid out
    # as [k, c, r].
    k = jax.lax.broadcasted_iota(jnp.uint32, (lead, cols, half), 0)
    c = jax.lax.broadcasted_iota(jnp.uint32, (lead, cols, half), 1)
    r = jax.lax.broadcasted_iota(jnp.uint32, (lead, cols, half), 2)
    u = _uniform_bits(_hash(stream, (k * np.uint32(half) + r) * np.uint32(cols) + c))
    if paired:
        radius, turns = materialised((jnp.sqrt(-2.0 * jnp.log(u[0])), u[1]))
        quarter = np.array([0.25, 0.0], np.float32).reshape(1, 2, 1)
        return (radius[:, None] * sin_turns(turns[:, None] + quarter)).reshape(cols, rows)
    return _one_normal(u[0], u[1])


def categorical(stream: Stream, weights: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
    """i32[shape] draws from unnormalised non-negative ``weights: f32[K]`` (inverse CDF)."""
    cdf = jnp.cumsum(weights)
    u = uniform(stream, shape) * cdf[-1]
    return jnp.minimum(jnp.sum(u[..., None] >= cdf, axis=-1), weights.shape[-1] - 1).astype(
        jnp.int32
    )


def random_ranks(stream: Stream, n_valid, size: int) -> jax.Array:
    """i32[size]: a uniformly random permutation of [0, n_valid) in the first n_valid slots.

    Entry j < n_valid is the new position of item j; entries j >= n_valid keep j.
    Computed by ranking random keys (O(size^2) compares, for small sizes only).
    """
    idx = jnp.arange(size, dtype=jnp.uint32)
    keys = jnp.where(idx < n_valid, bits(stream, (size,)) >> 1, np.uint32(2**31) + idx)
    less = (keys[None, :] < keys[:, None]) | (
        (keys[None, :] == keys[:, None]) & (idx < idx[:, None])
    )
    return jnp.sum(less, axis=1).astype(jnp.int32)


def materialised(values):
    """``values`` (a pytree of float arrays), computed into buffers before any consumer
    reads them.

    XLA:CPU fuses a small per-column draw into the [rows, width] loop that broadcasts
    it, and then hashes it again for every row; ``optimization_barrier`` is expanded away
    before fusion, but the results of a conditional are buffers. The conditional must
    not be foldable: if the first element is NaN, everything becomes NaN (a NaN draw
    fails its attempt either way).
    """
    first = jnp.ravel(jax.tree.leaves(values)[0])[0]
    return jax.lax.cond(
        first == first,
        lambda v: v,
        lambda v: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), v),
        values,
    )
