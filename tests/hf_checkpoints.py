"""Random tiny transformers Qwen2 checkpoints (needs torch, the [test] extra): the
reference side of every model comparison. `tools/bench_forward.py` uses them too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_HF_CONFIG: dict[str, Any] = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    # Larger than Qwen's 0.02 so logits spread and comparisons are not trivially small.
    initializer_range=0.2,
    eos_token_id=2,
    pad_token_id=0,
)


def make_hf_model(seed: int = 0, **overrides: Any):
    """A random float32 transformers Qwen2ForCausalLM (eval mode) of a tiny config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**{**TINY_HF_CONFIG, **overrides})
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        # Qwen2 initialises biases and norm weights to constants; randomise them so the
        # checkpoint mapping of every tensor is exercised.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(directory: str | Path, seed: int = 0, **overrides: Any):
    """Saves a random tiny HF Qwen2 checkpoint to `directory`; returns the torch model."""
    model = make_hf_model(seed, **overrides)
    model.save_pretrained(str(directory))
    return model


def hf_logits(model, ids) -> Any:
    """float32 numpy logits [B, T, vocab] of a transformers model for int ids [B, T]."""
    import numpy as np
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()
