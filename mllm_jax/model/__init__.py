"""Qwen2 / Qwen2.5 in Flax NNX: config, model, HF checkpoint I/O, KV cache, generation.

from mllm_jax.model import load_hf, save_hf, Qwen2Config, Qwen2ForCausalLM
"""

from mllm_jax.model.cache import KVCache
from mllm_jax.model.config import PRESET_NAMES, ConfigError, Qwen2Config, YarnScaling, preset
from mllm_jax.model.decoding import DecodingResult, decode_greedy, prefill
from mllm_jax.model.hf import CheckpointError, load_hf, save_hf
from mllm_jax.model.prefix import prefill_prefix, score_with_prefix
from mllm_jax.model.qwen2 import Qwen2ForCausalLM, init_model

__all__ = [
    "PRESET_NAMES",
    "CheckpointError",
    "ConfigError",
    "DecodingResult",
    "KVCache",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "YarnScaling",
    "decode_greedy",
    "init_model",
    "load_hf",
    "prefill",
    "prefill_prefix",
    "preset",
    "save_hf",
    "score_with_prefix",
]
