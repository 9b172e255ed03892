"""Tables -> prompts -> token ids: the number encoding, the MachineLearningLM prompt format,
the Qwen2.5 tokenizer with a fast id assembler, and sequence packing."""

from mllm_jax.encoding.prompt import Prompt, build_messages, build_prompt

__all__ = ["Prompt", "build_messages", "build_prompt"]
