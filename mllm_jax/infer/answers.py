"""Reading a freely generated answer, with the reference's fallbacks.

MachineLearningLM's evaluation (`src/evaluation/result_proc/eval_layer_3.py`, commit
ee1a5eb) reads each generated answer so:

1. `json.loads(response)`; if it parses and has as many items as the chunk has rows,
   each item's `int(item["label"])` is that row's prediction;
2. otherwise (or for an item whose label is missing or not an integer) row k takes the
   most probable label at the k-th label position of the generated text (the
   `"label": ` value token; it kept vLLM's top-10 log-probabilities there, 0 for labels
   outside them);
3. and when there is no such position, the default label.

Ours keeps those rules with three documented changes: a parsed label outside the class
set also falls back to rule 2 (the reference kept it, a certain error); rule 2 uses the
exact distribution of the label tokens at that position (we have the logits, not a
top-10 list); the default label is the most frequent class among the shots (the
reference took the most frequent label of the test rows' ground truth).

With more than 10 classes a label is several tokens and the distribution at its first
token is over first digits, not classes ("1" stands for 1 and 10-19): rule 2 is then not
applied (a row without a parsed label gets the default) and a parsed label's probability
is one-hot.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

Source = Literal["parsed", "probabilities", "default"]
_LABEL_KEY = re.compile(r'"label"\s*:\s*')


@dataclasses.dataclass(frozen=True)
class ReadAnswer:
    """One chunk's answer, read.

    labels: i64[rows] predicted class codes. proba: f64[rows, K] (the label-token
    distribution at the row's label position; one-hot where there is none).
    sources: per row, which rule gave its label.
    """

    labels: np.ndarray
    proba: np.ndarray
    sources: tuple[Source, ...]


def parse_labels(text: str, rows: int) -> list[int | None]:
    """Rule 1: the integer label of every item of a JSON array of `rows` items, None
    where the text is not such an array or an item has no integer label."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return [None] * rows
    if not isinstance(data, list) or len(data) != rows:
        return [None] * rows
    return [_item_label(item) for item in data]


def _item_label(item: Any) -> int | None:
    if not isinstance(item, dict) or "label" not in item:
        return None
    value = item["label"]
    if isinstance(value, bool):
        return None
    try:
        return int(value)  # the reference's int(): "1" -> 1, 1.0 -> 1
    except (TypeError, ValueError, OverflowError):
        return None


def label_positions(token_texts: Sequence[str]) -> list[int]:
    """Index of the value token after each `"label":` in the generated text, in order.

    token_texts: the decoded text of each generated token. The value token is the first
    token starting at or after the key's end whose text begins with a digit.
    """
    starts = np.cumsum([0, *(len(t) for t in token_texts)])[:-1]
    text = "".join(token_texts)
    out = []
    for match in _LABEL_KEY.finditer(text):
        at = int(np.searchsorted(starts, match.end()))
        while at < len(token_texts) and not token_texts[at][:1].isdigit():
            if starts[at] > match.end() + 2:  # not the value of this key
                break
            at += 1
        if at < len(token_texts) and token_texts[at][:1].isdigit():
            out.append(at)
    return out


def read_answer(
    token_texts: Sequence[str],
    label_log_probs: np.ndarray,
    rows: int,
    n_classes: int,
    default: int,
    text: str | None = None,
) -> ReadAnswer:
    """Applies the three rules to one chunk's generated answer.

    token_texts: decoded text of each generated token; label_log_probs: f32[n, K]
    label-token log-probabilities at each generated position; default: the class code
    for rows that nothing else labels; text: the whole answer decoded at once (default
    the tokens' texts joined; they differ only where a token holds part of a UTF-8 char).
    With label_log_probs over fewer tokens than n_classes (more than 10 classes), rule 2
    is skipped.
    """
    parsed = parse_labels("".join(token_texts) if text is None else text, rows)
    # One token per class only up to 10 classes (the digits); beyond, no class
    # distribution can be read at one position.
    positions = label_positions(token_texts) if label_log_probs.shape[-1] >= n_classes else []
    labels = np.zeros(rows, np.int64)
    proba = np.zeros((rows, n_classes), np.float64)
    sources: list[Source] = []
    for k in range(rows):
        distribution = None
        if k < len(positions):
            distribution = np.exp(label_log_probs[positions[k]].astype(np.float64))
            distribution /= distribution.sum()
        label = parsed[k]
        if label is not None and 0 <= label < n_classes:
            labels[k] = label
            # The slot's distribution when its token is this label (greedy: its argmax).
            written = token_texts[positions[k]] if k < len(positions) else None
            if distribution is not None and written == str(label):
                proba[k] = distribution
            else:
                proba[k, label] = 1.0
            sources.append("parsed")
        elif distribution is not None:
            labels[k] = int(np.argmax(distribution))
            proba[k] = distribution
            sources.append("probabilities")
        else:
            labels[k] = default
            proba[k, default] = 1.0
            sources.append("default")
    return ReadAnswer(labels, proba, tuple(sources))
