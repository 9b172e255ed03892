"""How class codes are spelled in the answer, for scoring label sets beyond one token.

The answer prints class code c as ``str(c)`` (``encoding.prompt``), and Qwen2's
tokenizer isolates digits, so code 12 is the two tokens "1", "2". With more than 10
classes the label tokens of one class can be a prefix of another's ("1" of "12"), so the
first label token alone cannot tell them apart; the scorer also scores the token that
closes the label in the answer (``},`` before the next row, ``}]`` after the last):
"1" then "}," is class 1, "1", "2", "}," is class 12 (`mllm_jax.infer.spelled`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax.encoding.prompt import MAX_CLASSES, answer_segments
from mllm_jax.encoding.tokens import PromptTokenizer
from mllm_jax.infer.prompts import answer_frame

SINGLE_TOKEN_CLASSES = MAX_CLASSES
"""Label sets up to this size are spelled with one digit token per class (codes 0..9)."""


@dataclasses.dataclass(frozen=True)
class LabelSpelling:
    """The tokens of class codes 0..K-1.

    tokens: i32[K, L] the digit tokens of each code, left-aligned (padding: digit 0).
    lengths: i32[K] tokens of each code (1 for 0-9, 2 for 10-99, ...).
    """

    tokens: np.ndarray
    lengths: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])

    def right_aligned(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) i32[K, L]: each code's tokens at the end of the row, mask 1 on
        them (how a predicted label is written before the answer's next fixed tokens)."""
        tokens = np.zeros_like(self.tokens)
        mask = np.zeros_like(self.tokens)
        for c, n in enumerate(self.lengths.tolist()):
            tokens[c, self.width - n :] = self.tokens[c, :n]
            mask[c, self.width - n :] = 1
        return tokens, mask


def label_spelling(tokenizer: PromptTokenizer, n_classes: int) -> LabelSpelling:
    """The digit tokens of codes 0..n_classes-1, as the prompt's tokens spell them."""
    if n_classes < 1:
        raise ValueError(f"need at least one class, got {n_classes}")
    texts = [str(c) for c in range(n_classes)]
    width = max(len(t) for t in texts)
    tokens = np.full((n_classes, width), tokenizer.digit_ids[0], np.int32)
    for c, text in enumerate(texts):
        tokens[c, : len(text)] = tokenizer.digit_ids[[int(d) for d in text]]
    return LabelSpelling(tokens, np.array([len(t) for t in texts], np.int32))


def answer_closers(tokenizer: PromptTokenizer, rows: int) -> np.ndarray:
    """i32[rows] the token after each label of a `rows`-row answer: ``},`` before the
    next row, ``}]`` after the last (checked against the tokenizer's own answer ids)."""
    frame = answer_frame(tokenizer, rows)
    full = tokenizer.segment_ids(answer_segments(np.zeros(rows, dtype=np.int64)))
    if not np.array_equal(full[: len(frame.ids)], frame.ids) or len(full) <= frame.slots[-1] + 1:
        raise AssertionError("the answer's ids do not extend its frame")
    return full[frame.slots + 1].astype(np.int32)


def chunk_closers(tokenizer: PromptTokenizer, chunk_rows: list[int], slots: int) -> np.ndarray:
    """i32[chunks, slots] the closing token of every slot of every chunk; a chunk of n
    rows closes its slot n-1 with ``}]`` (its later slots are scored but unused)."""
    closers = answer_closers(tokenizer, slots)
    out = np.tile(closers, (len(chunk_rows), 1))
    for b, n in enumerate(chunk_rows):
        out[b, n - 1] = answer_closers(tokenizer, n)[-1]
    return out


def fixed_steps(tokenizer: PromptTokenizer, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer's fixed tokens between label slots, for labels of any length.

    Step k (k = 1..rows-1) holds the tokens after slot k-1's label up to slot k
    (``}, {"id": k, "label": ``), left-padded. Returns (ids i32[rows-1, F], segment
    ids i32[rows-1, F]: 1 on real tokens).
    """
    frame = answer_frame(tokenizer, rows)
    pieces = [frame.ids[a + 1 : b] for a, b in zip(frame.slots[:-1], frame.slots[1:], strict=True)]
    width = max((len(p) for p in pieces), default=1)
    ids = np.full((len(pieces), width), tokenizer.pad_id, dtype=np.int32)
    seg = np.zeros((len(pieces), width), dtype=np.int32)
    for k, piece in enumerate(pieces):
        ids[k, width - len(piece) :] = piece
        seg[k, width - len(piece) :] = 1
    return ids, seg
