"""Tables -> prompts -> token ids.

- ``numbers``: the compact number encoding (z-score with the shown rows' statistics ->
  integers ``z*120+500``), numpy and padded-batch paths.
- ``table``: raw tables (numeric and text columns) -> the cells a prompt prints.
- ``prompt``: the MachineLearningLM prompt, byte for byte (``build_messages``).
- ``tokens``: the offline Qwen2.5 tokenizer, our ChatML template and ``PromptTokenizer``,
  the fast prompt -> ids path.
- ``sampling`` / ``sequence``: a task -> one training sequence within a token budget.
- ``pack``: sequences -> fixed-length training rows (the trainer's batch format).
- ``stats``: tokens per row, ours vs plain CSV (``mllm-jax stats``).
"""

from mllm_jax.encoding.numbers import PAPER_CLIP_MAX, encode_numeric
from mllm_jax.encoding.prompt import Prompt, build_messages, build_prompt
from mllm_jax.encoding.table import EncodedFeatures, encode_table
from mllm_jax.encoding.tokens import (
    QWEN25_CHAT_TEMPLATE,
    EncodedPrompt,
    PromptTokenizer,
    load_backend_tokenizer,
    load_tokenizer,
    render_chat,
)

__all__ = [
    "PAPER_CLIP_MAX",
    "QWEN25_CHAT_TEMPLATE",
    "EncodedFeatures",
    "EncodedPrompt",
    "Prompt",
    "PromptTokenizer",
    "build_messages",
    "build_prompt",
    "encode_numeric",
    "encode_table",
    "load_backend_tokenizer",
    "load_tokenizer",
    "render_chat",
]
