"""The tiny Qwen2 that scoring tests run: the "tiny" preset with Qwen2.5's vocabulary (so
the real tokenizer's ids fit), tied embeddings, and weights wide enough that label
probabilities differ."""

from __future__ import annotations

from pathlib import Path

from mllm_jax.model import Qwen2Config, init_model, preset, save_hf


def tiny_scoring_config() -> Qwen2Config:
    return preset("tiny", vocab_size=151936, tie_word_embeddings=True, initializer_range=0.2)


def save_tiny_scoring_model(directory: Path, seed: int) -> Path:
    """A random tiny scoring model (`seed`) saved as an HF checkpoint in `directory`."""
    save_hf(init_model(tiny_scoring_config(), seed), directory)
    return directory
