"""Export of trained models: merged HF checkpoints and PEFT LoRA adapters (in and out).

from mllm_jax.export import save_merged_hf, save_peft_adapter, load_peft_adapter
"""

from mllm_jax.export.merged import save_merged_hf
from mllm_jax.model.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_peft_adapter,
    read_adapter_config,
    save_peft_adapter,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "load_peft_adapter",
    "read_adapter_config",
    "save_merged_hf",
    "save_peft_adapter",
]
