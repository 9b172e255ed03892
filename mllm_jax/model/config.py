"""Qwen2 / Qwen2.5 model configuration: architecture (read from and written to an HF
`config.json`) plus the runtime choices that an HF config does not hold (parameter and
compute dtypes, attention backend, query chunk size, rematerialisation).

Presets cover the Qwen2.5 Instruct sizes the project uses and a tiny test size.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
# Per-layer remat policy names; `mllm_jax.model.qwen2` says what each keeps and implements
# them (`REMAT_POLICIES`, `remat_layer`). Listed here so validating a config needs no model.
REMAT_NAMES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
)


class ConfigError(ValueError):
    """A config.json (or config dict) that does not describe a supported Qwen2 model."""


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling, with transformers' parameter names and defaults."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rope_type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if not self.truncate:
            out["truncate"] = False
        return out


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2ForCausalLM plus runtime options.

    Architecture fields mirror transformers' `Qwen2Config`. Runtime fields:
    `param_dtype` (storage of parameters), `compute_dtype` (activations and matmul
    inputs; RMSNorm statistics, RoPE and softmax always run in float32),
    `attention_backend` ("xla" | "cudnn" | "splash"), `attention_query_chunk` (queries
    per block in the dense backends, so long prompts never build a full [T, S] score
    matrix; also the key block of calls into a KV cache, which read only the filled
    blocks), `remat` (per-layer rematerialisation in the backward pass: a policy name of
    `REMAT_NAMES`, see `mllm_jax.model.qwen2`, or True / False for "full" / "none").
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime options (not part of the HF architecture).
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention_backend: str = "xla"
    attention_query_chunk: int = 512
    remat: bool | str = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; give head_dim explicitly"
                )
            set_(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}"
            )
        if self.attention_query_chunk < 1:
            raise ConfigError(
                f"attention_query_chunk must be >= 1, got {self.attention_query_chunk}"
            )
        if not isinstance(self.remat, bool) and self.remat not in REMAT_NAMES:
            raise ConfigError(f"remat {self.remat!r} is not one of {REMAT_NAMES} (or a bool)")
        if isinstance(self.eos_token_id, list):
            set_(self, "eos_token_id", tuple(self.eos_token_id))
        set_(self, "param_dtype", _dtype_name(self.param_dtype))
        set_(self, "compute_dtype", _dtype_name(self.compute_dtype))

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes: Any) -> Qwen2Config:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        e, m, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = e * q + q + 2 * (e * kv + kv) + q * e
        layer = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_hidden_layers * layer + e + head

    # ----------------------------------------------------------------- HF config.json

    @classmethod
    def from_hf_dict(
        cls, raw: dict[str, Any], *, source: str = "config", **runtime: Any
    ) -> Qwen2Config:
        """Builds a config from a transformers `config.json` dict (transformers 4 or 5 style).

        `runtime` sets the runtime fields (param_dtype, compute_dtype, ...).
        Raises ConfigError naming `source` for anything that is not a plain Qwen2 model.
        """
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type != "qwen2" or (archs and "Qwen2ForCausalLM" not in archs):
            raise ConfigError(
                f"{source}: model_type {model_type!r} / architectures {archs} is not a Qwen2 "
                "causal LM (expected model_type 'qwen2', architectures ['Qwen2ForCausalLM'])"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        if raw.get("use_sliding_window", False):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        theta, scaling = _rope_from_hf(raw, source)
        heads = int(raw["num_attention_heads"])
        kwargs: dict[str, Any] = dict(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=raw.get("head_dim"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            initializer_range=float(raw.get("initializer_range", 0.02)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )
        file_dtype = raw.get("dtype") or raw.get("torch_dtype")
        if file_dtype is not None and "param_dtype" not in runtime:
            kwargs["param_dtype"] = file_dtype
        kwargs.update(runtime)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: {err}") from err

    @classmethod
    def from_json_file(cls, path: str | Path, **runtime: Any) -> Qwen2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf_dict(raw, source=str(path), **runtime)

    def to_hf_dict(self, dtype: Any | None = None) -> dict[str, Any]:
        """The `config.json` transformers 5 reads (also readable by transformers 4)."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling.to_hf_dict())
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": _dtype_name(dtype if dtype is not None else self.param_dtype),
        }
        if self.rope_scaling is not None:
            # transformers 4 and vLLM read the scaling from `rope_scaling`.
            out["rope_scaling"] = {**self.rope_scaling.to_hf_dict(), "type": "yarn"}
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        return out


def _rope_from_hf(raw: dict[str, Any], source: str) -> tuple[float, YarnScaling | None]:
    """(rope_theta, YaRN scaling or None) from either `rope_parameters` (transformers 5)
    or `rope_theta` + `rope_scaling` (transformers 4)."""
    # As transformers 5: a non-empty legacy `rope_scaling` wins over `rope_parameters`
    # (Qwen's docs enable YaRN by adding rope_scaling to an existing config.json).
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    theta = (
        params.get("rope_theta")
        or raw.get("rope_theta")
        or ((raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    )
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default or yarn)")
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        orig = raw.get("max_position_embeddings", 32768)
    factor = params.get("factor")
    if factor is None:
        factor = raw.get("max_position_embeddings", orig) / orig
    return float(theta), YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


# ------------------------------------------------------------------------- presets

_QWEN25_COMMON: dict[str, Any] = dict(
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    bos_token_id=151643,
    eos_token_id=151645,
    param_dtype="bfloat16",
    compute_dtype="bfloat16",
)

# Values from the Qwen2.5-*-Instruct config.json files.
_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_QWEN25_COMMON,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_QWEN25_COMMON,
    ),
    "qwen2.5-3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_QWEN25_COMMON,
    ),
    "qwen2.5-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        **_QWEN25_COMMON,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> Qwen2Config:
    """A named config ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "tiny")."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {PRESET_NAMES}")
    return Qwen2Config(**{**_PRESETS[name], **overrides})
