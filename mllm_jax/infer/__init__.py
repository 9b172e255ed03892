"""Many-shot in-context learning on tables with a MachineLearningLM-style Qwen2 model.

    from mllm_jax.infer import MLLMClassifier
    clf = MLLMClassifier("path/to/model").fit(X_train, y_train)
    proba = clf.predict_proba(X_test)

The pieces: `loading` (checkpoint + tokenizer + context limit), `prompts` (the training
prompt cut into a shared prefix and per-chunk query parts), `engine` (jitted prefix
prefill, slot-by-slot label scoring, generation), `runner` (batching and padding),
`answers` (reading generated JSON with the reference's fallbacks), `classifier`.
"""

from mllm_jax.infer.answers import ReadAnswer, parse_labels, read_answer
from mllm_jax.infer.classifier import MLLMClassifier, Prediction
from mllm_jax.infer.loading import LoadedModel, ModelLoadError, clear_cache, from_model, load_model
from mllm_jax.infer.prompts import AnswerFrame, ChunkedPrompt, answer_frame, build_chunked_prompt
from mllm_jax.infer.runner import (
    ContextLengthError,
    DecodedChunk,
    RunSettings,
    decode_prompt,
    score_prompt,
)
from mllm_jax.infer.validation import EmptyColumnWarning

__all__ = [
    "AnswerFrame",
    "ChunkedPrompt",
    "ContextLengthError",
    "DecodedChunk",
    "EmptyColumnWarning",
    "LoadedModel",
    "MLLMClassifier",
    "ModelLoadError",
    "Prediction",
    "ReadAnswer",
    "RunSettings",
    "answer_frame",
    "build_chunked_prompt",
    "clear_cache",
    "decode_prompt",
    "from_model",
    "load_model",
    "parse_labels",
    "read_answer",
    "score_prompt",
]
