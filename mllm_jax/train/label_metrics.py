"""Label-only validation numbers, beside the baselines a model must beat to read its shots.

The answer-token accuracy is mostly the JSON frame. What tells in-context learning apart
is the query labels alone, scored as the classifier scores them (argmax over the label
set the shots show), next to two baselines computed from the same prompts:

- the shots' majority class (accuracy), what a model that only counts labels gets;
- the shots' class frequencies as a guess (cross-entropy, add-one smoothed).

Everything but the model's logits is fixed by the held-out batches, so the per-slot
bookkeeping (which segment, which shots, which class) is done once on the host.

These numbers are an argmax / softmax over the ten digit tokens, a distribution over
classes only where every label is one digit. A prompt that shows a label of 10 and above
(several digit tokens, more than 10 classes) is left out of them, all its label slots,
and the slots left out are counted (`label_tokens_excluded`); its labels still count in
the per-token answer numbers of `train.step.sums_metrics`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mllm_jax.encoding.tokens import TokenKind

LABEL, SHOT_LABEL = int(TokenKind.LABEL), int(TokenKind.SHOT_LABEL)
SHOT_BUCKETS = (8, 16, 32, 64, 128)
"""Lower bounds of the shot-count buckets of the curve (the last is open above)."""


def multi_token_segments(kind: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """The segment ids (prompts) of one row that show a label of several tokens: two
    label tokens in a row (the host twin of `loss.one_token_prompts`).

    kind, segment: i32[seq] token kinds and segment ids of one row. Returns i64[n].
    """
    label = (kind == LABEL) | (kind == SHOT_LABEL)
    second = label[1:] & label[:-1]
    return np.unique(segment[1:][second]).astype(np.int64)


def bucket_name(shots: int) -> str:
    """The name of the bucket `shots` falls in: '<8', '8-15', ..., '128+'."""
    if shots < SHOT_BUCKETS[0]:
        return f"<{SHOT_BUCKETS[0]}"
    for lo, hi in itertools.pairwise(SHOT_BUCKETS):
        if shots < hi:
            return f"{lo}-{hi - 1}"
    return f"{SHOT_BUCKETS[-1]}+"


@dataclass(frozen=True)
class LabelSlots:
    """The query-label slots of a stacked batch, with their prompts' shot statistics.

    Attributes:
        index: i64[n, 3] (micro, row, slot) of each label slot in the eval step's
            [micro, batch, budget] slot arrays.
        label: i64[n] candidate index (0..C-1) of the true label.
        classes: bool[n, C] the classes the slot's shots show.
        shot_counts: i64[n, C] how many shots show each class.
        shots: i64[n] shots in the slot's prompt.
        excluded: label tokens among the slots that belong to prompts with labels of
            several tokens (`multi_token_segments`), left out.
    """

    index: np.ndarray
    label: np.ndarray
    classes: np.ndarray
    shot_counts: np.ndarray
    shots: np.ndarray
    excluded: int = 0


def label_slots(
    batch: Mapping[str, np.ndarray], budget: int, candidates: tuple[int, ...]
) -> LabelSlots:
    """Finds the query-label slots of a stacked batch (arrays [micro, batch, seq]).

    Slots follow the eval step's gather: the first `budget` loss positions of each row.
    Prompts showing a label of several tokens (10 and above) are left out and their
    label tokens counted (`LabelSlots.excluded`).
    """
    table = {token: i for i, token in enumerate(candidates)}
    n_c = len(candidates)
    rows: list[tuple[int, int, int]] = []
    labels, classes, counts, shots = [], [], [], []
    excluded = 0
    for m, r in np.ndindex(*batch["loss_mask"].shape[:2]):
        mask = np.asarray(batch["loss_mask"][m, r], dtype=bool)
        kind = np.asarray(batch["token_kind"][m, r])
        targets = np.asarray(batch["targets"][m, r])
        segment = np.asarray(batch["segment_ids"][m, r])
        multi = set(multi_token_segments(kind, segment).tolist())
        slot_positions = np.flatnonzero(mask)[:budget]
        per_segment: dict[int, np.ndarray] = {}
        for slot, position in enumerate(slot_positions):
            if kind[position] != LABEL:
                continue
            seg = int(segment[position])
            if seg in multi:
                excluded += 1
                continue
            if int(targets[position]) not in table:
                continue
            if seg not in per_segment:
                shot_tokens = targets[(segment == seg) & (kind == SHOT_LABEL)]
                hist = np.zeros(n_c, dtype=np.int64)
                for token in shot_tokens:
                    if int(token) in table:
                        hist[table[int(token)]] += 1
                per_segment[seg] = hist
            hist = per_segment[seg]
            rows.append((m, r, slot))
            labels.append(table[int(targets[position])])
            classes.append(hist > 0)
            counts.append(hist)
            shots.append(int(hist.sum()))
    if not rows:
        empty = np.zeros((0, n_c), dtype=np.int64)
        return LabelSlots(
            np.zeros((0, 3), np.int64),
            np.zeros(0, np.int64),
            empty > 0,
            empty,
            np.zeros(0, np.int64),
            excluded,
        )
    return LabelSlots(
        np.asarray(rows, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        np.asarray(classes, dtype=bool),
        np.asarray(counts, dtype=np.int64),
        np.asarray(shots, dtype=np.int64),
        excluded,
    )


@dataclass(frozen=True)
class ShotSlots:
    """The shot-label slots of a stacked batch: each shot's label, to be predicted from the
    shots before it (the in-context curve).

    Attributes:
        index: i64[n, 3] (micro, row, slot) in the eval step's shot-slot arrays.
        label: i64[n] candidate index of the shot's label.
        classes: bool[n, C] the prompt's label set (all classes its shots show; the
            prompt's header lists them before the first shot).
        before: i64[n, C] how many earlier shots of the prompt show each class.
    """

    index: np.ndarray
    label: np.ndarray
    classes: np.ndarray
    before: np.ndarray


def shot_slots(
    batch: Mapping[str, np.ndarray], budget: int, candidates: tuple[int, ...]
) -> ShotSlots:
    """Finds the shot-label slots of a stacked batch (the first `budget` per row, as the
    eval step gathers them: the shot labels of prompts whose labels are all one token,
    `loss.shot_label_mask`)."""
    table = {token: i for i, token in enumerate(candidates)}
    n_c = len(candidates)
    index, labels, classes, before = [], [], [], []
    for m, r in np.ndindex(*batch["token_kind"].shape[:2]):
        kind = np.asarray(batch["token_kind"][m, r])
        targets = np.asarray(batch["targets"][m, r])
        segment = np.asarray(batch["segment_ids"][m, r])
        multi = multi_token_segments(kind, segment)
        positions = np.flatnonzero((kind == SHOT_LABEL) & ~np.isin(segment, multi))[:budget]
        seen: dict[int, np.ndarray] = {}
        shown: dict[int, np.ndarray] = {}
        for slot, position in enumerate(positions):
            token = int(targets[position])
            if token not in table:
                continue
            seg = int(segment[position])
            if seg not in seen:
                seen[seg] = np.zeros(n_c, dtype=np.int64)
                tokens = targets[(segment == seg) & (kind == SHOT_LABEL)]
                shown[seg] = np.isin(
                    np.arange(n_c), [table[int(t)] for t in tokens if int(t) in table]
                )
            index.append((m, r, slot))
            labels.append(table[token])
            classes.append(shown[seg])
            before.append(seen[seg].copy())
            seen[seg][table[token]] += 1
    n = len(index)
    return ShotSlots(
        np.asarray(index, dtype=np.int64).reshape(n, 3),
        np.asarray(labels, dtype=np.int64),
        np.asarray(classes, dtype=bool).reshape(n, n_c),
        np.asarray(before, dtype=np.int64).reshape(n, n_c),
    )


def shot_metrics(slots: ShotSlots, logits: np.ndarray) -> dict[str, object]:
    """The in-context curve from the shot-label candidate logits f32[micro, batch, budget, C]:
    `shot_by_before` = {bucket of earlier shots: {slots, label_accuracy (argmax over the
    prompt's label set), majority_accuracy (the earlier shots' majority class)}}.
    Slots with no earlier shot are left out."""
    keep = slots.before.sum(axis=1) > 0
    if not keep.any():
        return {}
    picked = np.asarray(logits, dtype=np.float64)[tuple(slots.index[keep].T)]
    label = slots.label[keep]
    hit = np.where(slots.classes[keep], picked, -np.inf).argmax(axis=1) == label
    majority = slots.before[keep].argmax(axis=1) == label
    return {"shot_by_before": _curve(slots.before[keep].sum(axis=1), hit, majority)}


def _curve(shots: np.ndarray, hit: np.ndarray, majority: np.ndarray) -> dict[str, dict[str, float]]:
    """{bucket of `shots`: {slots, label_accuracy, majority_accuracy}} in bucket order."""
    names = np.array([bucket_name(int(k)) for k in shots])
    curve: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(bucket_name(b) for b in (0, *SHOT_BUCKETS)):
        sel = names == name
        if sel.any():
            curve[name] = {
                "slots": int(sel.sum()),
                "label_accuracy": float(hit[sel].mean()),
                "majority_accuracy": float(majority[sel].mean()),
            }
    return curve


def label_metrics(slots: LabelSlots, logits: np.ndarray) -> dict[str, object]:
    """Label-only numbers from the candidate logits f32[micro, batch, budget, C].

    Returns `label_accuracy` and `label_loss` (over the classes the shots show),
    `majority_accuracy` and `prior_loss` (the shots' majority class and smoothed class
    frequencies), `label_slots`, and `by_shots`: {bucket: {slots, label_accuracy,
    majority_accuracy}}, and `label_tokens_excluded` when prompts with labels of several
    tokens were left out. No slots give an empty dict (or only that count).
    """
    n = len(slots.label)
    excluded = {"label_tokens_excluded": slots.excluded} if slots.excluded else {}
    if n == 0:
        return excluded
    picked = np.asarray(logits, dtype=np.float64)[tuple(slots.index.T)]  # [n, C]
    masked = np.where(slots.classes, picked, -np.inf)
    top = masked.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(masked - top).sum(axis=1)) + top[:, 0]
    rows = np.arange(n)
    loss = log_z - picked[rows, slots.label]
    # A label the shots never show cannot be predicted from them: infinite loss, no hit.
    shown = slots.classes[rows, slots.label]
    loss = np.where(shown, loss, np.inf)
    hit = (masked.argmax(axis=1) == slots.label) & shown
    majority = slots.shot_counts.argmax(axis=1) == slots.label
    n_classes = slots.classes.sum(axis=1)
    prior = (slots.shot_counts[rows, slots.label] + 1) / (slots.shots + n_classes)
    prior_loss = -np.log(np.where(shown, prior, 1.0 / np.maximum(slots.shots + n_classes, 1)))
    by_shots = _curve(slots.shots, hit, majority)
    finite = np.isfinite(loss)
    return {
        "label_accuracy": float(hit.mean()),
        "label_loss": float(loss[finite].mean()) if finite.any() else float("inf"),
        "majority_accuracy": float(majority.mean()),
        "prior_loss": float(prior_loss.mean()),
        "label_slots": n,
        "by_shots": by_shots,
        **excluded,
    }
