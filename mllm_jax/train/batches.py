"""The batches the trainer consumes: checking them, and moving them onto the mesh.

A batch is a dict of numpy arrays, each [batch, seq_len] (`mllm_jax.encoding.pack`):
`input_ids` i32, `targets` i32 (next token within the segment), `loss_mask` bool (True
where `targets[t]` is an answer token), `segment_ids` i32 (0 = padding), `positions` i32,
and optionally `token_kind` i8 (`TokenKind` of `targets[t]`: 1 frame, 2 label, 3 shot
label; without it every answer token counts as frame).
One optimizer step consumes `grad_accum` such batches, stacked to [grad_accum, batch, seq].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllm_jax.encoding.tokens import TokenKind

REQUIRED_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
BATCH_KEYS = (*REQUIRED_KEYS, "token_kind")
SHOT_LABEL = int(TokenKind.SHOT_LABEL)
BATCH_AXES = ("data", "fsdp")


class BatchError(ValueError):
    """A batch that the trainer cannot use; the message names the array and the problem."""


class DataExhaustedError(RuntimeError):
    """A data iterator ended before its stage (or the validation set) was complete."""


@dataclass(frozen=True)
class BatchStats:
    """Token counts of one step's batches (host side, for metrics and FLOPs)."""

    tokens: int  # all slots, padding included (what the device computes)
    real_tokens: int  # slots holding a sequence
    answer_tokens: int
    attention_pairs: int  # sum over segments of n(n+1)/2: causal (query, key) pairs
    shot_labels: int = 0  # most shot-label tokens in one row

    def __add__(self, other: BatchStats) -> BatchStats:
        return BatchStats(
            self.tokens + other.tokens,
            self.real_tokens + other.real_tokens,
            self.answer_tokens + other.answer_tokens,
            self.attention_pairs + other.attention_pairs,
            max(self.shot_labels, other.shot_labels),
        )


def check_batch(
    batch: Mapping[str, Any],
    *,
    where: str,
    vocab_size: int,
    max_answer_tokens: int,
    shape: tuple[int, int] | None = None,
) -> tuple[dict[str, np.ndarray], BatchStats]:
    """Validates one batch and returns it as numpy arrays with its token counts.

    `where` names the batch in errors (e.g. "stage 'warmup' step 12"); `shape` is the
    [batch, seq_len] every batch of a run must have (a new shape would recompile).
    """
    if not isinstance(batch, Mapping):
        raise BatchError(f"{where}: expected a dict of arrays, got {type(batch).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise BatchError(f"{where}: batch lacks {missing} (has {sorted(batch)})")
    arrays = {k: np.asarray(batch[k]) for k in REQUIRED_KEYS}
    arrays["token_kind"] = (
        np.asarray(batch["token_kind"])
        if "token_kind" in batch
        else np.asarray(batch["loss_mask"]).astype(np.int8)
    )
    want = shape or arrays["input_ids"].shape
    for key, value in arrays.items():
        if value.ndim != 2 or value.shape != tuple(want):
            raise BatchError(
                f"{where}: {key} has shape {value.shape}, expected [batch, seq_len] = {tuple(want)}"
            )
        if key == "loss_mask":
            if value.dtype != bool and not np.issubdtype(value.dtype, np.integer):
                raise BatchError(f"{where}: loss_mask has dtype {value.dtype}, expected bool")
        elif not np.issubdtype(value.dtype, np.integer):
            raise BatchError(f"{where}: {key} has dtype {value.dtype}, expected int32")
    kind = arrays["token_kind"]
    if kind.size and (kind.min() < 0 or kind.max() > SHOT_LABEL):
        raise BatchError(f"{where}: token_kind holds values outside 0..{SHOT_LABEL}")
    for key in ("input_ids", "targets"):
        ids = arrays[key]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise BatchError(f"{where}: {key} holds token id {bad}, outside [0, {vocab_size})")
    mask = arrays["loss_mask"].astype(bool)
    segments = arrays["segment_ids"]
    if (mask & (segments == 0)).any():
        raise BatchError(f"{where}: loss_mask is True on padding (segment_ids == 0)")
    per_row = mask.sum(axis=1)
    if per_row.max(initial=0) > max_answer_tokens:
        row = int(np.argmax(per_row))
        raise BatchError(
            f"{where}: row {row} has {int(per_row[row])} answer tokens, more than "
            f"max_answer_tokens={max_answer_tokens}; raise max_answer_tokens in the config"
        )
    out = {
        k: v.astype(bool if k == "loss_mask" else np.int32, copy=False) for k, v in arrays.items()
    }
    return out, BatchStats(
        tokens=int(mask.size),
        real_tokens=int((segments > 0).sum()),
        answer_tokens=int(per_row.sum()),
        attention_pairs=_attention_pairs(segments),
        shot_labels=int((kind == SHOT_LABEL).sum(axis=1).max(initial=0)),
    )


def _attention_pairs(segment_ids: np.ndarray) -> int:
    """Sum over the segments of every row of n(n+1)/2 (a segment = a run of one id > 0)."""
    total = 0
    for row in segment_ids:
        change = np.flatnonzero(np.diff(row)) + 1
        bounds = np.concatenate([[0], change, [len(row)]])
        lengths = np.diff(bounds)
        real = row[bounds[:-1]] > 0
        n = lengths[real].astype(np.int64)
        total += int(np.sum(n * (n + 1) // 2))
    return total


def next_batches(
    iterator: Iterator[Mapping[str, Any]],
    count: int,
    *,
    where: str,
    vocab_size: int,
    max_answer_tokens: int,
    shape: tuple[int, int] | None,
) -> tuple[dict[str, np.ndarray], BatchStats]:
    """Pulls `count` batches and stacks them: each array [count, batch, seq_len]."""
    parts, stats = [], None
    for micro in range(count):
        label = where if count == 1 else f"{where} micro-batch {micro}"
        try:
            raw = next(iterator)
        except StopIteration:
            raise DataExhaustedError(
                f"{where}: the data iterator ended (after micro-batch {micro} of {count})"
            ) from None
        arrays, s = check_batch(
            raw,
            where=label,
            vocab_size=vocab_size,
            max_answer_tokens=max_answer_tokens,
            shape=shape,
        )
        shape = arrays["input_ids"].shape
        parts.append(arrays)
        stats = s if stats is None else stats + s
    stacked = {k: np.stack([p[k] for p in parts]) for k in BATCH_KEYS}
    return stacked, stats


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[micro, batch, seq] arrays: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def check_divisible(batch_size: int, mesh: Mesh, where: str) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise BatchError(
            f"{where}: batch size {batch_size} per process is not divisible by the mesh's "
            f"data x fsdp = {ways} devices"
        )


def to_device(stacked: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's stacked batch -> global arrays sharded by `batch_sharding`."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in stacked.items()
    }
