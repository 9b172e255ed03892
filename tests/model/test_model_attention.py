"""The attention interface: mask semantics, shared-prefix merging, backends."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.model import ConfigError, attention, init_model, preset
from mllm_jax.model.attention import attend, merge_attention

B, T, H, K, D = 2, 40, 4, 2, 16


def _qkv(seed, t=T, b=B):
    rng = np.random.default_rng(seed)
    shapes = ((b, t, H, D), (b, t, K, D), (b, t, K, D))
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes)


def _dense_reference(q, k, v, mask):
    """Plain numpy attention with K/V heads repeated, as transformers does."""
    q, k, v, mask = map(np.asarray, (q, k, v, mask))
    k = np.repeat(k, H // K, axis=2)
    v = np.repeat(v, H // K, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    s = np.where(mask[:, None], s, -1e30)  # padding rows: uniform, ignored by the tests
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _packed_segments():
    seg = np.zeros((B, T), np.int32)
    seg[0, :25], seg[0, 25:37] = 1, 2  # two packed sequences + padding
    seg[1, 5:] = 1  # left padding
    pos = np.zeros((B, T), np.int32)
    for r in range(B):
        for s in (1, 2):
            idx = np.where(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    return jnp.asarray(pos), jnp.asarray(seg)


@functools.partial(
    jax.jit, static_argnames=("backend", "query_chunk", "self_attention", "interpret")
)
def _xla(q, k, v, pos, seg, **kw):
    """Self-attention under positions / segment ids, jitted (one compile per setting
    instead of one per op)."""
    return attend(
        q,
        k,
        v,
        q_positions=pos,
        q_segment_ids=seg,
        kv_positions=pos,
        kv_segment_ids=seg,
        scale=D**-0.5,
        **kw,
    )


def test_xla_attention_masks_segments_and_causality():
    q, k, v = _qkv(0)
    pos, seg = map(np.asarray, _packed_segments())
    mask = (
        (seg[:, :, None] == seg[:, None, :])
        & (pos[:, None, :] <= pos[:, :, None])
        & (seg[:, None, :] != 0)
    )
    ref = _dense_reference(q, k, v, mask)
    real = seg != 0
    for chunk in (512, 7):
        out = np.asarray(_xla(q, k, v, jnp.asarray(pos), jnp.asarray(seg), query_chunk=chunk))
        np.testing.assert_allclose(out[real], ref[real], atol=1e-5)
        assert np.isfinite(out).all()


def test_causal_block_skipping_equals_the_full_mask(monkeypatch):
    """Self-attention skips the key blocks after each query chunk (in bands; a band of
    several chunks maps over them); outputs and gradients equal attending every key
    under the explicit mask, packed segments and padding included."""
    q, k, v = _qkv(5)
    pos, seg = _packed_segments()
    real = np.asarray(seg) != 0
    weight = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape, np.float32))
    weight = weight * jnp.asarray(real, jnp.float32)[:, :, None, None]  # padding rows unused

    def loss(q, k, v, self_attention, chunk):
        out = _xla(q, k, v, pos, seg, self_attention=self_attention, query_chunk=chunk)
        return jnp.sum(out * weight), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=(3, 4))
    full_grads, full_out = grad(q, k, v, False, T)
    # 40 tokens in 3 chunks of 16 (the last padded), one band each; then 10 chunks of
    # 4 in 2 bands of 5.
    for chunk, bands in ((16, attention.MAX_CAUSAL_BANDS), (4, 2)):
        monkeypatch.setattr(attention, "MAX_CAUSAL_BANDS", bands)
        grads, out = grad(q, k, v, True, chunk)
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(full_out)[real], atol=1e-5)
        for g, ref in zip(grads, full_grads, strict=True):
            np.testing.assert_allclose(g, ref, atol=1e-5)


def test_the_backward_pass_keeps_one_chunk_of_scores_not_the_whole_matrix(monkeypatch):
    """Chunked queries bound the memory of the backward pass too: each chunk's scores
    are recomputed there, not kept, so the compiled gradient's temporaries stay well
    under one f32 [T, S] score matrix per head (the 7B recipe at 32k tokens needed 309
    GiB per chip for 2 layers before)."""
    monkeypatch.setattr(attention, "MAX_CAUSAL_BANDS", 1)  # one lax.map over every chunk
    t, chunk = 2048, 128
    q, k, v = _qkv(7, t=t, b=1)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.ones((1, t), jnp.int32)

    def loss(q, k, v):
        out = _xla(q, k, v, pos, seg, self_attention=False, query_chunk=chunk)
        return jnp.sum(out * out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    scores_bytes = H * t * t * 4  # f32 scores of every query against every key
    assert compiled.memory_analysis().temp_size_in_bytes < scores_bytes / 4


def test_shared_batch1_keys_and_lse_merge_are_exact():
    """Keys of batch 1 serve every query row without a copy, and attention over two
    disjoint key sets merges exactly into attention over their union."""
    q, k, v = _qkv(1)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    full = _xla(q, k[:1].repeat(B, 0), v[:1].repeat(B, 0), pos, seg)

    @jax.jit
    def split_and_merge(q, k, v):
        common = dict(q_positions=pos, q_segment_ids=seg, scale=D**-0.5, return_lse=True)
        parts = [
            attend(
                q, k[:1, s], v[:1, s], kv_positions=pos[:1, s], kv_segment_ids=seg[:1, s], **common
            )
            for s in (slice(0, 15), slice(15, T))
        ]
        return merge_attention(*parts[0], *parts[1])

    np.testing.assert_allclose(split_and_merge(q, k, v), full, atol=1e-5)


def test_splash_backend_matches_xla_in_interpret_mode():
    q, k, v = _qkv(2)
    pos, seg = _packed_segments()
    out = _xla(q, k, v, pos, seg, backend="splash", self_attention=True, interpret=True)
    ref = _xla(q, k, v, pos, seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)


def test_accelerator_backends_refuse_the_wrong_platform():
    q, k, v = _qkv(3)
    pos, seg = _packed_segments()
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    with pytest.raises(RuntimeError, match="'cudnn' needs a GPU"):
        _xla(*bf16, pos, seg, backend="cudnn", self_attention=True)
    with pytest.raises(RuntimeError, match="'splash' needs a TPU"):
        _xla(q, k, v, pos, seg, backend="splash", self_attention=True)
    with pytest.raises(ConfigError, match="attention_backend 'flash'"):
        preset("tiny", attention_backend="flash")
    model = init_model(preset("tiny", attention_backend="splash"))
    with pytest.raises(RuntimeError, match="'splash' needs a TPU"):
        jax.eval_shape(lambda ids: model(ids), jnp.ones((1, 8), jnp.int32))


def test_cached_calls_run_dense_whatever_the_backend():
    """With a cache the keys are not the query tokens; the kernels' index-causal masks
    would be wrong, so those calls take the XLA path (and work on CPU)."""
    q, k, v = _qkv(4)
    pos, seg = _packed_segments()
    ref = _xla(q, k, v, pos, seg)
    for backend in ("cudnn", "splash"):
        np.testing.assert_array_equal(_xla(q, k, v, pos, seg, backend=backend), ref)
