"""The prior's layout-tuned counting kernels against plain numpy, and the uniform causes' grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.prior.causes import _count_below, _transposed, sample_causes
from mllm_jax.prior.hparams import SAMPLING_MIXED, SAMPLING_UNIFORM
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


@pytest.mark.parametrize("sampling", [SAMPLING_UNIFORM, SAMPLING_MIXED], ids=["uniform", "mixed"])
def test_uniform_causes_use_every_multiple_of_2_pow_minus_24(sampling):
    """Uniform causes lie on torch.rand's grid, k / 2^24, with odd and even k in both
    halves of [0, 1): a grid twice as coarse above 0.5 made a column's values tie 1.5x
    as often as the reference's."""
    stream = jnp.array([15, 4], jnp.uint32)  # its mixed task has 3 uniform columns
    x = sample_causes(stream, 4096, 16, jnp.int32(16), jnp.int32(sampling), jnp.bool_(False))
    x = np.asarray(x, np.float64)
    k = x * 2.0**24
    if sampling == SAMPLING_MIXED:  # keep the uniform columns (the only ones in [0, 1))
        k = k[:, ((k >= 0) & (k < 2**24)).all(axis=0)]
        assert k.shape[1] >= 2
    assert (k == np.round(k)).all() and (k >= 0).all() and (k < 2**24).all()
    for half in (k < 2**23, k >= 2**23):
        odd = np.mean(k[half] % 2 == 1)
        assert 0.45 < odd < 0.55, odd
