"""Packing variable-length sequences into fixed-length training rows.

The training batch format (what the trainer consumes), a dict of numpy arrays, each
``[batch, seq_len]``:

- ``input_ids`` i32: token ids; padding holds the pad id (``<|endoftext|>``).
- ``targets`` i32: the next token within the same segment; the pad id where there is
  none (a segment's last token, padding).
- ``loss_mask`` bool: True where ``targets[t]`` is an answer token (the JSON answer and
  its closing ``<|im_end|>``).
- ``token_kind`` i32: the ``tokens.TokenKind`` of ``targets[t]`` (0 prompt or padding,
  1 answer frame, 2 answer label, 3 shot label), for label-only losses and metrics.
- ``segment_ids`` i32: 1, 2, ... per packed sequence in the row, 0 on padding.
- ``positions`` i32: 0, 1, ... restarting in every segment (0 on padding).

Sequences are placed first-fit into a window of ``num_packing_bins`` open rows (grain's
``FirstFitPackIterDataset``); a sequence is never split, and one longer than ``seq_len``
is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grain
import numpy as np

from mllm_jax.encoding.sequence import TrainingSequence

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "token_kind", "segment_ids", "positions")
_PACKED = ("input_ids", "targets", "loss_mask", "token_kind")


def sequence_features(sequence: TrainingSequence, pad_id: int) -> dict[str, np.ndarray]:
    """The per-sequence arrays that get packed.

    Returns:
        ``input_ids`` i32[length], ``targets`` i32[length] (input shifted left by one, the
        last entry ``pad_id``), ``loss_mask`` bool[length] (the answer mask shifted left),
        ``token_kind`` i8[length] (the token kinds shifted left; from the answer mask when
        the sequence has none).
    """
    ids = np.asarray(sequence.ids, dtype=np.int32)
    targets = np.empty_like(ids)
    targets[:-1] = ids[1:]
    targets[-1] = pad_id
    loss_mask = np.zeros(len(ids), dtype=bool)
    loss_mask[:-1] = np.asarray(sequence.answer_mask, dtype=bool)[1:]
    kind = sequence.token_kind
    if kind is None:
        kind = np.asarray(sequence.answer_mask, dtype=np.int8)
    token_kind = np.zeros(len(ids), dtype=np.int8)
    token_kind[:-1] = np.asarray(kind, dtype=np.int8)[1:]
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "token_kind": token_kind}


class _ToTrainingRow:
    """grain's packed element -> the training row format (picklable for workers)."""

    def __call__(self, packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "input_ids": packed["input_ids"].astype(np.int32, copy=False),
            "targets": packed["targets"].astype(np.int32, copy=False),
            "loss_mask": packed["loss_mask"].astype(bool, copy=False),
            "token_kind": packed["token_kind"].astype(np.int32, copy=False),
            "segment_ids": packed["input_ids_segment_ids"].astype(np.int32, copy=False),
            "positions": packed["input_ids_positions"].astype(np.int32, copy=False),
        }


def pack_dataset(
    sequences: grain.IterDataset,
    *,
    seq_len: int,
    pad_id: int,
    num_packing_bins: int = 8,
    seed: int = 0,
) -> grain.IterDataset:
    """Packs a dataset of :func:`sequence_features` dicts into rows of ``seq_len``.

    Args:
        sequences: elements with ``input_ids``, ``targets``, ``loss_mask`` of equal length.
        seq_len: row length in tokens.
        pad_id: the id written on padding for ``input_ids`` and ``targets``.
        num_packing_bins: rows filled at once; more bins pack tighter but hold more memory.
        seed: shuffles the order in which finished rows leave a window.

    Returns:
        A dataset of rows in the training format (each array [seq_len]).
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        sequences,
        length_struct=dict.fromkeys(_PACKED, seq_len),
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=True,
        padding_struct={
            "input_ids": pad_id,
            "targets": pad_id,
            "loss_mask": False,
            "token_kind": 0,
        },
    )
    return packed.map(_ToTrainingRow())


class _PadToRow:
    """One sequence -> one training row of ``seq_len`` (no packing; picklable)."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __call__(self, element: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(element["input_ids"])
        if n > self.seq_len:
            raise ValueError(f"a sequence of {n} tokens does not fit a row of {self.seq_len}")
        row = {
            "input_ids": np.full(self.seq_len, self.pad_id, np.int32),
            "targets": np.full(self.seq_len, self.pad_id, np.int32),
            "loss_mask": np.zeros(self.seq_len, bool),
            "token_kind": np.zeros(self.seq_len, np.int32),
            "segment_ids": np.zeros(self.seq_len, np.int32),
            "positions": np.zeros(self.seq_len, np.int32),
        }
        for key in _PACKED:
            row[key][:n] = element[key]
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n, dtype=np.int32)
        return row


def pad_dataset(sequences: grain.IterDataset, *, seq_len: int, pad_id: int) -> grain.IterDataset:
    """One sequence per row of ``seq_len`` (the reference trains this way: no packing)."""
    return sequences.map(_PadToRow(seq_len, pad_id))


def pack_sequences(
    sequences: Iterable[TrainingSequence],
    *,
    seq_len: int,
    pad_id: int,
    num_packing_bins: int = 8,
) -> dict[str, np.ndarray]:
    """Packs a finite list of sequences at once (for tests and offline use).

    Returns:
        The training format with a leading rows axis: each array [rows, seq_len].
    """
    features = [sequence_features(s, pad_id) for s in sequences]
    if not features:
        raise ValueError("no sequences to pack")
    dataset = grain.MapDataset.source(features).to_iter_dataset()
    rows = list(
        pack_dataset(dataset, seq_len=seq_len, pad_id=pad_id, num_packing_bins=num_packing_bins)
    )
    return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
    """Fraction of the batch's token slots holding a sequence (not padding)."""
    segment_ids = np.asarray(batch["segment_ids"])
    return float((segment_ids > 0).mean())
