"""The prior's layout-tuned counting kernels against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.prior.causes import _count_below, _transposed
from mllm_jax.prior.reg2cls import _count_less


def test_count_below_counts_cdf_values_at_or_under_u():
    rs = np.random.RandomState(0)
    cdf = np.cumsum(rs.rand(7, 20), axis=1).astype(np.float32)  # [width, k]
    u = (rs.rand(300, 7) * cdf[:, -1]).astype(np.float32)
    u[0] = cdf[:, 3]  # ties count as below
    got = np.asarray(jax.jit(lambda u, c: _count_below(u, _transposed(c)))(u, cdf))
    want = (u[:, :, None] >= cdf[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("n_used", [0, 5, 16, 17, 127])
def test_count_less_is_a_left_searchsorted(n_used):
    rs = np.random.RandomState(n_used)
    k, slots, rows = 127, 6, 500
    bounds = np.sort(rs.randint(0, 2**32 - 1, (k, slots), dtype=np.uint64), axis=0)
    bounds = bounds.astype(np.uint32)
    bounds[n_used:] = 0xFFFFFFFF  # unused bounds, as _categorical_codes pads them
    keys = rs.randint(0, 2**32, (rows, slots), dtype=np.uint64).astype(np.uint32)
    keys[:3] = bounds[:3]  # ties: a bound equal to the key does not count
    got = np.asarray(jax.jit(_count_less)(bounds, keys, jnp.int32(n_used)))
    want = np.stack(
        [np.searchsorted(bounds[:, s], keys[:, s], side="left") for s in range(slots)], 1
    )
    np.testing.assert_array_equal(got, want)
