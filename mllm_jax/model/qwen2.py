"""Qwen2 / Qwen2.5 causal LM in Flax NNX, numerically the model of transformers'
`Qwen2ForCausalLM`.

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

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.model.attention import attend, merge_attention
from mllm_jax.model.cache import KVCache, write_layer
from mllm_jax.model.config import Qwen2Config
from mllm_jax.model.layers import Embedding, RMSNorm
from mllm_jax.model.linear import Linear
from mllm_jax.model.remat import remat_layer
from mllm_jax.model.rope import apply_rope, rope_frequencies, rope_tables
from mllm_jax.model.sharding import ActivationSharding, constrain


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
        if kv is not None:
            kv = write_layer(kv[0], kv[1], k, v, ctx.write_index)
            k, v = kv
        common = dict(
            q_positions=ctx.q_positions,
            q_segment_ids=ctx.q_segment_ids,
            scale=d**-0.5,
            backend=cfg.attention_backend,
            query_chunk=cfg.attention_query_chunk,
        )
        out = attend(
            q,
            k,
            v,
            kv_positions=ctx.kv_positions,
            kv_segment_ids=ctx.kv_segment_ids,
            self_attention=kv is None,
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
        remat: per-layer rematerialisation policy name (`mllm_jax.model.remat`: "none",
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
    the shardings of `mesh` / `rules`, see `mllm_jax.train.mesh`).

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
        from mllm_jax.train.mesh import ShardingRules, state_shardings

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
