"""Per-task hyperparameters, drawn from the reference's meta-distributions.

The reference (``tabicl.prior.prior_config`` / ``hp_sampling``) samples hierarchically:
for each hyperparameter, first the parameters of its distribution (e.g. the mean and
spread of a log-scaled truncated normal, or the logits of a categorical), then the
value. With one task per group (``batch_size_per_gp=1``, i.i.d. tasks) both levels are
drawn per task, as here. These draws are fixed for a task across its attempts, as in
the reference, whose retry loop rebuilds the SCM with the same hyperparameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mllm_jax.prior.config import PriorConfig

N_ACTIVATIONS = 28  # 18 fixed activations + 10 copies of the random sine sum
FAMILY_MLP, FAMILY_TREE = 0, 1
SAMPLING_NORMAL, SAMPLING_MIXED, SAMPLING_UNIFORM = 0, 1, 2


class HParams(NamedTuple):
    """Hyperparameters of one task (scalars; arrays with a leading axis when batched)."""

    family: jax.Array  # i32: FAMILY_MLP or FAMILY_TREE
    n_features: jax.Array  # i32: features before constant ones are dropped
    n_classes: jax.Array  # i32: classes asked of the label assigner
    n_train: jax.Array  # i32: rows in the train split
    is_causal: jax.Array  # bool: X, y read off hidden units (else X = causes)
    num_causes: jax.Array  # i32: root causes of a causal MLP
    y_is_effect: jax.Array  # bool: y is the last hidden unit
    in_clique: jax.Array  # bool: X, y from one contiguous block of hidden units
    num_layers: jax.Array  # i32: MLP layers (>= 2)
    hidden: jax.Array  # i32: MLP width as drawn (before the causal widening)
    init_std: jax.Array  # f32: weight scale
    noise_std: jax.Array  # f32: noise added after each layer
    sampling: jax.Array  # i32: SAMPLING_NORMAL / MIXED / UNIFORM root causes
    pre_cause_stats: jax.Array  # bool: normal causes get their own mean and std
    pre_noise_std: jax.Array  # bool: each unit draws its own noise std
    block_dropout: jax.Array  # bool: block-diagonal weights (else Bernoulli dropout)
    dropout_prob: jax.Array  # f32: weight dropout probability
    rank_classes: jax.Array  # bool: class thresholds at data values (else N(0,1) values)
    act_probs: jax.Array  # f32[28]: per-layer activation probabilities
    width: jax.Array  # i32: MLP width the task needs (max of causes/hidden, capped)


def _meta_choice(key: jax.Array, n: int, low: float, high: float) -> jax.Array:
    """Reference ``meta_choice``: logits [1, U(low, high), ...], softmax, one draw."""
    k1, k2 = jax.random.split(key)
    logits = jnp.concatenate(
        [jnp.ones(1), jax.random.uniform(k1, (n - 1,), minval=low, maxval=high)]
    )
    return jax.random.categorical(k2, logits)


def _meta_trunc_norm_log(
    key: jax.Array, min_mean: float, max_mean: float, lower_bound: float, rounded: bool
) -> jax.Array:
    """Reference ``meta_trunc_norm_log_scaled``: mu log-uniform, sigma = mu * U_log(0.01, 1),
    a normal truncated to [0, 1e6], plus ``lower_bound`` (rounded half to even if asked)."""
    k1, k2, k3 = jax.random.split(key, 3)
    mu = jnp.exp(jax.random.uniform(k1, minval=math.log(min_mean), maxval=math.log(max_mean)))
    sigma = mu * jnp.exp(jax.random.uniform(k2, minval=math.log(0.01), maxval=0.0))
    z = jax.random.truncated_normal(k3, -mu / sigma, (1e6 - mu) / sigma)
    x = jnp.maximum(mu + sigma * z, 0.0)
    return lower_bound + (jnp.round(x) if rounded else x)


def _log_gamma(key: jax.Array, shape: jax.Array, tries: int = 16) -> jax.Array:
    """log of a Gamma(shape, 1) draw, by Marsaglia-Tsang with ``tries`` parallel proposals.

    Written out because ``jax.random.gamma`` takes seconds to compile on CPU. Each
    proposal is accepted with probability > 0.95, so all 16 fail with probability
    < 1e-20; the first accepted one is exact. Shapes < 1 use the boost U^(1/shape), in
    log space because it underflows float32 for small shapes.
    """
    k1, k2, k3 = jax.random.split(key, 3)
    a = jnp.where(shape < 1.0, shape + 1.0, shape)
    d = a - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    x = jax.random.normal(k1, (tries,))
    v = (1.0 + c * x) ** 3
    u = jax.random.uniform(k2, (tries,))
    log_v = jnp.log(jnp.maximum(v, 1e-30))
    ok = (v > 0) & (jnp.log(u) < 0.5 * x * x + d - d * v + d * log_v)
    log_g = jnp.log(d) + log_v[jnp.argmax(ok)]
    log_boost = jnp.log(jax.random.uniform(k3)) / shape
    return jnp.where(shape < 1.0, log_g + log_boost, log_g)


def _beta(key: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    ka, kb = jax.random.split(key)
    return jax.nn.sigmoid(_log_gamma(ka, a) - _log_gamma(kb, b))


def sample_hparams(key: jax.Array, config: PriorConfig) -> HParams:
    """Hyperparameters of one task from its key (vmap over keys for a batch)."""
    ks = iter(jax.random.split(key, 24))
    u = lambda: jax.random.uniform(next(ks))  # noqa: E731
    c = config

    family = jnp.where(u() < c.tree_prob, FAMILY_TREE, FAMILY_MLP).astype(jnp.int32)
    n_features = jnp.round(c.min_features + (c.max_features - c.min_features) * u()).astype(
        jnp.int32
    )
    n_classes = jnp.where(
        u() > 0.5, jax.random.randint(next(ks), (), 2, c.max_classes + 1), 2
    ).astype(jnp.int32)
    fraction = c.min_train_fraction + (c.max_train_fraction - c.min_train_fraction) * u()
    n_train = jnp.floor(c.rows * fraction).astype(jnp.int32)

    is_causal = _meta_choice(next(ks), 2, -3.0, 5.0) == 0  # choices [True, False]
    num_causes = _meta_trunc_norm_log(next(ks), 1, 12, 1, True).astype(jnp.int32)
    y_is_effect = _meta_choice(next(ks), 2, -3.0, 5.0) == 0
    in_clique = _meta_choice(next(ks), 2, -3.0, 5.0) == 0
    num_layers = _meta_trunc_norm_log(next(ks), 1, 6, 2, True).astype(jnp.int32)
    hidden = _meta_trunc_norm_log(next(ks), 5, 130, 4, True).astype(jnp.int32)
    init_std = _meta_trunc_norm_log(next(ks), 0.01, 10.0, 0.0, False)
    noise_std = _meta_trunc_norm_log(next(ks), 0.0001, 0.3, 0.0, False)
    sampling = _meta_choice(next(ks), 3, -3.0, 5.0).astype(jnp.int32)  # normal, mixed, uniform
    pre_cause_stats = _meta_choice(next(ks), 2, -3.0, 5.0) == 0
    pre_noise_std = _meta_choice(next(ks), 2, -3.0, 5.0) == 0
    block_dropout = _meta_choice(next(ks), 2, -3.0, 5.0) == 0
    a, b = jax.random.uniform(next(ks), (2,), minval=0.1, maxval=5.0)
    dropout_prob = 0.9 * _beta(next(ks), a, b)
    rank_classes = _meta_choice(next(ks), 2, -3.0, 5.0) == 1  # choices ["value", "rank"]

    # meta_choice_mixed over 56 entries: the 28 wrapped activations, then 28 "random
    # choice" entries that each resolve to a uniform pick among the 28.
    k1, k2 = jax.random.split(next(ks))
    logits = jnp.concatenate(
        [jnp.ones(1), jax.random.uniform(k1, (2 * N_ACTIVATIONS - 1,), minval=-5.0, maxval=6.0)]
    )
    p = jax.nn.softmax(logits)
    act_probs = p[:N_ACTIVATIONS] + p[N_ACTIVATIONS:].sum() / N_ACTIVATIONS

    wide = jnp.maximum(hidden, 2 * n_features + 1)
    width = jnp.where(is_causal, jnp.maximum(wide, num_causes), jnp.maximum(hidden, n_features))
    width = jnp.minimum(width, c.max_hidden).astype(jnp.int32)
    del k2
    return HParams(
        family=family,
        n_features=n_features,
        n_classes=n_classes,
        n_train=n_train,
        is_causal=is_causal,
        num_causes=num_causes,
        y_is_effect=y_is_effect,
        in_clique=in_clique,
        num_layers=num_layers,
        hidden=hidden,
        init_std=init_std.astype(jnp.float32),
        noise_std=noise_std.astype(jnp.float32),
        sampling=sampling,
        pre_cause_stats=pre_cause_stats,
        pre_noise_std=pre_noise_std,
        block_dropout=block_dropout,
        dropout_prob=dropout_prob.astype(jnp.float32),
        rank_classes=rank_classes,
        act_probs=act_probs.astype(jnp.float32),
        width=width,
    )
