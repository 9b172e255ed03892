"""Attention behind one small interface, `attend`, with backends chosen by name.

Masking is always explicit: a query attends to a key when both belong to the same
segment (segment id 0 = padding / empty cache slot, never attended) and the key's
position is <= the query's position. So packed rows, left padding and a KV cache all use
the same rule.

Backends:
  "xla"    dense einsums, queries in chunks of `query_chunk` (never a full [T, S] score
           matrix for long prompts), head-major: the G query heads of one KV head form
           the rows of one matmul against that head's keys ([B, K, G*C, D] x
           [B, K, S, D]), so K/V are never repeated. Causal self-attention skips the
           key blocks after each chunk of queries. Runs everywhere; the default.
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")`: NVIDIA GPU,
           bfloat16/float16 only. Without segment ids it uses cuDNN's causal mask;
           packed rows pass the explicit mask (per query chunk, as a bias).
  "splash" Pallas splash attention (TPU; `interpret=True` runs it on CPU for tests),
           causal by token index within segments.
The two kernels serve cache-free self-attention (training, scoring whole sequences);
calls with a cache or a shared prefix run the "xla" path whatever the backend.

Scores and softmax are float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so a fully masked row (a padding query) gives a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention_mask(
    q_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_positions: jax.Array,
    kv_segment_ids: jax.Array,
) -> jax.Array:
    """bool[B, T, S]: same non-zero segment and key position <= query position.

    q_*: i32[B, T]; kv_*: i32[B or 1, S].
    """
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same_segment & causal & (kv_segment_ids[:, None, :] != 0)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_positions: jax.Array,
    kv_segment_ids: jax.Array,
    scale: float,
    backend: str = "xla",
    query_chunk: int = 512,
    self_attention: bool = False,
    segments_given: bool = True,
    return_lse: bool = False,
    interpret: bool = False,
    kv_filled: jax.Array | None = None,
    key_block: int = 512,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multi-head attention with grouped K/V heads.

    q: [B, T, H, D]; k, v: [B or 1, S, K, D] with H % K == 0 (a batch of 1 is shared by
    all query rows without being copied); positions / segment ids: i32[B, T] and
    i32[B or 1, S]. `self_attention`: k/v are exactly the query tokens, in order (no
    cache), and positions increase along each segment, so no query attends a later
    token: the XLA path then skips key blocks past each query chunk (the masks inside
    the computed blocks stay exact), as the kernels' index-causal masks assume too.
    `segments_given`: False when the caller passed no segment ids (one causal
    sequence per row), which lets cuDNN use its built-in causal mask.
    `kv_filled`: i32 scalar (may be traced), for k/v read from a KV cache whose slots
    from this index on are empty: the "xla" path then scores only the filled slots,
    `key_block` at a time up to the last filled block (an online softmax in a loop of
    dynamic length; not reverse-differentiable, caches are for inference), so a prefill
    chunk or a decode step costs what the cache holds, not its capacity.
    Returns out: [B, T, H, D] in q's dtype, and with `return_lse` the log-sum-exp of the
    scores f32[B, T, H] (for merging partial attentions with `merge_attention`).
    """
    if backend not in ("xla", "cudnn", "splash"):
        raise ValueError(f"unknown attention backend {backend!r} (xla, cudnn, splash)")
    if kv_filled is not None and not self_attention and k.shape[0] == q.shape[0]:
        fn = functools.partial(_xla_filled_attention, filled=kv_filled, key_block=key_block)
    elif backend == "xla" or not self_attention or return_lse:
        # Cached calls (decode, prefix reuse, prefill into a cache) and partial
        # attentions to be merged always run dense: the kernels' causal masks are by
        # token index, and they return no log-sum-exp.
        fn = functools.partial(_xla_attention, query_chunk=query_chunk, causal=self_attention)
    elif backend == "cudnn":
        fn = functools.partial(
            _cudnn_attention, query_chunk=query_chunk, plain_causal=not segments_given
        )
    else:
        fn = functools.partial(_splash_attention, interpret=interpret)
    out, lse = fn(q, k, v, q_positions, q_segment_ids, kv_positions, kv_segment_ids, scale)
    return (out, lse) if return_lse else out


def merge_attention(
    out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
) -> jax.Array:
    """Combines attention over two disjoint key sets into attention over their union.

    out_*: [B, T, H, D]; lse_*: f32[B, T, H]. Exact (softmax renormalisation).
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    w_a = jnp.exp(lse_a - lse)[..., None]
    w_b = jnp.exp(lse_b - lse)[..., None]
    return (out_a.astype(jnp.float32) * w_a + out_b.astype(jnp.float32) * w_b).astype(out_a.dtype)


# ------------------------------------------------------------------------------ xla

# A causal self-attention groups its query chunks into at most this many bands; a band
# attends only the keys up to its own last query (static slices), so the masked upper
# triangle is (mostly) not computed. Each band is one more copy of the block in the
# program, hence the cap; chunks within a band share one `lax.map`.
MAX_CAUSAL_BANDS = 16


def _xla_attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg, scale, *, query_chunk, causal):
    """q: [B, T, H, D]; k, v: [Bk, S, K, D] -> (out [B, T, H, D], lse f32[B, T, H]).

    Head-major throughout: queries [B, K, G, T, D] (the G query heads of one KV head next
    to each other), keys/values [Bk, K, S, D], so every dot has its batch dims leading
    and contracts the minor dim, the layout XLA:CPU's dot runs fastest. `causal`: k/v are
    the query tokens themselves, in order, and a query never attends a later token.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    qh = jnp.transpose(q.reshape(b, t, kv_heads, groups, d), (0, 2, 3, 1, 4))
    kh = jnp.transpose(k, (0, 2, 1, 3))
    vh = jnp.transpose(v, (0, 2, 1, 3))
    chunk = min(query_chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        # Padded queries get segment 0: they attend nothing and are sliced off below.
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pad)))
    per_band = -(-n // MAX_CAUSAL_BANDS) if causal else n
    outs, lses = [], []
    for first in range(0, n, per_band):
        lo, hi = first * chunk, min(first + per_band, n) * chunk
        keys = min(hi, k.shape[1]) if causal else k.shape[1]
        out, lse = _xla_band(
            qh[:, :, :, lo:hi],
            kh[:, :, :keys],
            vh[:, :, :keys],
            q_pos[:, lo:hi],
            q_seg[:, lo:hi],
            kv_pos[:, :keys],
            kv_seg[:, :keys],
            scale,
            chunk,
        )
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=3)
    out = jnp.transpose(out[:, :, :, :t], (0, 3, 1, 2, 4)).reshape(b, t, h, d)
    lse = jnp.transpose(lse[..., :t], (0, 3, 1, 2)).reshape(b, t, h)
    return out, lse


def _xla_band(q, k, v, q_pos, q_seg, kv_pos, kv_seg, scale, chunk):
    """q: [B, K, G, C * m, D] (m chunks of C queries) against k, v: [Bk, K, S, D]:
    one block, or `lax.map` over the m chunks (one [C, S] score block at a time)."""
    b, kv_heads, groups, tb, d = q.shape
    m = tb // chunk
    if m == 1:
        return _xla_block(q, k, v, q_pos, q_seg, kv_pos, kv_seg, scale)

    def chunks(x, axis):
        x = x.reshape(*x.shape[:axis], m, chunk, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    # Rematerialised per chunk: without it the backward pass keeps every chunk's f32
    # [C, S] scores and probabilities, the whole [T, S] matrix per head after all (309 GiB
    # per chip for 2 layers of the 7B recipe at 32k tokens, tools/tpu_dry_run.py).
    @jax.checkpoint
    def one(args):
        qc, pc, sc = args
        return _xla_block(qc, k, v, pc, sc, kv_pos, kv_seg, scale)

    out, lse = jax.lax.map(one, (chunks(q, 3), chunks(q_pos, 1), chunks(q_seg, 1)))
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, groups, tb, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv_heads, groups, tb)
    return out, lse


def _xla_block(q, k, v, q_pos, q_seg, kv_pos, kv_seg, scale):
    """q: [B, K, G, C, D]; k, v: [Bk, K, S, D] (Bk = B or 1); q_*: i32[B, C]; kv_*:
    i32[Bk, S] -> (out [B, K, G, C, D] in q's dtype, lse f32[B, K, G, C])."""
    b, kv_heads, groups, c, d = q.shape
    s = k.shape[2]
    mask = attention_mask(q_pos, q_seg, kv_pos, kv_seg)  # [B, C, S]
    if k.shape[0] == b:
        rows = q.reshape(b, kv_heads, groups * c, d)
        scores = jnp.einsum("bkrd,bksd->bkrs", rows, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv_heads, groups, c, s)
        mask = mask[:, None, None]
    else:
        # One K/V row serves every query row: fold the query batch into the rows of a
        # single matmul per KV head instead of broadcasting (copying) the keys.
        rows = jnp.transpose(q, (1, 0, 2, 3, 4)).reshape(kv_heads, b * groups * c, d)
        scores = jnp.einsum("krd,ksd->krs", rows, k[0], preferred_element_type=jnp.float32)
        scores = scores.reshape(kv_heads, b, groups, c, s)
        mask = mask[None, :, None]
    scores = jnp.where(mask, scores * scale, MASK_VALUE)
    # The softmax is invariant to the shift, and d lse / d scores = softmax without it.
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    lse = (peak + jnp.log(total))[..., 0]
    # Normalise after the PV product: a divide over [C, D] instead of [C, S].
    weights = weights.astype(v.dtype)
    if k.shape[0] == b:
        weights = weights.reshape(b, kv_heads, groups * c, s)
        out = jnp.einsum("bkrs,bksd->bkrd", weights, v, preferred_element_type=jnp.float32)
        out = out.reshape(b, kv_heads, groups, c, d) / total
    else:
        weights = weights.reshape(kv_heads, b * groups * c, s)
        out = jnp.einsum("krs,ksd->krd", weights, v[0], preferred_element_type=jnp.float32)
        out = out.reshape(kv_heads, b, groups, c, d) / total
        out = jnp.transpose(out, (1, 0, 2, 3, 4))
        lse = jnp.transpose(lse, (1, 0, 2, 3))
    return out.astype(q.dtype), lse


def _xla_filled_attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg, scale, *, filled, key_block):
    """q: [B, T, H, D]; k, v: [B, S, K, D] (a KV cache) of which slots >= `filled`
    (i32 scalar) are empty -> (out [B, T, H, D] in q's dtype, lse f32[B, T, H]).

    The filled slots in blocks of `key_block` keys, merged by an online softmax (running
    peak, total and weighted sum, rescaled when the peak rises), in a `lax.fori_loop`
    that stops after the last filled block. Head-major like `_xla_block`."""
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = h // kv_heads
    block = min(key_block, s)
    blocks = -(-s // block)
    pad = blocks * block - s
    if pad:
        # Padded slots get segment 0: never attended.
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        kv_pos, kv_seg = (jnp.pad(x, ((0, 0), (0, pad))) for x in (kv_pos, kv_seg))
    rows = jnp.transpose(q.reshape(b, t, kv_heads, groups, d), (0, 2, 3, 1, 4))
    rows = rows.reshape(b, kv_heads, groups * t, d)
    kh = jnp.transpose(k, (0, 2, 1, 3))
    vh = jnp.transpose(v, (0, 2, 1, 3))

    def one_block(i, carry):
        peak, total, acc = carry
        start = i * block
        kb, vb = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=2) for x in (kh, vh))
        pos, seg = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=1) for x in (kv_pos, kv_seg))
        mask = attention_mask(q_pos, q_seg, pos, seg)[:, None, None]  # [B, 1, 1, T, Kb]
        scores = jnp.einsum("bkrd,bksd->bkrs", rows, kb, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv_heads, groups, t, block)
        scores = jnp.where(mask, scores * scale, MASK_VALUE).reshape(b, kv_heads, groups * t, block)
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1, keepdims=True))
        rescale = jnp.exp(peak - new_peak)
        weights = jnp.exp(scores - new_peak)
        total = total * rescale + jnp.sum(weights, axis=-1, keepdims=True)
        pv = jnp.einsum(
            "bkrs,bksd->bkrd", weights.astype(v.dtype), vb, preferred_element_type=jnp.float32
        )
        return new_peak, total, acc * rescale + pv

    last = jnp.clip((jnp.asarray(filled, jnp.int32) + block - 1) // block, 1, blocks)
    init = (
        jnp.full((b, kv_heads, groups * t, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((b, kv_heads, groups * t, 1), jnp.float32),
        jnp.zeros((b, kv_heads, groups * t, d), jnp.float32),
    )
    peak, total, acc = jax.lax.fori_loop(0, last, one_block, init)
    out = (acc / total).reshape(b, kv_heads, groups, t, d)
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)
    lse = (peak + jnp.log(total)).reshape(b, kv_heads, groups, t)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)
    return out.astype(q.dtype), lse


# ---------------------------------------------------------------------------- cudnn


def _require_platform(backend: str, platform: str) -> None:
    actual = jax.default_backend()
    if actual != platform:
        raise RuntimeError(
            f"attention backend {backend!r} needs a {platform.upper()} but JAX's default "
            f"backend is {actual!r}; use attention_backend='xla'"
        )


def _cudnn_attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg, scale, *, query_chunk, plain_causal):
    _require_platform("cudnn", "gpu")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(
            f"attention backend 'cudnn' needs bfloat16 or float16 activations, got {q.dtype}; "
            "set compute_dtype='bfloat16'"
        )
    b, t = q.shape[:2]
    if k.shape[0] != b:
        k, v = (jnp.broadcast_to(x, (b, *x.shape[1:])) for x in (k, v))
        kv_pos, kv_seg = (jnp.broadcast_to(x, (b, x.shape[1])) for x in (kv_pos, kv_seg))
    if plain_causal:
        out = jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn"
        )
    else:
        # cuDNN turns the boolean mask into a bias; chunking the queries bounds it to
        # [B, 1, chunk, S] per call.
        pieces = []
        for start in range(0, t, query_chunk):
            stop = min(start + query_chunk, t)
            mask = attention_mask(q_pos[:, start:stop], q_seg[:, start:stop], kv_pos, kv_seg)
            pieces.append(
                jax.nn.dot_product_attention(
                    q[:, start:stop], k, v, mask=mask[:, None], scale=scale, implementation="cudnn"
                )
            )
        out = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
    return out, None


# --------------------------------------------------------------------------- splash

_SPLASH_BLOCK = 128


def _splash_attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg, scale, *, interpret):
    del q_pos, kv_pos  # causal by token index: equal to positions without a cache
    if not interpret:
        _require_platform("splash", "tpu")
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    if k.shape[0] != b:
        k, v = (jnp.broadcast_to(x, (b, *x.shape[1:])) for x in (k, v))
        kv_seg = jnp.broadcast_to(kv_seg, (b, kv_seg.shape[1]))
    # Pad to whole kernel blocks; the pad is segment 0 (attends only itself).
    padded = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK
    pad = padded - t
    block = min(512, padded) if padded % min(512, padded) == 0 else _SPLASH_BLOCK
    mask = sa.MultiHeadMask([sa.CausalMask((padded, padded)) for _ in range(groups)])
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = sa.make_splash_mqa(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    # [B, T, K, G, D] -> [B, K, G, T, D]; splash expects the scale folded into q.
    qh = jnp.transpose(q.reshape(b, t, kv_heads, groups, d), (0, 2, 3, 1, 4)) * scale
    kh = jnp.transpose(k, (0, 2, 1, 3))  # [B, K, S, D]
    vh = jnp.transpose(v, (0, 2, 1, 3))
    if pad:
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        kh = jnp.pad(kh, ((0, 0), (0, 0), (0, pad), (0, 0)))
        vh = jnp.pad(vh, ((0, 0), (0, 0), (0, pad), (0, 0)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pad)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))

    def per_row(qr, kr, vr, qs, ks):
        segments = sa.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qk, kk, vk: kernel(qk, kk, vk, segment_ids=segments))(qr, kr, vr)

    out = jax.vmap(per_row)(qh.astype(q.dtype), kh, vh, q_seg, kv_seg)  # [B, K, G, Tp, D]
    out = jnp.transpose(out[:, :, :, :t], (0, 3, 1, 2, 4)).reshape(b, t, h, d)
    return out, None
