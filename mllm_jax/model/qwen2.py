"""Qwen2 / Qwen2.5 causal LM in Flax NNX, numerically the model of transformers'
`Qwen2ForCausalLM`: the whole forward pass, read top to bottom.

  parameters      `param()`: an nnx.Param tagged with logical axis names per dim
  building blocks `RMSNorm`, `Embedding` (and the tied LM head), `Linear` (every projection)
  rotary          RoPE frequencies (plain and YaRN) and the rotation
  remat           per-layer rematerialisation policies by name
  the network     `Attention`, `MLP`, `DecoderLayer`, `Qwen2ForCausalLM`, `init_model`

Kept apart: the attention kernels (`mllm_jax.model.attention`), the KV cache
(`mllm_jax.model.cache`), the sharding rules (`mllm_jax.model.sharding`) and the config
(`mllm_jax.model.config`).

Attribute names mirror the HF module tree (`embed_tokens`, `layers[i].self_attn.q_proj`,
`layers[i].mlp.gate_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`,
`lm_head`), so `mllm_jax.model.hf` maps checkpoints with one small table. Layers are a
plain list (not stacked for scan): LoRA targets linears by path and each layer can be
rematerialised on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.model.attention import attend, merge_attention
from mllm_jax.model.cache import KVCache, write_layer
from mllm_jax.model.config import REMAT_NAMES, Qwen2Config, YarnScaling
from mllm_jax.model.sharding import (
    AXIS_UNITS,
    LOGICAL_AXES,
    ActivationSharding,
    ShardingRules,
    constrain,
    state_shardings,
)

# ---------------------------------------------------------------------------------------
# Parameters and building blocks
#
# Every parameter carries flax variable metadata `logical_axes` (one name or None per
# dim, e.g. ("vocab", "embed")) and `axis_units` (a dim is only ever sharded in whole
# units, e.g. whole heads). `mllm_jax.model.sharding` maps the names onto a mesh. These
# layers take at most an optional `ActivationSharding`.
# ---------------------------------------------------------------------------------------


def param(
    value: jax.Array, axes: tuple[str | None, ...], units: tuple[int, ...] | None = None
) -> nnx.Param:
    """An nnx.Param tagged with logical axis names (and sharding units) per dim."""
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} logical axes {axes} for a {value.ndim}-d parameter")
    units = tuple(units) if units is not None else (1,) * value.ndim
    return nnx.Param(value, **{LOGICAL_AXES: tuple(axes), AXIS_UNITS: units})


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32.

    scale: param_dtype[dim] (torch's `weight`). As transformers, the normalised value is
    cast back to the input dtype before the scale multiplies it.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> same shape and dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table: embedding: param_dtype[vocab, embed] (torch's `weight`)."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.compute_dtype = compute_dtype
        init = nnx.initializers.normal(init_std)
        self.embedding = param(
            init(rngs.params(), (vocab_size, dim), param_dtype), ("vocab", "embed")
        )

    def __call__(self, ids: jax.Array, sharding: ActivationSharding | None = None) -> jax.Array:
        """ids: i32[batch, seq] -> [batch, seq, embed] in the compute dtype.

        With a `sharding`, the table's embed dim is gathered first (as FSDP does for every
        weight) so the rows come out sharded like the ids (batch), not over embed.
        """
        table = constrain(self.embedding[...], sharding, ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: x: [..., embed] -> f32[..., vocab] = x @ embedding^T."""
        table = self.embedding[...].astype(self.compute_dtype)
        return jnp.einsum(
            "...e,ve->...v", x.astype(self.compute_dtype), table, preferred_element_type=jnp.float32
        )


# Every projection of the network (q/k/v/o, gate/up/down, an untied LM head) is a `Linear`
# and goes through `Linear.__call__`, so an adapter (LoRA) can be attached here alone.


class Linear(nnx.Module):
    """y = x @ kernel + bias.

    kernel: param_dtype[in_features, out_features] (transposed w.r.t. torch's weight),
    bias: param_dtype[out_features] or None. `axes` are the logical axis names of the
    kernel dims; `units` the granularity at which a dim may be sharded (e.g. head_dim
    for a dim that concatenates heads, so heads are never split).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        units: tuple[int, int] = (1, 1),
        use_bias: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        init = nnx.initializers.normal(init_std)
        self.kernel = param(
            init(rngs.params(), (in_features, out_features), param_dtype), axes, units
        )
        self.bias = (
            param(jnp.zeros((out_features,), param_dtype), (axes[1],), (units[1],))
            if use_bias
            else None
        )
        # Slot for a LoRA adapter (`mllm_jax.model.lora.apply_lora`); declared as data so
        # a module can be attached later.
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """x: [..., in_features] -> [..., out_features] in out_dtype (default compute dtype).

        The matmul takes inputs in the compute dtype and accumulates in float32.
        """
        dtype = self.compute_dtype
        lead = x.shape[:-1]
        # One [N, in] x [in, out] matmul (a free reshape): with [batch, seq, in] inputs
        # the weight gradient contracts two dims, and XLA:CPU then materialises the
        # upstream gradient transposed (about 8x slower LoRA backward of an MLP).
        x = x.reshape(-1, x.shape[-1])
        y = jnp.matmul(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            preferred_element_type=jnp.float32,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora is not None:
            y = self.lora(x, y)
        return y.astype(out_dtype or dtype).reshape(*lead, y.shape[-1])


# ---------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE), plain or YaRN-scaled, as transformers computes them
# for Qwen2 (`modeling_rope_utils._compute_yarn_parameters`).
#
# Frequencies are computed once on the host in float32; the rotation runs in float32 and
# is cast back to the input dtype.
# ---------------------------------------------------------------------------------------


def _yarn_attention_factor(scaling: YarnScaling) -> float:
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return mscale(scaling.factor)


def _yarn_inverse_frequencies(dim: int, base: float, scaling: YarnScaling) -> np.ndarray:
    def correction_dim(rotations: float) -> float:
        orig = scaling.original_max_position_embeddings
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    return (
        interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    ).astype(np.float32)


def rope_frequencies(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """(inverse frequencies f32[head_dim // 2], attention factor that scales cos and sin)."""
    dim, base = config.head_dim, config.rope_theta
    if config.rope_scaling is None:
        inv = np.float32(1.0) / (
            np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        )
        return inv.astype(np.float32), 1.0
    scaling = config.rope_scaling
    return _yarn_inverse_frequencies(dim, base, scaling), _yarn_attention_factor(scaling)


def rope_tables(
    positions: jax.Array, inv_freq: np.ndarray, attention_factor: float
) -> tuple[jax.Array, jax.Array]:
    """cos, sin: f32[batch, seq, head_dim // 2] for positions: i32[batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x: [batch, seq, heads, head_dim] by the tables cos/sin: f32[batch, seq, head_dim//2].

    Half-split convention (transformers' `rotate_half`), not interleaved pairs.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# Rematerialisation policies of the decoder layers, by name.
#
# A policy decides which values computed inside a layer's forward pass are kept for the
# backward pass; everything else is recomputed there. Names (`REMAT_NAMES` of
# `mllm_jax.model.config`: the `remat` of `Qwen2Config`, of a model call and of the train
# config):
#
#   "none"                              keep every activation (no remat region)
#   "full"                              keep only each layer's inputs; recompute the rest
#   "dots_saveable"                     keep every matmul output, recompute the elementwise
#                                       work (norms, RoPE, SiLU, softmax)
#   "dots_with_no_batch_dims_saveable"  keep the projections' outputs (dots without batch
#                                       dims), recompute attention's batched score / PV dots
#   "nothing_saveable"                  same memory as "full" (kept for symmetry with jax)
#
# `True` / `False` mean "full" / "none" (the older boolean flag).
# ---------------------------------------------------------------------------------------


# One policy per name of `REMAT_NAMES` except "none" (no remat region); None: nnx.remat's
# default (keep nothing); tests/model/test_model_remat.py checks the two lists agree.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def remat_name(value: bool | str) -> str:
    """The policy name of a `remat` setting (True -> "full", False -> "none")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_NAMES:
        raise ValueError(f"remat {value!r} is not one of {REMAT_NAMES} (or True / False)")
    return value


def remat_layer(fn: Callable, value: bool | str) -> Callable:
    """`fn` (a layer call) wrapped in `nnx.remat` with the named policy, or `fn` itself
    for "none"."""
    name = remat_name(value)
    if name == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[name])


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Context:
    """What every layer of one forward call needs besides its own weights and cache."""

    cos: jax.Array  # f32[B, T, head_dim // 2]
    sin: jax.Array
    q_positions: jax.Array  # i32[B, T]
    q_segment_ids: jax.Array
    kv_positions: jax.Array  # i32[B, S] (S = T without a cache)
    kv_segment_ids: jax.Array
    write_index: jax.Array | None  # cache slot of the first new token
    prefix_positions: jax.Array | None  # i32[1 or B, P] of a shared read-only prefix
    prefix_segment_ids: jax.Array | None
    segments_given: bool = dataclasses.field(default=True, metadata=dict(static=True))
    sharding: ActivationSharding | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, q/k/v bias and no o bias."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        e, d = config.hidden_size, config.head_dim
        h, k = config.num_attention_heads, config.num_key_value_heads
        common = dict(
            param_dtype=jnp.dtype(config.param_dtype),
            compute_dtype=jnp.dtype(config.compute_dtype),
            init_std=config.initializer_range,
            rngs=rngs,
        )
        self.q_proj = Linear(
            e, h * d, axes=("embed", "heads"), units=(1, d), use_bias=True, **common
        )
        self.k_proj = Linear(
            e, k * d, axes=("embed", "kv_heads"), units=(1, d), use_bias=True, **common
        )
        self.v_proj = Linear(
            e, k * d, axes=("embed", "kv_heads"), units=(1, d), use_bias=True, **common
        )
        self.o_proj = Linear(h * d, e, axes=("heads", "embed"), units=(d, 1), **common)

    def __call__(
        self,
        x: jax.Array,
        ctx: _Context,
        kv: tuple[jax.Array, jax.Array] | None,
        prefix_kv: tuple[jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [B, T, embed] -> ([B, T, embed], this layer's updated (keys, values) or None)."""
        cfg = self.config
        b, t, _ = x.shape
        d = cfg.head_dim
        heads, kv_heads = ("batch", None, "heads"), ("batch", None, "kv_heads")
        q = constrain(self.q_proj(x), ctx.sharding, heads, (1, 1, d))
        k = constrain(self.k_proj(x), ctx.sharding, kv_heads, (1, 1, d))
        v = constrain(self.v_proj(x), ctx.sharding, kv_heads, (1, 1, d))
        q = q.reshape(b, t, cfg.num_attention_heads, d)
        k = k.reshape(b, t, cfg.num_key_value_heads, d)
        v = v.reshape(b, t, cfg.num_key_value_heads, d)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        # A call that fills a cache of exactly its own length (a prefill) attends only its
        # own tokens, in order: causal self-attention, whose XLA path skips the key blocks
        # past each query chunk instead of scoring the whole [T, T] square.
        fills_cache = kv is not None and kv[0].shape[1] == t
        # Calls of at least one key block into a larger cache (prefill chunks, query
        # parts) read only its filled blocks; shorter ones (decode and answer steps) score
        # the whole cache in one dense pass, cheaper than a loop of tiny blocks.
        reads_filled = kv is not None and not fills_cache and t >= cfg.attention_query_chunk
        if kv is not None:
            kv = write_layer(kv[0], kv[1], k, v, ctx.write_index)
            k, v = kv
        common = dict(
            q_positions=ctx.q_positions,
            q_segment_ids=ctx.q_segment_ids,
            scale=d**-0.5,
            query_chunk=cfg.attention_query_chunk,
        )
        out = attend(
            q,
            k,
            v,
            kv_positions=ctx.kv_positions,
            kv_segment_ids=ctx.kv_segment_ids,
            self_attention=kv is None or fills_cache,
            # Cached calls stay on the XLA path (the kernels are for training shapes).
            backend=cfg.attention_backend if kv is None else "xla",
            kv_filled=ctx.write_index + t if reads_filled else None,
            key_block=cfg.attention_query_chunk,
            segments_given=ctx.segments_given,
            return_lse=prefix_kv is not None,
            **common,
        )
        if prefix_kv is not None:
            out, lse = out
            out_p, lse_p = attend(
                q,
                prefix_kv[0],
                prefix_kv[1],
                kv_positions=ctx.prefix_positions,
                kv_segment_ids=ctx.prefix_segment_ids,
                return_lse=True,
                backend=cfg.attention_backend,
                **common,
            )
            out = merge_attention(out, lse, out_p, lse_p)
        out = constrain(out.reshape(b, t, -1), ctx.sharding, heads, (1, 1, d))
        return self.o_proj(out), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        common = dict(
            param_dtype=jnp.dtype(config.param_dtype),
            compute_dtype=jnp.dtype(config.compute_dtype),
            init_std=config.initializer_range,
            rngs=rngs,
        )
        self.gate_proj = Linear(e, m, axes=("embed", "mlp"), **common)
        self.up_proj = Linear(e, m, axes=("embed", "mlp"), **common)
        self.down_proj = Linear(m, e, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array, sharding: ActivationSharding | None = None) -> jax.Array:
        """x: [B, T, embed] -> [B, T, embed]; `sharding` pins the [B, T, mlp] product."""
        inner = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(inner, sharding, ("batch", None, "mlp")))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd
        )

    def __call__(self, h, ctx, kv, prefix_kv):
        attn_out, kv = self.self_attn(self.input_layernorm(h), ctx, kv, prefix_kv)
        h = h + attn_out
        h = h + self.mlp(self.post_attention_layernorm(h), ctx.sharding)
        return h, kv


def _check_cache_room(cache: KVCache, new_tokens: int) -> None:
    """Refuses to overflow a cache when its fill level is known (outside jit); inside
    jit the caller sizes the cache (an overflowing write would be clamped silently)."""
    try:
        filled = int(cache.length)
    except jax.errors.ConcretizationTypeError:
        return
    if filled + new_tokens > cache.max_len:
        raise ValueError(
            f"KV cache overflow: {filled} slots filled + {new_tokens} new tokens > max_len "
            f"{cache.max_len}"
        )


def _run_layer(layer: DecoderLayer, h, ctx, kv, prefix_kv):
    return layer(h, ctx, kv, prefix_kv)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """i32[B, T]: each token's index within its run of equal segment ids (so packed
    sequences restart at 0 and left padding does not shift the real tokens)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    run_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - run_start


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 decoder-only LM.

    Call: `model(input_ids, positions=None, segment_ids=None, cache=None, *, prefix=None,
    return_hidden=False, remat=None)`.
    """

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        pd, cd = jnp.dtype(config.param_dtype), jnp.dtype(config.compute_dtype)
        self.embed_tokens = Embedding(
            config.vocab_size,
            config.hidden_size,
            param_dtype=pd,
            compute_dtype=cd,
            init_std=config.initializer_range,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                param_dtype=pd,
                compute_dtype=cd,
                init_std=config.initializer_range,
                rngs=rngs,
            )
        )

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        prefix: KVCache | None = None,
        return_hidden: bool = False,
        remat: bool | str | None = None,
        activation_sharding: ActivationSharding | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Forward pass.

        input_ids: i32[B, T]. positions: i32[B, T], default: index within each segment
        (required with a cache). segment_ids: i32[B, T], 0 = padding, tokens attend only
        within their segment; default all 1. cache: KVCache to append to (returns
        (out, new cache)). prefix: a read-only KVCache (batch 1 or B) that every row also
        attends to, without being copied (see `mllm_jax.model.prefix`).
        remat: per-layer rematerialisation policy name (`REMAT_POLICIES` above: "none",
        "full", "dots_saveable", ...; True / False = "full" / "none"); default
        `config.remat`. activation_sharding: pins activations to a mesh layout
        (`mllm_jax.model.sharding`; default: unconstrained).
        Returns f32[B, T, vocab] logits, or with return_hidden the final-normed hidden
        states [B, T, embed] in the compute dtype (apply `logits` to a gathered subset).
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, t = input_ids.shape
        segments_given = segment_ids is not None
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when calling with a cache")
            positions = positions_from_segments(segment_ids)
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr.shape != (b, t):
                raise ValueError(f"{name} has shape {arr.shape}, input_ids {input_ids.shape}")
        positions = positions.astype(jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        inv_freq, attention_factor = rope_frequencies(cfg)
        cos, sin = rope_tables(positions, inv_freq, attention_factor)
        if cache is not None:
            if cache.batch != b:
                raise ValueError(f"cache batch {cache.batch} != input batch {b}")
            _check_cache_room(cache, t)
            write_index = cache.length
            cache = cache.write_metadata(positions, segment_ids)
            kv_positions, kv_segment_ids = cache.positions, cache.segment_ids
        else:
            write_index = None
            kv_positions, kv_segment_ids = positions, segment_ids
        ctx = _Context(
            cos=cos,
            sin=sin,
            q_positions=positions,
            q_segment_ids=segment_ids,
            kv_positions=kv_positions,
            kv_segment_ids=kv_segment_ids,
            write_index=write_index,
            prefix_positions=None if prefix is None else prefix.positions,
            prefix_segment_ids=None if prefix is None else prefix.segment_ids,
            segments_given=segments_given,
            sharding=activation_sharding,
        )
        run = remat_layer(_run_layer, cfg.remat if remat is None else remat)
        residual = ("batch", None, None)
        h = constrain(
            self.embed_tokens(input_ids, activation_sharding), activation_sharding, residual
        )
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            prefix_kv = None if prefix is None else (prefix.keys[i], prefix.values[i])
            h, kv = run(layer, h, ctx, kv, prefix_kv)
            h = constrain(h, activation_sharding, residual)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        h = self.norm(h)
        out = h if return_hidden else self.logits(h)
        if cache is None:
            return out
        return out, dataclasses.replace(cache, keys=tuple(new_keys), values=tuple(new_values))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: hidden [..., embed] (final-normed) -> f32[..., vocab]."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden, out_dtype=jnp.float32)

    def logits_for(self, hidden: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
        """The LM head's logits of a few tokens only: hidden [..., embed] (final-normed)
        -> f32[..., len(token_ids)], equal to `logits(hidden)[..., token_ids]`."""
        ids = jnp.asarray(token_ids, jnp.int32)
        if self.lm_head is None:
            rows = self.embed_tokens.embedding[...][ids]  # [n, embed]
        else:
            if self.lm_head.lora is not None or self.lm_head.bias is not None:
                raise ValueError("logits_for supports a plain LM head (no adapter, no bias)")
            rows = self.lm_head.kernel[...][:, ids].T
        dtype = self.embed_tokens.compute_dtype
        return jnp.einsum(
            "...e,ne->...n",
            hidden.astype(dtype),
            rows.astype(dtype),
            preferred_element_type=jnp.float32,
        )


def init_model(
    config: Qwen2Config,
    key: jax.Array | int = 0,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> Qwen2ForCausalLM:
    """A randomly initialised model, drawn in one jitted call (optionally straight into
    the shardings of `mesh` / `rules`, see `mllm_jax.model.sharding`).

    Same distributions as the module constructors and transformers' Qwen2 init (kernels
    and embeddings normal(0, initializer_range), zero biases, unit norm scales), but all
    normal weights are slices of ONE draw: XLA compiles the PRNG once per draw, which
    otherwise dominates start-up time on CPU (about 0.5 s per parameter shape).
    """
    key = jax.random.key(key) if isinstance(key, int) else key
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    layout = tuple(
        (str(path[-1]), tuple(var.shape), jnp.dtype(var.dtype).name) for path, var in flat
    )
    out_shardings = None
    if mesh is not None:
        shardings = state_shardings(state, mesh, rules or ShardingRules.default())
        out_shardings = tuple(var.get_value() for _, var in nnx.to_flat_state(shardings))
    draw = _param_drawer(layout, config.initializer_range, out_shardings)
    for (_, var), value in zip(flat, draw(key), strict=True):
        var.set_value(value)
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=16)
def _param_drawer(layout: tuple, std: float, out_shardings: tuple | None):
    """A jitted key -> [parameter values] for a (name, shape, dtype) layout, cached so
    repeated inits of one architecture compile once."""

    def draw(key: jax.Array) -> list[jax.Array]:
        sizes = [
            math.prod(shape) if name in ("kernel", "embedding") else 0 for name, shape, _ in layout
        ]
        dtype = jnp.dtype(layout[0][2])
        noise = jax.random.normal(key, (sum(sizes),), dtype) * jnp.asarray(std, dtype)
        values, offset = [], 0
        for (name, shape, dt), size in zip(layout, sizes, strict=True):
            if size:
                values.append(noise[offset : offset + size].reshape(shape).astype(dt))
                offset += size
            else:
                values.append((jnp.ones if name == "scale" else jnp.zeros)(shape, dt))
        return tuple(values)

    return jax.jit(draw, out_shardings=out_shardings)
