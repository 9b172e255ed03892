"""Many-shot prompts split for prefix reuse: one shared prefix, one query part per chunk.

The prompt of a chunk of test rows is exactly the training prompt (``encoding.prompt``),
in the Qwen2.5 chat template (``chat``) or as the reference's vLLM evaluation fed it
(``raw``: system + "\\n" + user, no template). Its token ids are cut in two:

    prefix  = [chat header +] system + user message up to the last training row
    query   = "\\n\\n[Test set] ... {m} rows: ... ID 0:... ID m-1:..." + output requirements
              [+ "<|im_end|>\\n<|im_start|>assistant\\n"] + '[{"id": 0, "label": '

The cut falls right after the last training label, a digit: Qwen2's pre-tokenizer
isolates digits, so ids(prefix) + ids(query) are the ids of the whole text (checked on
the first chunk of every prompt, and by the tests against the tokenizer). The prefix
depends on the shots only, so every chunk of test rows shares it byte for byte (checked
for every chunk).

The answer ``[{"id": 0, "label": L0}, {"id": 1, "label": L1}, ...]`` is laid out as
`AnswerFrame`: the tokens between two label slots are fixed, each label is one digit
token (class codes 0..9); codes of 10 and above are several digit tokens, laid out by
`mllm_jax.infer.labels` from the same frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from mllm_jax.encoding.prompt import SYSTEM_PROMPT, Style, answer_segments, user_segments
from mllm_jax.encoding.segments import Grid, Segment, Special
from mllm_jax.encoding.table import EncodedFeatures, encode_table
from mllm_jax.encoding.tokens import IM_END, IM_START, PromptTokenizer

PromptFormat = Literal["chat", "raw"]
PROMPT_FORMATS: tuple[str, ...] = ("chat", "raw")
TEST_SET_MARKER = "\n\n[Test set]"
"""Where the query part of the user message starts (right after the training rows)."""


def split_user(segments: Sequence[Segment]) -> tuple[tuple[Segment, ...], tuple[Segment, ...]]:
    """Cuts the user message at the first test-set header after a digit.

    Returns (up to and including the last training row, the rest).
    """
    for i, seg in enumerate(segments):
        if not isinstance(seg, str):
            continue
        start = 0
        while (at := seg.find(TEST_SET_MARKER, start)) >= 0:
            before = seg[:at]
            if before:
                ends_in_digit = before[-1] in "0123456789"
            else:
                ends_in_digit = i > 0 and isinstance(segments[i - 1], Grid)
            if ends_in_digit:
                head = (*segments[:i], *((before,) if before else ()))
                return head, (seg[at:], *segments[i + 1 :])
            start = at + 1
    raise ValueError("the user message has no '[Test set]' header after the training rows")


def _same_segments(a: Sequence[Segment], b: Sequence[Segment]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, Grid) and isinstance(y, Grid):
            if x.separators != y.separators or not np.array_equal(x.values, y.values):
                return False
        elif x != y:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class AnswerFrame:
    """The token layout of an answer of `rows` labels.

    Attributes:
        ids: i32[n] tokens of the answer with every label 0, up to the last label slot.
        slots: i64[rows] index in `ids` of each label token.
    """

    ids: np.ndarray
    slots: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def head(self) -> np.ndarray:
        """i32[slots[0]] '[{"id": 0, "label": ' (ends the query part)."""
        return self.ids[: self.slots[0]]

    def steps(self, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The answer after slot 0 as `rows - 1` left-padded steps of equal width.

        Step k (k = 1..rows-1) holds the label token of slot k-1 (a placeholder, filled
        with the model's own prediction), then the fixed tokens up to slot k.
        Returns (ids i32[rows-1, W], segment ids i32[rows-1, W]: 1 on real tokens).
        """
        pieces = [self.ids[a:b] for a, b in zip(self.slots[:-1], self.slots[1:], strict=True)]
        width = max((len(p) for p in pieces), default=1)
        ids = np.full((len(pieces), width), pad_id, dtype=np.int32)
        seg = np.zeros((len(pieces), width), dtype=np.int32)
        for k, piece in enumerate(pieces):
            ids[k, width - len(piece) :] = piece
            seg[k, width - len(piece) :] = 1
        return ids, seg


def answer_frame(tokenizer: PromptTokenizer, rows: int) -> AnswerFrame:
    """Token layout of ``[{"id": 0, "label": L0}, ...]`` for `rows` single-digit labels."""
    zeros = tokenizer.segment_ids(answer_segments(np.zeros(rows, dtype=np.int64)))
    ones = tokenizer.segment_ids(answer_segments(np.ones(rows, dtype=np.int64)))
    if len(zeros) != len(ones):
        raise AssertionError("a label digit is not one token")
    slots = np.flatnonzero(zeros != ones)
    if len(slots) != rows:
        raise AssertionError(f"found {len(slots)} label slots in an answer of {rows} rows")
    return AnswerFrame(zeros[: slots[-1] + 1].astype(np.int32), slots)


@dataclasses.dataclass(frozen=True)
class ChunkedPrompt:
    """Token ids of one many-shot prompt over all test rows, chunk by chunk.

    Attributes:
        prefix: i32[P] shared by every chunk.
        queries: per chunk, i32[Tq] continuing the prefix, ending with the answer head
            '[{"id": 0, "label": ' (the first label slot is next).
        rows: per chunk, the test-row range it covers.
        answer_head: tokens of the answer head at the end of every query (generation
            drops them: the model writes the answer itself).
    """

    prefix: np.ndarray
    queries: tuple[np.ndarray, ...]
    rows: tuple[range, ...]
    answer_head: int

    def full_ids(self, chunk: int) -> np.ndarray:
        """i32[P + Tq] the whole prompt of one chunk (for checks and no-reuse runs)."""
        return np.concatenate([self.prefix, self.queries[chunk]])


def _chunk_features(features: EncodedFeatures, rows: range) -> EncodedFeatures:
    sl = slice(rows.start, rows.stop)
    return dataclasses.replace(
        features,
        test=features.test[sl],
        text_test=None if features.text_test is None else features.text_test[sl],
    )


def _wrap(
    prefix_user: Sequence[Segment], query_user: Sequence[Segment], system: str, fmt: str
) -> tuple[list[Segment], list[Segment]]:
    if fmt == "raw":
        return [system + "\n", *prefix_user], list(query_user)
    head: list[Segment] = [Special(IM_START), f"system\n{system}", Special(IM_END), "\n"]
    head += [Special(IM_START), "user\n", *prefix_user]
    tail = [*query_user, Special(IM_END), "\n", Special(IM_START), "assistant\n"]
    return head, tail


def build_chunked_prompt(
    tokenizer: PromptTokenizer,
    X_shots: pd.DataFrame,
    y_codes: np.ndarray,
    X_test: pd.DataFrame,
    *,
    chunk_size: int,
    prompt_format: PromptFormat = "chat",
    style: Style = "concat",
    clip_max: int | None = None,
    pandas2_floats: bool = False,
    system_prompt: str = SYSTEM_PROMPT,
) -> ChunkedPrompt:
    """Encodes the shots and every test row, then the token ids chunk by chunk.

    Args:
        X_shots: [shots, features] training rows in prompt order.
        y_codes: i64[shots] class codes 0..K-1 (the labels printed; any K).
        X_test: [n, features] test rows; chunk c holds rows [c*chunk_size, ...).
        chunk_size: test rows per prompt (the reference used 50).
        pandas2_floats: print float columns' values as "512.0", the bytes of the
            reference's evaluation prompts (`mllm_jax.encoding.table.encode_table`).
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    features = encode_table(X_shots, X_test, clip_max=clip_max, pandas2_floats=pandas2_floats)
    n = len(X_test)
    rows = tuple(range(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size))
    frame_head = answer_frame(tokenizer, 1).head
    prefix_user: tuple[Segment, ...] | None = None
    prefix_ids = np.zeros(0, np.int32)
    queries = []
    for c, chunk_rows in enumerate(rows):
        user = user_segments(
            _chunk_features(features, chunk_rows), y_codes, style=style, max_classes=None
        )
        head_user, query_user = split_user(user)
        head, tail = _wrap(head_user, query_user, system_prompt, prompt_format)
        if prefix_user is None:
            prefix_user = head_user
            prefix_ids = tokenizer.segment_ids(head)
            whole = tokenizer.segment_ids([*head, *tail])
            query = tokenizer.segment_ids(tail)
            if not np.array_equal(np.concatenate([prefix_ids, query]), whole):
                raise AssertionError("prefix and query ids do not concatenate to the prompt's ids")
        else:
            if not _same_segments(head_user, prefix_user):
                raise AssertionError(f"chunk {c}: the prompt prefix differs from chunk 0's")
            query = tokenizer.segment_ids(tail)
        queries.append(np.concatenate([query, frame_head]).astype(np.int32))
    return ChunkedPrompt(prefix_ids.astype(np.int32), tuple(queries), rows, len(frame_head))
