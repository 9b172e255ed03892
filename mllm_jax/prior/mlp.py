"""MLP-SCM (reference ``tabicl.prior.mlp_scm.MLPSCM``) for one task, padded to a width.

Causes -> Linear -> [activation -> Linear -> + noise] x (layers - 1). A causal task reads
its features and its target off hidden units of those blocks (a random DAG over the
units); a non-causal task uses the causes as features and adds an output block whose
single unit is the target. Depth is a dynamic loop, so one compiled program serves every
depth; width is padded to a static bucket and masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllm_jax.prior import causes, rng
from mllm_jax.prior.activations import activation
from mllm_jax.prior.hparams import HParams


def _weights(
    stream: rng.Stream,
    shape: tuple[int, int],
    n_in: jax.Array,
    n_out: jax.Array,
    block: jax.Array,
    init_std: jax.Array,
    dropout: jax.Array,
    first_row: jax.Array | int = 0,
) -> jax.Array:
    """f32[shape] weights (in x out) of a linear layer, zero outside n_in x n_out.

    Block-wise: ``nb ~ randint(1, ceil(sqrt(min(in, out))))`` diagonal blocks of
    N(0, init_std / sqrt(kept fraction)), zeros elsewhere. Otherwise N(0, init_std /
    sqrt(1 - p)) with Bernoulli(1 - p) dropout, p = min(dropout, 0.99).

    ``first_row`` > 0 gives rows ``first_row`` on of the layer's weights (each such
    slice of rows draws its own values, from the layer's ``nb``).
    """
    i = first_row + jnp.arange(shape[0])[:, None]
    o = jnp.arange(shape[1])[None, :]
    z = rng.normal(rng.fold(rng.fold(stream, 0), first_row), shape)

    m = jnp.minimum(n_in, n_out).astype(jnp.float32)
    n_blocks = rng.randint(rng.fold(stream, 1), 1, jnp.ceil(jnp.sqrt(m)).astype(jnp.int32) + 1)
    bs_in = n_in // n_blocks
    bs_out = n_out // n_blocks
    kept = (n_blocks * bs_in * bs_out).astype(jnp.float32) / (n_in * n_out).astype(jnp.float32)
    in_block = (i // bs_in == o // bs_out) & (i < n_blocks * bs_in) & (o < n_blocks * bs_out)
    w_block = jnp.where(in_block, z * (init_std / jnp.sqrt(kept)), 0.0)

    p = jnp.minimum(dropout, 0.99)
    kept_mask = rng.uniform(rng.fold(rng.fold(stream, 2), first_row), shape) < 1.0 - p
    w_drop = jnp.where(kept_mask, z * (init_std / jnp.sqrt(1.0 - p)), 0.0)
    return jnp.where((i < n_in) & (o < n_out), jnp.where(block, w_block, w_drop), 0.0)


def _bias(stream: rng.Stream, width: int, n_in: jax.Array, n_out: jax.Array) -> jax.Array:
    """torch.nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / jnp.sqrt(n_in.astype(jnp.float32))
    b = rng.uniform_in(stream, -bound, bound, (width,))
    return jnp.where(jnp.arange(width) < n_out, b, 0.0)


def _read_off(
    stream: rng.Stream, hp: HParams, hidden: jax.Array, n_slots: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Which hidden units a causal task reads its features and target off.

    The units of blocks 1..layers-1 are numbered c = (block - 1) * hidden + unit,
    M in all. Features: 1 + n_features distinct units (one contiguous run of them with
    ``in_clique``), all but the first used as features; target: the last unit
    (``y_is_effect``) or the first drawn one. The reference also optionally sorts the
    features, which its later feature shuffle makes irrelevant.

    Returns:
        (i32[n_slots] block of each feature slot (-1 unused), i32[n_slots] unit,
         i32 block of the target, i32 unit of the target, bool drawn without failure).
    """
    nf = hp.n_features
    n_units = (hp.num_layers - 1) * hidden
    slots = jnp.arange(n_slots)

    start = rng.randint(rng.fold(stream, 0), 0, n_units - nf)
    skip = rng.randint(rng.fold(stream, 1), 0, nf + 1)
    clique_x = start + jnp.where(slots < skip, slots, slots + 1)
    clique_y = start + skip

    # Units in first-occurrence order of i.i.d. draws are a uniform sample without
    # replacement; 4x oversampling from >= 2*nf units leaves >= nf+1 distinct ones
    # except with negligible probability (then the attempt is invalid). Drawn only
    # where used (the all-pairs compare is the largest part of a small task's read-off).
    def sample_units(_):
        n_draws = 4 * (n_slots + 1)
        draws = rng.randint(rng.fold(stream, 2), 0, n_units - 1, (n_draws,))
        earlier = jnp.tril(draws[:, None] == draws[None, :], k=-1).any(axis=1)
        first = ~earlier
        rank = jnp.cumsum(first) - 1
        pick = first[None, :] & (rank[None, :] == jnp.arange(n_slots + 1)[:, None])
        chosen = jnp.sum(jnp.where(pick, draws[None, :], 0), axis=1)
        return chosen, jnp.sum(first) >= nf + 1

    chosen, enough = jax.lax.cond(
        hp.is_causal & ~hp.in_clique,
        sample_units,
        lambda _: (jnp.zeros((n_slots + 1,), jnp.int32), jnp.bool_(True)),
        None,
    )
    ok = hp.in_clique | enough

    x_flat = jnp.where(hp.in_clique, clique_x, chosen[1:])
    y_flat = jnp.where(hp.y_is_effect, n_units - 1, jnp.where(hp.in_clique, clique_y, chosen[0]))
    x_block = jnp.where(slots < nf, x_flat // hidden + 1, -1)
    return x_block, x_flat % hidden, y_flat // hidden + 1, y_flat % hidden, ok


def _first_block(
    stream: rng.Stream,
    hp: HParams,
    n_in: jax.Array,
    hidden: jax.Array,
    *,
    width: int,
    n_slots: int,
    rows: int,
) -> tuple[jax.Array, jax.Array]:
    """The root causes and the linear block on them, in blocks of ``causes.TILE`` causes.

    Returns:
        (f32[rows, width] block 0 output, f32[rows, n_slots] the causes, zero-padded:
         a non-causal task's features).
    """

    def update(t, block, carry):
        h, x = carry
        w0 = _weights(rng.fold(stream, 2), (causes.TILE, width), n_in, hidden,
                      hp.block_dropout, hp.init_std, 0.0, first_row=t * causes.TILE)  # fmt: skip
        h = h + block @ w0
        # Clamped into the last block for a task with more causes than feature slots:
        # only causal tasks have those, and their features are read off hidden units.
        x = jax.lax.dynamic_update_slice_in_dim(x, block, t * causes.TILE, axis=1)
        return h, x

    init = (jnp.zeros((rows, width), jnp.float32),
            jnp.zeros((rows, causes.padded(n_slots)), jnp.float32))  # fmt: skip
    h, x = causes.in_tiles(rng.fold(stream, 1), rows, n_in, hp.sampling, hp.pre_cause_stats,
                           update, init)  # fmt: skip
    return h + _bias(rng.fold(stream, 3), width, n_in, hidden), x[:, :n_slots]


def mlp_scm(
    stream: rng.Stream,
    hp: HParams,
    *,
    width: int,
    n_slots: int,
    rows: int,
    sine_terms: int,
    sine_table: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw features and target of one MLP-SCM draw.

    Args:
        stream: random stream of this attempt.
        hp: the task's hyperparameters (scalars).
        width: static padded width, >= hp.width.
        n_slots: static feature slots (config.max_features).
        rows: static number of rows.
        sine_terms: static terms of the sine-sum activation.
        sine_table: static points of its interpolation table (0: direct).

    Returns:
        (f32[rows, n_slots] X with hp.n_features real columns, f32[rows] y, bool ok).
    """
    causal = hp.is_causal
    nf = hp.n_features
    hidden = jnp.where(causal, jnp.maximum(hp.hidden, 2 * nf + 1), hp.hidden)
    hidden = jnp.minimum(hidden, width)
    n_in = jnp.minimum(jnp.where(causal, hp.num_causes, nf), width)

    h, x_causes = _first_block(stream, hp, n_in, hidden, width=width, n_slots=n_slots, rows=rows)
    x_block, x_unit, y_block, y_unit, ok = _read_off(rng.fold(stream, 4), hp, hidden, n_slots)

    def block(b: jax.Array, h: jax.Array, n_out: jax.Array, out_cols: int) -> jax.Array:
        """Block b on h f32[rows, width]: activation, linear to ``out_cols`` static
        columns (``n_out`` real), noise."""
        s = rng.fold(stream, 1000 + b)
        a, _ = activation(rng.fold(s, 0), h, hidden, hp.act_probs, sine_terms, sine_table)
        w = _weights(rng.fold(s, 1), (width, out_cols), hidden, n_out, hp.block_dropout,
                     hp.init_std, hp.dropout_prob)  # fmt: skip
        noise_std = jnp.where(
            hp.pre_noise_std,
            jnp.abs(rng.normal(rng.fold(s, 3), (out_cols,)) * hp.noise_std),
            hp.noise_std,
        )
        bias, noise_std = rng.materialised(
            (
                _bias(rng.fold(s, 2), out_cols, hidden, n_out),
                jnp.where(jnp.arange(out_cols) < n_out, noise_std, 0.0),
            ),
        )
        return a @ w + bias + rng.normal(rng.fold(s, 4), (rows, out_cols)) * noise_std

    def hidden_block(b, carry):
        h, X_t, y = carry
        h = block(b, h, hidden, width)
        # Features are gathered as rows of h^T (column gathers are slow on XLA:CPU).
        h_t = h.T
        X_t = jnp.where((x_block == b)[:, None], h_t[x_unit], X_t)
        y = jnp.where(y_block == b, h_t[y_unit], y)
        return h, X_t, y

    init = (h, jnp.zeros((n_slots, rows), jnp.float32), jnp.zeros((rows,), jnp.float32))
    h, X_t, y = jax.lax.fori_loop(1, hp.num_layers, hidden_block, init)

    # A non-causal task's target is the single unit of one more block.
    y = jax.lax.cond(
        causal, lambda h: y, lambda h: block(hp.num_layers, h, jnp.int32(1), 1)[:, 0], h
    )
    X = jnp.where(causal, X_t.T, jnp.where(jnp.arange(n_slots) < nf, x_causes, 0.0))
    return X, y, ok | ~causal
