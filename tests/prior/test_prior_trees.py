"""Split search of the tree-SCM (mllm_jax.prior.trees): the tail candidates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.prior import rng
from mllm_jax.prior.trees import TAIL_BINS, _grow, _tail_thresholds, _tails


def _distinct_features(features: int, rows: int, seed: int = 0) -> jax.Array:
    """f32[features, rows]: each row a permutation of distinct values."""
    r = np.random.default_rng(seed)
    return jnp.asarray(np.stack([r.permutation(rows) for _ in range(features)]), jnp.float32)


@pytest.mark.parametrize("rows, per_bin", [(1024, 4), (256, 1), (100, 1)])
def test_tail_thresholds_cut_off_one_to_eight_whole_bins_at_either_end(rows, per_bin):
    z_t = _distinct_features(5, rows)
    n_in = jnp.int32(3)
    feat, threshold = _tail_thresholds(rng.from_key(jax.random.PRNGKey(7)), _tails(z_t), n_in, 4000)
    feat, threshold = np.asarray(feat), np.asarray(threshold)
    left = (np.asarray(z_t)[feat] < threshold[:, None]).sum(axis=1)
    cut_off = np.minimum(left, rows - left)
    assert set(np.unique(feat)) == {0, 1, 2}  # only the real features
    assert set(np.unique(cut_off)) == {per_bin * b for b in range(1, TAIL_BINS + 1)}
    # both ends, about equally often
    assert 0.45 < np.mean(left < rows / 2) < 0.55


def _first_split_sizes(tail_candidates: int, tasks: int = 300, rows: int = 1024) -> np.ndarray:
    """Rows on the smaller side of the first split of a depth-1 tree fit to N(0, 1)
    targets, for `tasks` independent draws."""
    z_t = _distinct_features(20, rows, seed=1)
    n_in = jnp.int32(20)
    tails = _tails(z_t)

    def one(i):
        stream = rng.fold(rng.from_key(jax.random.PRNGKey(3)), i)
        target = jax.random.normal(jax.random.PRNGKey(i), (rows,))
        A_t = jnp.stack([-target, jnp.ones(rows)])
        leaf = _grow(stream, z_t, n_in, A_t, 1, 32, tails, tail_candidates)
        right = jnp.sum(leaf == 8)  # depth 1: leaves 0 (left) and 8 (right)
        return jnp.minimum(right, rows - right)

    return np.asarray(jax.jit(jax.vmap(one))(jnp.arange(tasks)))


def _exhaustive_first_split_sizes(tasks: int = 300, rows: int = 1024, features: int = 20):
    """The same for XGBoost's search: every feature at every 4th rank (its 256 histogram
    cuts of 1,024 distinct values), gain sum G^2 / (H + 1) of the children."""
    r = np.random.default_rng(5)
    sizes = []
    for _ in range(tasks):
        y = r.standard_normal(rows)
        best, size = -np.inf, 0
        for _ in range(features):
            g = np.cumsum(y[r.permutation(rows)])[:-1]  # left sums at every cut
            h = np.arange(1, rows)
            gain = g**2 / (h + 1) + (y.sum() - g) ** 2 / (rows - h + 1)
            cuts = np.arange(3, rows - 1, 4)
            i = cuts[np.argmax(gain[cuts])]
            if gain[i] > best:
                best, size = gain[i], min(i + 1, rows - i - 1)
        sizes.append(size)
    return np.array(sizes)


def test_tail_candidates_make_the_search_split_off_the_ends_as_an_exhaustive_one_does():
    """On random targets the best of all cuts often lies near an end of a feature (~20%
    of first splits cut off at most 32 of 1,024 rows; the arcsine law of the maximum's
    location); the best of 32 uniform-rank cuts much more rarely. The tail candidates
    make such splits at least as common. (Their mix, 32 + 32, is calibrated on the
    tasks' statistics against the reference's, docs/prior.md; it splits off the ends
    more often than the exhaustive search.)"""
    exhaustive = np.mean(_exhaustive_first_split_sizes() <= 32)
    uniform_only = np.mean(_first_split_sizes(0) <= 32)
    with_tails = np.mean(_first_split_sizes(32) <= 32)
    assert 0.12 < exhaustive < 0.3
    assert uniform_only < 0.5 * exhaustive
    assert with_tails >= exhaustive
