"""Regression to classification and task validity (reference ``reg2cls`` + dataset checks).

For one raw draw (features X, continuous target y) of a task:

1. With probability ``cat_prob`` the task gets categorical columns: each column with a
   task-level probability U(0, 1) becomes the class of its value among
   round(Gamma(1, 10)) >= 2 categories cut at values of random rows, relabelled at
   random (p=0.7) and reversed (p=0.5), as the reference does. They keep these integer
   codes (see docs/prior.md).
2. Other columns: outliers clamped at 4 robust standard deviations (two passes), then
   standardised and clipped at +-100.
3. y is standardised and cut into classes at k-1 thresholds (values of random rows, or
   N(0, 1) draws); the classes present get a uniformly random relabelling onto 0..u-1.
4. Features are shuffled; constant ones dropped (the rest moved left, in order).
5. The train split (first n_train rows) and the test split must hold the same set of
   classes, at least 2; otherwise up to 10 random row shuffles are tried.

The draw is valid if all of that holds and the raw values were finite (the reference
regenerates on NaN; we also treat infinities as failure).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.prior import rng
from mllm_jax.prior.hparams import HParams

MAX_CATEGORIES = 128  # round(Gamma(1, 10)) exceeds this with probability 3e-6
_SPLIT_SHUFFLES = 10


class Classified(NamedTuple):
    """One task after reg2cls (fields with a leading axis when batched)."""

    X: jax.Array  # f32[rows, slots], first n_features columns real
    y: jax.Array  # i32[rows] labels in [0, n_classes)
    n_features: jax.Array  # i32
    n_classes: jax.Array  # i32 distinct labels
    categorical: jax.Array  # bool[slots]
    valid: jax.Array  # bool


def _float_key(x: jax.Array) -> jax.Array:
    """Order-preserving map f32 -> u32 (integer sorts and compares are fast on XLA:CPU)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | np.uint32(0x80000000))


def _nanmean_std(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Column mean and unbiased std over masked rows; (mean, std, count)."""
    n = mask.sum(axis=0)
    mean = jnp.where(mask, x, 0.0).sum(axis=0) / n
    var = jnp.where(mask, (x - mean) ** 2, 0.0).sum(axis=0) / (n - 1)
    return mean, jnp.sqrt(var), n


def _standardise(x: jax.Array) -> jax.Array:
    """Reference ``standard_scaling``: (x - mean) / max(std, 1e-6), clipped at +-100."""
    mean, std, _ = _nanmean_std(x, jnp.ones(x.shape, bool))
    return jnp.clip((x - mean) / jnp.maximum(std, 1e-6), -100.0, 100.0)


def _clamp_outliers(x: jax.Array, threshold: float = 4.0) -> jax.Array:
    """Reference ``outlier_removing``: clamp at mean +- 4 std of the non-outlier rows."""
    mean, std, _ = _nanmean_std(x, jnp.ones(x.shape, bool))
    cut = jnp.maximum(std, 1e-6) * threshold
    inside = (x >= mean - cut) & (x <= mean + cut)
    m_mean, m_std, n = _nanmean_std(x, inside)
    m_mean = jnp.where(n > 0, m_mean, mean)
    m_std = jnp.where(n > 1, jnp.maximum(m_std, 1e-6), 0.0)
    return jnp.clip(x, m_mean - threshold * m_std, m_mean + threshold * m_std)


def _count_less(bounds: jax.Array, keys: jax.Array, n_used: jax.Array) -> jax.Array:
    """i32[rows, slots]: per column, how many of its bounds are < the key.

    Args:
        bounds: u32[k, slots], each column ascending; rows from ``n_used`` on are all
            0xFFFFFFFF (never below a key), so only the blocks before it are read.
        keys: u32[rows, slots].
        n_used: i32.

    Counted in blocks of 16 bound rows (contiguous reads); a binary search gathers at
    every step, which XLA:CPU does several times slower.
    """
    block = 16
    padded = jnp.pad(
        bounds, ((0, -bounds.shape[0] % block), (0, 0)), constant_values=np.uint32(0xFFFFFFFF)
    )

    def count_block(b, count):
        rows = jax.lax.dynamic_slice_in_dim(padded, b * block, block, axis=0)
        for j in range(block):
            count = count + (rows[j] < keys).astype(jnp.int32)
        return count

    n_blocks = (n_used + block - 1) // block
    return jax.lax.fori_loop(0, n_blocks, count_block, jnp.zeros(keys.shape, jnp.int32))


def _categorical_codes(stream: rng.Stream, x: jax.Array, n_cols: jax.Array):
    """Per column: category codes from rank thresholds, relabelled/reversed at random.

    Args:
        x: f32[rows, slots] raw features.

    Returns:
        (f32[rows, slots] codes, bool[slots] columns turned categorical).
    """
    rows, slots = x.shape
    col_prob = rng.uniform(rng.fold(stream, 0))
    chosen = (rng.uniform(rng.fold(stream, 1), (slots,)) < col_prob) & (jnp.arange(slots) < n_cols)
    gamma = -10.0 * jnp.log(rng.uniform(rng.fold(stream, 2), (slots,)))
    n_cats = jnp.clip(jnp.round(gamma), 2, MAX_CATEGORIES).astype(jnp.int32)

    # Thresholds: values at random rows; codes = number of thresholds below the value.
    keys = _float_key(x)
    at = rng.randint(rng.fold(stream, 3), 0, rows, (MAX_CATEGORIES - 1, slots))
    bounds = jnp.take_along_axis(keys, at, axis=0)  # [cats - 1, slots]
    used = jnp.arange(MAX_CATEGORIES - 1)[:, None] < (n_cats - 1)[None, :]
    bounds = jnp.sort(jnp.where(used, bounds, np.uint32(0xFFFFFFFF)), axis=0)
    codes = _count_less(bounds, keys, jnp.max(jnp.where(chosen, n_cats - 1, 0)))

    # Codes present per column, as bits in 4 words.
    word = codes // 32
    bit = jnp.left_shift(np.uint32(1), (codes % 32).astype(jnp.uint32))
    words = [
        jax.lax.reduce(
            jnp.where(word == w, bit, np.uint32(0)), np.uint32(0), jax.lax.bitwise_or, (0,)
        )
        for w in range(MAX_CATEGORIES // 32)
    ]
    c = jnp.arange(MAX_CATEGORIES)
    shifted = jnp.stack(words, 0)[c // 32] >> (c % 32).astype(jnp.uint32)[:, None]
    present = (shifted & 1 == 1).T  # [slots, cats]

    # Relabel the present codes by a uniformly random bijection onto 0..u-1 (p = 0.7):
    # sort (random key, code) with absent codes last; a second sort inverts the order.
    # (An all-pairs rank comparison here takes LLVM minutes to compile.)
    code_bits = int(np.log2(MAX_CATEGORIES))
    rkeys = (rng.bits(rng.fold(stream, 4), (slots, MAX_CATEGORIES)) >> (code_bits + 1)) << code_bits
    rkeys = jnp.where(present, rkeys, np.uint32(0xFFFFFFFF) << code_bits) | c.astype(jnp.uint32)
    order = jnp.sort(rkeys, axis=1) & np.uint32(MAX_CATEGORIES - 1)  # codes, present first
    inverse = jnp.sort((order << code_bits) | c.astype(jnp.uint32), axis=1)
    relabel = (inverse & np.uint32(MAX_CATEGORIES - 1)).astype(jnp.int32)  # [slots, cats]
    relabelled = jnp.take_along_axis(relabel.T, codes, axis=0)
    permute = rng.uniform(rng.fold(stream, 5), (slots,)) > 0.3
    codes = jnp.where(permute, relabelled, codes)
    reverse = rng.uniform(rng.fold(stream, 6), (slots,)) > 0.5
    codes = jnp.where(reverse, n_cats - 1 - codes, codes)
    return codes.astype(jnp.float32), chosen


def _assign_classes(stream: rng.Stream, z: jax.Array, hp: HParams, max_classes: int):
    """Standardised target -> labels 0..u-1; returns (i32[rows] labels, bool[max] present)."""
    rows = z.shape[0]
    k = hp.n_classes
    b = jnp.arange(max_classes - 1)
    at = rng.randint(rng.fold(stream, 0), 0, rows, (max_classes - 1,))
    bounds = jnp.where(hp.rank_classes, z[at], rng.normal(rng.fold(stream, 1), (max_classes - 1,)))
    bounds = jnp.where(b < k - 1, bounds, jnp.inf)
    # Loops over the few classes, each vectorised along the rows: on XLA:CPU, gathering
    # the labels from a 10-entry table took ~60 ns per row (this function: 2-3x faster).
    cls = sum((z > bounds[j]).astype(jnp.int32) for j in range(max_classes - 1))
    present = jnp.any(cls[:, None] == jnp.arange(max_classes)[None, :], axis=0)
    keys = jnp.where(present, rng.bits(rng.fold(stream, 2), (max_classes,)) >> 1, np.uint32(2**31))
    idx = jnp.arange(max_classes)
    less = (keys[None, :] < keys[:, None]) | (
        (keys[None, :] == keys[:, None]) & (idx < idx[:, None])
    )
    label_of = jnp.sum(less, axis=1).astype(jnp.int32)
    labels = jnp.full_like(cls, label_of[0])
    for c in range(1, max_classes):
        labels = jnp.where(cls == c, label_of[c], labels)
    return labels, present


def _split_ok(y: jax.Array, n_train: jax.Array, n_classes: int) -> jax.Array:
    """Train rows [0, n_train) and test rows hold the same classes, >= 2 of them."""
    in_train = jnp.arange(y.shape[0]) < n_train
    hit = y[:, None] == jnp.arange(n_classes)[None, :]
    tr = jnp.any(hit & in_train[:, None], axis=0)
    te = jnp.any(hit & ~in_train[:, None], axis=0)
    return jnp.all(tr == te) & (jnp.sum(tr) >= 2)


def _reshuffle_split(stream: rng.Stream, X, y, n_train, n_classes: int):
    """Up to 10 random row orders; the first with a valid split is taken."""
    rows = y.shape[0]
    shift = max(int(np.ceil(np.log2(rows))), 1)
    keys = (rng.bits(stream, (_SPLIT_SHUFFLES, rows)) >> shift << shift) | jnp.arange(
        rows, dtype=jnp.uint32
    )
    order = (jax.lax.sort(keys, dimension=1) & np.uint32((1 << shift) - 1)).astype(jnp.int32)
    ok = jax.vmap(lambda o: _split_ok(y[o], n_train, n_classes))(order)
    first = jnp.argmax(ok)
    o = order[first]
    return X[o], y[o], jnp.any(ok)


def to_classification(
    stream: rng.Stream,
    X: jax.Array,
    y: jax.Array,
    raw_ok: jax.Array,
    hp: HParams,
    *,
    cat_prob: float,
    max_classes: int,
) -> Classified:
    """Turns one raw draw into a classification task and decides its validity.

    Args:
        X: f32[rows, slots] raw features, hp.n_features real columns.
        y: f32[rows] raw continuous target.
        raw_ok: bool, the SCM draw itself succeeded.
    """
    slots = X.shape[1]
    nf = hp.n_features
    real = jnp.arange(slots) < nf
    finite = raw_ok & jnp.all(jnp.isfinite(X) | ~real[None, :]) & jnp.all(jnp.isfinite(y))
    X = jnp.where(finite & real[None, :], X, 0.0)
    y = jnp.where(finite, y, 0.0)

    def with_categories(X):
        codes, chosen = _categorical_codes(rng.fold(stream, 1), X, nf)
        return jnp.where(chosen[None, :], codes, X), chosen

    has_cat = rng.uniform(rng.fold(stream, 0)) < cat_prob
    X, categorical = jax.lax.cond(
        has_cat, with_categories, lambda X: (X, jnp.zeros((slots,), bool)), X
    )
    X = jnp.where(categorical[None, :], X, _standardise(_clamp_outliers(X)))
    X = jnp.where(real[None, :], X, 0.0)

    labels, present = _assign_classes(rng.fold(stream, 2), _standardise(y[:, None])[:, 0], hp,
                                      max_classes)  # fmt: skip

    # Shuffle the real columns, then drop constant ones keeping the order.
    new_pos = rng.random_ranks(rng.fold(stream, 3), nf, slots)
    varies = real & (X.max(axis=0) > X.min(axis=0))
    before = (varies[None, :] & (new_pos[None, :] < new_pos[:, None])).sum(axis=1)
    final_pos = jnp.where(varies, before, slots)
    source = jnp.argmax(final_pos[None, :] == jnp.arange(slots)[:, None], axis=1)
    n_features = varies.sum().astype(jnp.int32)
    kept = jnp.arange(slots) < n_features
    X = jnp.where(kept[None, :], X[:, source], 0.0)
    categorical = kept & categorical[source]

    ok = _split_ok(labels, hp.n_train, max_classes)
    X, labels, ok = jax.lax.cond(
        ok,
        lambda X, y: (X, y, jnp.bool_(True)),
        lambda X, y: _reshuffle_split(rng.fold(stream, 4), X, y, hp.n_train, max_classes),
        X,
        labels,
    )
    valid = finite & ok & (n_features > 0)
    return Classified(
        X=X,
        y=labels,
        n_features=n_features,
        n_classes=present.sum().astype(jnp.int32),
        categorical=categorical,
        valid=valid,
    )
