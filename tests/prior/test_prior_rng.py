"""The prior's counter-based random numbers against scipy's distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mllm_jax.prior import rng

STREAM = jnp.array([12345, 678], jnp.uint32)


@pytest.mark.parametrize("shape", [(1000,), (256, 128)], ids=["one-output", "paired"])
def test_normal_is_standard_normal(shape):
    z = np.asarray(rng.normal(STREAM, shape)).ravel()
    assert z.shape == (np.prod(shape),) and np.isfinite(z).all()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    if len(shape) == 2:
        # The two halves (r cos t, r sin t of the same pairs) are uncorrelated.
        a, b = np.asarray(rng.normal(STREAM, shape)).reshape(2, -1)
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


def test_streams_differ_and_repeat():
    a = np.asarray(rng.normal(STREAM, (128, 128)))
    assert np.array_equal(a, np.asarray(rng.normal(STREAM, (128, 128))))
    b = np.asarray(rng.normal(rng.fold(STREAM, 1), (128, 128)))
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02


def test_uniform_is_inside_the_open_interval():
    u = np.asarray(rng.uniform(STREAM, (1 << 16,)))
    assert (u > 0).all() and (u < 1).all()
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_sin_turns_matches_numpy():
    t = np.linspace(-50, 50, 100_001, dtype=np.float32)
    assert (
        np.abs(np.asarray(rng.sin_turns(t)) - np.sin(2 * np.pi * t.astype(np.float64))).max() < 1e-5
    )


def test_materialised_returns_its_values_and_spreads_nan():
    values = (jnp.arange(4.0), jnp.ones((2, 3)))
    out = rng.materialised(values)
    assert all(np.array_equal(a, b) for a, b in zip(out, values, strict=True))
    nan = rng.materialised((jnp.array([jnp.nan, 1.0]), jnp.ones(3)))
    assert all(np.isnan(np.asarray(a)).all() for a in nan)


@pytest.mark.parametrize("rows, cols", [(1024, 9), (2048, 9), (1025, 16), (64, 1)])
def test_normal_columns_is_the_transposed_normal_draw(rows, cols):
    # Both Box-Muller paths (paired from 2^14 numbers with an even row count, else one
    # output per pair): the column-first layout must not change a single number.
    by_row = np.asarray(jax.jit(rng.normal, static_argnums=1)(STREAM, (rows, cols)))
    by_col = np.asarray(jax.jit(rng.normal_columns, static_argnums=(1, 2))(STREAM, rows, cols))
    assert by_col.shape == (cols, rows)
    np.testing.assert_array_equal(by_col, by_row.T)
