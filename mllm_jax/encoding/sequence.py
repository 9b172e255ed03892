"""A task -> one training sequence: rows drawn, numbers encoded, prompt, ids, loss mask."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mllm_jax.encoding.prompt import SYSTEM_PROMPT, Prompt, answer_segments, user_segments
from mllm_jax.encoding.sampling import (
    OverBudgetError,
    SamplingConfig,
    TaskEncodingError,
    select_rows,
)
from mllm_jax.encoding.segments import Grid
from mllm_jax.encoding.table import numeric_features
from mllm_jax.encoding.tokens import EncodedPrompt, PromptTokenizer
from mllm_jax.foundation.tasks import Task


@dataclass(frozen=True)
class TrainingSequence:
    """One encoded training sequence.

    Attributes:
        ids: i32[length] token ids of the full chat (system, user, answer).
        answer_mask: bool[length], True on the answer tokens and the closing
            ``<|im_end|>`` (the tokens the loss is computed on).
        n_shots: training rows shown.
        n_queries: rows answered.
        token_kind: i8[length] ``tokens.TokenKind`` of every token (frame, label, shot
            label); None for sequences built without it.
    """

    ids: np.ndarray
    answer_mask: np.ndarray
    n_shots: int
    n_queries: int
    token_kind: np.ndarray | None = None


def task_prompt(
    task: Task, shots: np.ndarray, queries: np.ndarray, config: SamplingConfig
) -> Prompt:
    """The prompt showing ``shots`` (labelled) and asking for ``queries`` of a task.

    Column statistics come from the shots: the queries are encoded with them.
    """
    X = np.asarray(task.X)
    y = np.asarray(task.y, dtype=np.int64)
    features = numeric_features(X[shots], X[queries], clip_max=config.clip_max)
    user = user_segments(features, y[shots], max_classes=config.max_classes)
    return Prompt(SYSTEM_PROMPT, user, answer_segments(y[queries]))


class TaskSequenceEncoder:
    """Turns a task into one training sequence that fits the token budget.

    Draws shots and queries (``sampling.select_rows``), encodes, tokenizes with the fast
    path; when the sequence is over budget, drops shots from the end (estimating how many
    from the row lengths, then re-encoding, since the statistics change) down to
    ``min_shots``, then halves the queries. Over budget with one query:
    :class:`OverBudgetError`.
    """

    def __init__(self, tokenizer: PromptTokenizer, config: SamplingConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    def fit_to_budget(
        self, task: Task, shots: np.ndarray, queries: np.ndarray
    ) -> tuple[EncodedPrompt, int, int]:
        """Encodes with the longest prefix of ``shots`` that fits, and if even ``min_shots``
        do not, with fewer queries; returns (ids, n_shots, n_queries)."""
        while True:
            try:
                encoded, n_shots = self._fit_shots(task, shots, queries)
                return encoded, n_shots, len(queries)
            except OverBudgetError:
                if len(queries) == 1:
                    raise
                queries = queries[: len(queries) // 2]

    def _fit_shots(
        self, task: Task, shots: np.ndarray, queries: np.ndarray
    ) -> tuple[EncodedPrompt, int]:
        budget = self.config.token_budget
        floor = min(self.config.min_shots, len(shots))
        n_shots = len(shots)
        while True:
            try:
                prompt = task_prompt(task, shots[:n_shots], queries, self.config)
            except ValueError as exc:  # too many classes, infinite values, ...
                hint = ""
                if "classes in the training rows" in str(exc):
                    hint = " (raise the pipeline's sampling.max_classes to train on them)"
                raise TaskEncodingError(
                    f"task (seed={task.seed}, index={task.index}): {exc}{hint}"
                ) from exc
            encoded = self.tokenizer.encode(prompt)
            over = len(encoded) - budget
            if over <= 0:
                return encoded, n_shots
            if n_shots <= floor:
                raise OverBudgetError(
                    f"task (seed={task.seed}, index={task.index}) needs {len(encoded)} tokens "
                    f"with {n_shots} shots, {len(queries)} queries and {task.n_features} "
                    f"features, over the token budget of {budget}"
                )
            train_grid = next(s for s in prompt.user if isinstance(s, Grid))
            row_lengths = self.tokenizer.grid_row_lengths(train_grid)[::-1]
            drop = int(np.searchsorted(np.cumsum(row_lengths), over)) + 1
            n_shots = max(floor, n_shots - drop)

    def __call__(self, task: Task, rng: np.random.Generator) -> TrainingSequence:
        shots, queries = select_rows(task, rng, self.config)
        if self.config.permute_labels:
            y = np.asarray(task.y)
            order = rng.permutation(max(int(task.n_classes), int(y.max(initial=0)) + 1))
            task = dataclasses.replace(task, y=order[y].astype(y.dtype))
        encoded, n_shots, n_queries = self.fit_to_budget(task, shots, queries)
        return TrainingSequence(
            encoded.ids, encoded.answer_mask, n_shots, n_queries, encoded.token_kind
        )
