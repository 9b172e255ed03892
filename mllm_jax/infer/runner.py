"""The host side of inference: batches chunks, pads to shape buckets, calls the engine.

Shapes are rounded up (prefixes to multiples of 512 tokens per prefill call, query parts
to multiples of 256, or to a power of two from 32 when shorter, as one test row per prompt
is, the batch to `batch_size` rows by repeating a chunk) so that a run over many tables
compiles a handful of programs instead of one per table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from mllm_jax.infer.engine import MAX_LABELS, decode_chunks, prefix_cache, score_chunks
from mllm_jax.infer.labels import SINGLE_TOKEN_CLASSES, chunk_closers, fixed_steps, label_spelling
from mllm_jax.infer.loading import LoadedModel
from mllm_jax.infer.prompts import AnswerFrame, ChunkedPrompt, answer_frame
from mllm_jax.infer.spelled import score_chunks_spelled
from mllm_jax.model import KVCache

PREFIX_BUCKET = 512
QUERY_BUCKET = 256
"""Prefixes and query parts are padded to multiples of these many tokens per model call."""
SHORT_QUERY_MIN = 32
"""Query parts shorter than QUERY_BUCKET are padded to a power of two of at least this."""

Progress = Callable[[int], None]
"""Called with the number of test rows just finished."""

QueryArrays = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]
"""(ids, positions, segments) i32[batch, width] of left-padded token rows."""


class ContextLengthError(ValueError):
    """A prompt longer than the model's context window."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How to run a prompt on the device.

    batch_size: chunks of test rows per model call. prefill_chunk: prompt tokens per
    model call while prefilling (bounds activation memory). reuse_prefix: False runs
    the whole prompt for every chunk (the reference's way; for the benchmark).
    """

    batch_size: int = 4
    prefill_chunk: int = 2048
    reuse_prefix: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclasses.dataclass(frozen=True)
class DecodedChunk:
    """One chunk's free-generation answer.

    tokens: i32[n] generated ids, end-of-sequence token excluded. label_log_probs:
    f32[n, K] log-probabilities of the K label tokens at each generated position.
    ended: the model closed its answer (end-of-sequence) within the token budget.
    """

    tokens: np.ndarray
    label_log_probs: np.ndarray
    ended: bool


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def plan_calls(tokens: int, max_chunk: int, bucket: int) -> tuple[int, int]:
    """(chunk, width): `tokens` run in the fewest calls of at most ~max_chunk tokens,
    each call a multiple of `bucket` (so padding stays under one bucket per call and
    similar lengths share a compilation); width = calls x chunk."""
    calls = -(-tokens // max_chunk)
    chunk = _round_up(-(-tokens // calls), bucket)
    return chunk, calls * chunk


def check_context(loaded: LoadedModel, needed: int, what: str) -> None:
    """Raises ContextLengthError when `needed` positions exceed the model's limit."""
    limit = loaded.context_limit
    if needed > limit:
        scaling = loaded.config.rope_scaling
        hint = (
            "use fewer shots or fewer test rows per chunk"
            if scaling is not None
            else "use fewer shots or fewer test rows per chunk, or switch YaRN rope scaling on "
            "(yarn_factor=4, as the reference served MachineLearningLM-7B-v1 at 131,072)"
        )
        raise ContextLengthError(
            f"{what} needs {needed:,} tokens, over the model's context limit of {limit:,} "
            f"positions ({loaded.source}); {hint}"
        )


def _left_pad(rows: Sequence[np.ndarray], width: int, start: int, pad_id: int) -> QueryArrays:
    """(ids, positions, segments) i32[len(rows), width]; positions of real tokens start
    at `start`."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    positions = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        n = len(row)
        ids[r, width - n :] = row
        positions[r, width - n :] = start + np.arange(n)
        segments[r, width - n :] = 1
    return jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segments)


def query_bucket(longest: int) -> int:
    """The padding step of a batch of query parts whose longest has `longest` tokens:
    QUERY_BUCKET, or the next power of two (>= SHORT_QUERY_MIN) below it, so that a
    one-row query part (~60 tokens) is not padded to 256."""
    if longest >= QUERY_BUCKET:
        return QUERY_BUCKET
    return max(SHORT_QUERY_MIN, 1 << (max(longest, 1) - 1).bit_length())


def prompt_prefix_cache(loaded: LoadedModel, prefix: np.ndarray, max_chunk: int) -> KVCache:
    """The prefix in a batch-1 cache, left-padded to whole calls (`plan_calls`)."""
    chunk, width = plan_calls(len(prefix), max_chunk, PREFIX_BUCKET)
    ids, positions, segments = _left_pad([prefix], width, 0, loaded.prompt_tokenizer.pad_id)
    return prefix_cache(loaded.graphdef, loaded.state, ids, positions, segments, chunk=chunk)


def _batches(prompt: ChunkedPrompt, batch_size: int) -> list[list[int]]:
    order = list(range(len(prompt.queries)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _queries(
    loaded: LoadedModel,
    prompt: ChunkedPrompt,
    chunks: list[int],
    settings: RunSettings,
    prefix: KVCache | None,
    drop_tail: int = 0,
) -> tuple[int, QueryArrays]:
    """(tokens per model call, (ids, positions, segments) i32[batch_size, width]) of a
    batch of query parts, left-padded (whole prompts when the prefix is not reused)."""
    rows = [prompt.queries[c][: len(prompt.queries[c]) - drop_tail] for c in chunks]
    if prefix is None:
        rows = [np.concatenate([prompt.prefix, r]) for r in rows]
    rows += [rows[0]] * (settings.batch_size - len(rows))  # fixed batch shape
    longest = max(len(r) for r in rows)
    chunk, width = plan_calls(longest, settings.prefill_chunk, query_bucket(longest))
    start = 0 if prefix is None else len(prompt.prefix)
    return chunk, _left_pad(rows, width, start, loaded.prompt_tokenizer.pad_id)


def _label_tokens(loaded: LoadedModel) -> jnp.ndarray:
    return jnp.asarray(loaded.prompt_tokenizer.digit_ids[:MAX_LABELS], jnp.int32)


def _reused_prefix(
    loaded: LoadedModel, prompt: ChunkedPrompt, settings: RunSettings
) -> KVCache | None:
    """The prompt's prefix cache, or None when `settings` runs whole prompts per chunk."""
    if not settings.reuse_prefix:
        return None
    return prompt_prefix_cache(loaded, prompt.prefix, settings.prefill_chunk)


ChunkScorer = Callable[[KVCache | None, list[int], int, QueryArrays], jnp.ndarray]
"""Scores one batch of chunks: (prefix cache or None, the chunks' indices, tokens per model
call, their query parts' (ids, positions, segments)) -> f32[batch_size, R, >= n_classes]
label log-probabilities at each chunk's answer slots."""


def _score_batches(
    loaded: LoadedModel,
    prompt: ChunkedPrompt,
    n_classes: int,
    settings: RunSettings,
    progress: Progress | None,
    answer: int,
    score: ChunkScorer,
) -> np.ndarray:
    """The loop both label scorings share: checks that a chunk's prompt plus `answer`
    tokens fits the context, caches the prefix once, runs `score` on each batch of
    chunks and gathers the rows. Returns f32[n_test, n_classes]."""
    longest = max(len(q) for q in prompt.queries)
    check_context(loaded, len(prompt.prefix) + longest + answer, "the prompt of a chunk")
    prefix = _reused_prefix(loaded, prompt, settings)
    out = np.zeros((prompt.rows[-1].stop, n_classes), np.float32)
    for chunks in _batches(prompt, settings.batch_size):
        chunk, queries = _queries(loaded, prompt, chunks, settings, prefix)
        log_probs = np.asarray(score(prefix, chunks, chunk, queries))
        for b, c in enumerate(chunks):
            rows = prompt.rows[c]
            out[rows.start : rows.stop] = log_probs[b, : len(rows), :n_classes]
            if progress is not None:
                progress(len(rows))
    return out


def score_prompt(
    loaded: LoadedModel,
    prompt: ChunkedPrompt,
    n_classes: int,
    settings: RunSettings = RunSettings(),
    progress: Progress | None = None,
) -> np.ndarray:
    """Label log-probabilities of every test row, slot by slot.

    Up to 10 classes each label is one digit token: the distribution of the label token
    restricted to the K label tokens (`engine.score_chunks`). More classes are spelled
    with several tokens: each class's whole spelling and the token closing the label are
    scored, then normalised over the classes (`spelled.score_chunks_spelled`).

    Returns f32[n_test, n_classes].
    """
    if n_classes < 1:
        raise ValueError(f"label scoring needs at least 1 class, got {n_classes}")
    if n_classes > SINGLE_TOKEN_CLASSES:
        return _score_spelled(loaded, prompt, n_classes, settings, progress)
    frame: AnswerFrame = answer_frame(
        loaded.prompt_tokenizer, max(len(rows) for rows in prompt.rows)
    )
    step_ids, step_segments = frame.steps(loaded.prompt_tokenizer.pad_id)
    answer = len(frame.ids) - len(frame.head) + 1
    label_tokens = _label_tokens(loaded)

    def score(
        prefix: KVCache | None, chunks: list[int], chunk: int, queries: QueryArrays
    ) -> jnp.ndarray:
        return score_chunks(
            loaded.graphdef,
            loaded.state,
            prefix,
            *queries,
            jnp.asarray(step_ids),
            jnp.asarray(step_segments),
            label_tokens,
            jnp.int32(n_classes),
            chunk=chunk,
        )

    return _score_batches(loaded, prompt, n_classes, settings, progress, answer, score)


def _score_spelled(
    loaded: LoadedModel,
    prompt: ChunkedPrompt,
    n_classes: int,
    settings: RunSettings,
    progress: Progress | None,
) -> np.ndarray:
    """`score_prompt` for labels spelled with several tokens: f32[n_test, n_classes]."""
    tok = loaded.prompt_tokenizer
    rows = max(len(r) for r in prompt.rows)
    spelling = label_spelling(tok, n_classes)
    right_spell, right_mask = spelling.right_aligned()
    fixed_ids, fixed_segments = fixed_steps(tok, rows)
    answer = (rows - 1) * (spelling.width + fixed_ids.shape[1]) + spelling.width + 1

    def score(
        prefix: KVCache | None, chunks: list[int], chunk: int, queries: QueryArrays
    ) -> jnp.ndarray:
        sizes = [len(prompt.rows[c]) for c in chunks]
        sizes += [sizes[0]] * (settings.batch_size - len(sizes))  # the repeated padding chunk
        return score_chunks_spelled(
            loaded.graphdef,
            loaded.state,
            prefix,
            *queries,
            jnp.asarray(fixed_ids),
            jnp.asarray(fixed_segments),
            jnp.asarray(spelling.tokens),
            jnp.asarray(spelling.lengths),
            jnp.asarray(right_spell),
            jnp.asarray(right_mask),
            jnp.asarray(chunk_closers(tok, sizes, rows)),
            chunk=chunk,
        )

    return _score_batches(loaded, prompt, n_classes, settings, progress, answer, score)


def decode_prompt(
    loaded: LoadedModel,
    prompt: ChunkedPrompt,
    n_classes: int,
    max_new_tokens: int,
    settings: RunSettings = RunSettings(),
    progress: Progress | None = None,
) -> list[DecodedChunk]:
    """Greedy free generation of every chunk's answer (one `DecodedChunk` per chunk).

    Each chunk keeps the label-token log-probabilities at every generated position over
    the first min(n_classes, 10) digit tokens: with more than 10 classes a label has
    several tokens and those are first-digit distributions, not class distributions
    (`answers.read_answer` then does not read classes from them).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n_digits = min(n_classes, MAX_LABELS)
    longest = max(len(q) for q in prompt.queries) - prompt.answer_head
    check_context(
        loaded, len(prompt.prefix) + longest + max_new_tokens, "the prompt of a chunk + answer"
    )
    prefix = _reused_prefix(loaded, prompt, settings)
    label_tokens = _label_tokens(loaded)
    tok = loaded.prompt_tokenizer
    out: list[DecodedChunk | None] = [None] * len(prompt.queries)
    for chunks in _batches(prompt, settings.batch_size):
        chunk, (ids, positions, segments) = _queries(
            loaded, prompt, chunks, settings, prefix, drop_tail=prompt.answer_head
        )
        tokens, lengths, label_lp = decode_chunks(
            loaded.graphdef,
            loaded.state,
            prefix,
            ids,
            positions,
            segments,
            jnp.asarray(loaded.eos_ids),
            jnp.int32(tok.pad_id),
            label_tokens,
            jnp.int32(n_digits),
            chunk=chunk,
            max_new_tokens=max_new_tokens,
        )
        tokens, lengths, label_lp = np.asarray(tokens), np.asarray(lengths), np.asarray(label_lp)
        for b, c in enumerate(chunks):
            n = int(lengths[b])
            ended = bool(np.isin(tokens[b, n - 1], loaded.eos_ids))
            keep = n - 1 if ended else n
            out[c] = DecodedChunk(tokens[b, :keep], label_lp[b, :keep, :n_digits], ended)
            if progress is not None:
                progress(len(prompt.rows[c]))
    return [chunk for chunk in out if chunk is not None]
