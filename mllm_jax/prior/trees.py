"""Tree-SCM (reference ``tabicl.prior.tree_scm.TreeSCM``) for one task.

The reference is non-causal: features are the root causes and the target comes out of
1-2 hidden tree layers (width 3-9) plus an output layer, each an XGBoost regressor
(depth min(2 + floor(Exp(2)), 4), min(1 + floor(Exp(2)), 4) trees, one multi-output
tree per round) fit to i.i.d. N(0, 1) targets and evaluated on its own input.

We keep that boosting loop and its arithmetic (squared error, hessian 1, lambda 1,
learning rate 0.3, leaf weight -0.3 G / (H + 1), gain summed over outputs, a split only
when it gains and leaves >= 1 row per child) but replace XGBoost's exhaustive split
search (every feature at 256 histogram cuts) by the best of a few candidates per tree
level, each a (feature, threshold) pair:

- ``candidates`` whose threshold is the feature's value at a random row (uniform in rank);
- ``tail_candidates`` that cut off one of the feature's outermost histogram bins (the
  1-8 bins of rows / 256 rows at either end). On random targets an exhaustive search
  picks such splits far more often than a uniform rank does: a split's gain under pure
  noise is about as large at any rank, and the ranks near the ends are the least
  correlated with one another, so the best of all cuts lies near an end far more often
  (about 20% of first splits within 32 of 1,024 rows, against 6% of uniform ranks).
  Without them the trees split nearer the middle, and their classes come out more
  balanced and more correlated with the features than the reference's (docs/prior.md,
  Tree tasks, where the 32 + 32 mix was chosen on those statistics).

No sorting is needed: the tails are one ``top_k`` per feature and tree layer, and each
level is one [candidates, rows] x [rows, nodes * outputs] matrix product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllm_jax.prior import rng
from mllm_jax.prior.causes import sample_causes
from mllm_jax.prior.hparams import HParams

MAX_HIDDEN = 9  # hidden width randint(3, 10)
MAX_DEPTH = 4
HIST_BINS = 256  # XGBoost's max_bin
TAIL_BINS = 8  # tail candidates cut off 1..TAIL_BINS histogram bins at one end
_ETA = 0.3
_LAMBDA = 1.0
_MIN_GAIN = 1e-6


def _depth_and_rounds(stream: rng.Stream) -> tuple[jax.Array, jax.Array]:
    e = -2.0 * jnp.log(rng.uniform(stream, (2,)))  # Exp(rate 0.5)
    depth = jnp.minimum(2 + jnp.floor(e[0]).astype(jnp.int32), MAX_DEPTH)
    rounds = jnp.minimum(1 + jnp.floor(e[1]).astype(jnp.int32), 4)
    return depth, rounds


def _score(G: jax.Array) -> jax.Array:
    """sum_k G_k^2 / (H + lambda) over the output columns; G: f32[..., outputs + 1] (H last)."""
    return jnp.sum(G[..., :-1] ** 2, axis=-1) / (G[..., -1] + _LAMBDA)


def _bin_rows(rows: int) -> int:
    """Rows per XGBoost histogram bin (its quantile cuts) for a feature of distinct values."""
    return max(1, rows // HIST_BINS)


def _tails(z_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lowest, highest): f32[features, k] each feature's k smallest values ascending
    and k largest descending, k = TAIL_BINS bins + 1 rows (at most all rows)."""
    k = min(TAIL_BINS * _bin_rows(z_t.shape[1]) + 1, z_t.shape[1])
    return -jax.lax.top_k(-z_t, k)[0], jax.lax.top_k(z_t, k)[0]


def _tail_thresholds(stream: rng.Stream, tails, n_in, count: int):
    """(features i32[count], thresholds f32[count]) of splits that leave r = b * (rows
    per bin) rows on one side, b uniform in 1..TAIL_BINS, either end alike."""
    lowest, highest = tails
    per_bin = max(1, (lowest.shape[1] - 1) // TAIL_BINS)
    feat = rng.randint(rng.fold(stream, 0), 0, n_in, (count,))
    r = per_bin * rng.randint(rng.fold(stream, 1), 1, TAIL_BINS + 1, (count,))
    r = jnp.minimum(r, lowest.shape[1] - 1)
    low_end = rng.uniform(rng.fold(stream, 2), (count,)) < 0.5
    # x < lowest[r]: the r smallest go left; x < highest[r - 1]: the r largest go right.
    threshold = jnp.where(low_end, lowest[feat, r], highest[feat, r - 1])
    return feat, threshold


def _grow(
    stream: rng.Stream,
    z_t: jax.Array,
    n_in: jax.Array,
    A_t: jax.Array,
    depth,
    candidates: int,
    tails: tuple[jax.Array, jax.Array] | None = None,
    tail_candidates: int = 0,
):
    """Leaf index (i32[rows] in [0, 16)) of each row in one greedy tree.

    Rows are the last axis of both inputs: XLA:CPU vectorises the per-node masking along
    rows, not along outputs, and gathers features as rows.

    Args:
        z_t: f32[features, rows] inputs; only the first n_in features are split on.
        A_t: f32[outputs + 1, rows] gradients with a row of ones (hessians) appended.
        tails: `_tails(z_t)`, needed when tail_candidates > 0.
    """
    rows = z_t.shape[1]
    node = jnp.zeros((rows,), jnp.int32)
    for level in range(MAX_DEPTH):
        n_nodes = 2**level

        def split(node, level=level, n_nodes=n_nodes):
            s = rng.fold(stream, level)
            feat = rng.randint(rng.fold(s, 0), 0, n_in, (candidates,))
            row = rng.randint(rng.fold(s, 1), 0, rows, (candidates,))
            threshold = z_t[feat, row]
            if tail_candidates:
                tail_feat, tail_threshold = _tail_thresholds(
                    rng.fold(s, 2), tails, n_in, tail_candidates
                )
                feat = jnp.concatenate([feat, tail_feat])
                threshold = jnp.concatenate([threshold, tail_threshold])
            cols = z_t[feat]  # [candidates, rows]
            left = cols < threshold[:, None]  # [candidates, rows]
            member = node[None, None, :] == jnp.arange(n_nodes)[:, None, None]
            by_node = jnp.where(member, A_t[None], 0.0).reshape(-1, rows)  # [nodes*(out+1), rows]
            GL = jax.lax.dot_general(
                left.astype(jnp.float32), by_node, (((1,), (1,)), ((), ()))
            ).reshape(feat.shape[0], n_nodes, -1)
            total = by_node.sum(axis=1).reshape(n_nodes, -1)  # [nodes, outputs + 1]
            GR = total[None] - GL
            gain = _score(GL) + _score(GR) - _score(total)[None]
            usable = (GL[..., -1] >= 1.0) & (GR[..., -1] >= 1.0)
            gain = jnp.where(usable, gain, -jnp.inf)
            best = jnp.argmax(gain, axis=0)  # [nodes]
            do = jnp.max(gain, axis=0) > _MIN_GAIN
            right = ~left[best[node], jnp.arange(rows)] & do[node]
            return 2 * node + right.astype(jnp.int32)

        node = jax.lax.cond(level < depth, split, lambda n: 2 * n, node)
    return node


def tree_layer(
    stream: rng.Stream,
    z: jax.Array,
    n_in: jax.Array,
    n_out: jax.Array,
    candidates: int,
    width: int = MAX_HIDDEN,
    tail_candidates: int = 0,
) -> jax.Array:
    """One boosted multi-output tree layer fit to random targets and evaluated on z.

    Args:
        z: f32[rows, features] input, first n_in columns real.
        n_out: i32 outputs (<= width).
        width: static padded number of outputs.

    Returns:
        f32[rows, width] predictions, zero beyond n_out.
    """
    rows = z.shape[0]
    out_mask = jnp.arange(width) < n_out
    depth, rounds = _depth_and_rounds(rng.fold(stream, 0))
    target = jnp.where(out_mask, _normal(rng.fold(stream, 1), rows, width), 0.0)
    pred = jnp.broadcast_to(target.mean(axis=0), target.shape)
    ones = jnp.ones((rows, 1), jnp.float32)
    # Transposed once, into buffers: a transpose the tree levels' conditionals read
    # was copied again inside each of them.
    z_t = rng.materialised(z.T)
    tails = _tails(z_t) if tail_candidates else None

    def boost(t, pred):
        A = jnp.concatenate([pred - target, ones], axis=1)
        leaf = _grow(rng.fold(stream, 100 + t), z_t, n_in, rng.materialised(A.T), depth,
                     candidates, tails, tail_candidates)  # fmt: skip
        member = (jnp.arange(2**MAX_DEPTH)[:, None] == leaf[None, :]).astype(jnp.float32)
        G = member @ A  # [leaves, outputs + 1]
        weight = -_ETA * G[:, :-1] / (G[:, -1:] + _LAMBDA)
        return pred + weight[leaf]

    return jax.lax.fori_loop(0, rounds, boost, pred)


def _noise(stream: rng.Stream, hp: HParams, rows: int, n_out, width: int) -> jax.Array:
    std = jnp.where(
        hp.pre_noise_std,
        jnp.abs(rng.normal(rng.fold(stream, 0), (width,)) * hp.noise_std),
        hp.noise_std,
    )
    std = rng.materialised(jnp.where(jnp.arange(width) < n_out, std, 0.0))
    return _normal(rng.fold(stream, 1), rows, width) * std


def _normal(stream: rng.Stream, rows: int, width: int) -> jax.Array:
    """f32[rows, width] ``rng.normal``, drawn along rows (tree layers have few outputs)."""
    return rng.materialised(rng.normal_columns(stream, rows, width)).T


def tree_scm(
    stream: rng.Stream,
    hp: HParams,
    *,
    n_slots: int,
    rows: int,
    candidates: int,
    tail_candidates: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw features and target of one tree-SCM draw.

    Returns:
        (f32[rows, n_slots] X (the causes, hp.n_features real columns), f32[rows] y,
         bool ok).
    """
    nf = hp.n_features
    causes = sample_causes(rng.fold(stream, 1), rows, n_slots, nf, hp.sampling, hp.pre_cause_stats)
    n_layers = rng.randint(rng.fold(stream, 2), 1, 3)
    hidden = rng.randint(rng.fold(stream, 3), 3, MAX_HIDDEN + 1)
    search = dict(candidates=candidates, tail_candidates=tail_candidates)
    h = tree_layer(rng.fold(stream, 10), jnp.nan_to_num(causes), nf, hidden, **search)

    def second(h):
        out = tree_layer(rng.fold(stream, 11), h, hidden, hidden, **search)
        return out + _noise(rng.fold(stream, 21), hp, rows, hidden, MAX_HIDDEN)

    h = jax.lax.cond(n_layers == 2, second, lambda h: h, h)
    y = tree_layer(rng.fold(stream, 12), h, hidden, 1, width=1, **search)
    y = y + _noise(rng.fold(stream, 22), hp, rows, 1, 1)
    return causes, y[:, 0], jnp.bool_(True)
