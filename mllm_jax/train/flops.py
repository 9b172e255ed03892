"""Model FLOPs of a train step and model FLOPs utilisation (MFU).

Convention (issue 5): N = non-embedding parameters (embedding table and LM head
excluded); 6N FLOPs per token for full training (forward 2N, backward 4N), 4N for LoRA
(the frozen weights need no weight gradients; the adapters' own FLOPs are ignored). The
LM head (2 * hidden * vocab forward) is counted only at the answer positions, with the
same 3x (full) / 2x (LoRA) factor. Attention adds 4 * head_dim * heads FLOPs per causal
(query, key) pair per layer in the forward (QK^T and PV) and twice that backward, in
both modes. Rematerialisation is not counted (it is overhead, not model FLOPs), and
padding tokens are not counted either.
"""

from __future__ import annotations

from mllm_jax.model.config import Qwen2Config
from mllm_jax.train.batches import BatchStats

# Dense bf16 peak FLOP/s per device (vendor numbers, no sparsity).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def non_embedding_params(config: Qwen2Config) -> int:
    embed = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else config.hidden_size * config.vocab_size
    return config.num_parameters() - embed - head


def step_flops(config: Qwen2Config, stats: BatchStats, mode: str) -> float:
    """Model FLOPs of one optimizer step over batches with token counts `stats`."""
    factor = 4 if mode == "lora" else 6
    body = factor * non_embedding_params(config) * stats.real_tokens
    head = factor * config.hidden_size * config.vocab_size * stats.answer_tokens
    per_pair = 4 * config.head_dim * config.num_attention_heads * config.num_hidden_layers
    attention = 3 * per_pair * stats.attention_pairs
    return float(body + head + attention)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of a device kind (jax `Device.device_kind`), None if unknown."""
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None
