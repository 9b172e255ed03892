"""One synthetic classification task, and its byte record in a task shard.

This is the contract between the stages: the prior produces tasks, the filters annotate
them, the shard writer stores one record per task, the encoders read them back.

Record layout (little-endian), version 1::

    b"MLTK" | u8 version | u32 header_len | header (UTF-8 JSON) | array bytes

The JSON header holds the scalar metadata and, under ``"arrays"``, a list of
``[name, dtype, shape, offset, nbytes]`` entries locating each array in the bytes that
follow the header. Arrays are stored trimmed to the task's own feature count.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_MAGIC = b"MLTK"
_VERSION = 1
_PREFIX = struct.Struct("<4sBI")

FAMILIES = ("mlp", "tree")


class TaskRecordError(ValueError):
    """A task record could not be decoded (truncated, foreign or corrupt bytes)."""


@dataclass(frozen=True)
class Task:
    """One classification task with its train/test split.

    Rows ``[0, n_train)`` are the train split, the rest the test split.

    Attributes:
        X: f32[rows, n_features] feature values; categorical columns hold category codes.
        y: i32[rows] labels in ``[0, n_classes)``.
        n_classes: number of classes the task was generated with.
        n_train: rows in the train split.
        categorical: bool[n_features], True where the column is categorical.
        family: "mlp" or "tree", the SCM family that generated the task.
        seed: corpus seed the task was drawn from.
        index: index of the task within its corpus; (seed, index) identifies it.
        consensus: optional bool[rows], rows a random forest predicts correctly out of fold.
        extra: free-form JSON-serialisable metadata (filter metrics, hyperparameters).
    """

    X: np.ndarray
    y: np.ndarray
    n_classes: int
    n_train: int
    categorical: np.ndarray
    family: str
    seed: int
    index: int
    consensus: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows, n_features = np.shape(self.X)
        if np.shape(self.y) != (rows,):
            raise ValueError(
                f"task {self.index}: y has shape {np.shape(self.y)}, X has {rows} rows"
            )
        if np.shape(self.categorical) != (n_features,):
            raise ValueError(
                f"task {self.index}: categorical has shape {np.shape(self.categorical)}, "
                f"X has {n_features} features"
            )
        if not 0 < self.n_train < rows:
            raise ValueError(f"task {self.index}: n_train={self.n_train} not in (0, {rows})")
        if self.family not in FAMILIES:
            raise ValueError(f"task {self.index}: family {self.family!r} not in {FAMILIES}")
        if self.consensus is not None and np.shape(self.consensus) != (rows,):
            raise ValueError(
                f"task {self.index}: consensus has shape {np.shape(self.consensus)}, "
                f"expected ({rows},)"
            )

    @property
    def n_rows(self) -> int:
        return int(np.shape(self.X)[0])

    @property
    def n_features(self) -> int:
        return int(np.shape(self.X)[1])

    def split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Returns (X_train, y_train, X_test, y_test)."""
        t = self.n_train
        return self.X[:t], self.y[:t], self.X[t:], self.y[t:]


def encode_task(task: Task) -> bytes:
    """Serialises a task to one shard record."""
    arrays: dict[str, np.ndarray] = {
        "X": np.ascontiguousarray(task.X, dtype=np.float32),
        "y": np.ascontiguousarray(task.y, dtype=np.int32),
        "categorical": np.ascontiguousarray(task.categorical, dtype=np.bool_),
    }
    if task.consensus is not None:
        arrays["consensus"] = np.ascontiguousarray(task.consensus, dtype=np.bool_)
    entries = []
    offset = 0
    for name, arr in arrays.items():
        entries.append([name, arr.dtype.str, list(arr.shape), offset, arr.nbytes])
        offset += arr.nbytes
    header = json.dumps(
        {
            "n_classes": int(task.n_classes),
            "n_train": int(task.n_train),
            "family": task.family,
            "seed": int(task.seed),
            "index": int(task.index),
            "extra": task.extra,
            "arrays": entries,
        },
        separators=(",", ":"),
    ).encode()
    body = b"".join(arr.tobytes() for arr in arrays.values())
    return _PREFIX.pack(_MAGIC, _VERSION, len(header)) + header + body


def decode_task(record: bytes) -> Task:
    """Inverse of :func:`encode_task`; raises TaskRecordError on malformed bytes."""
    if len(record) < _PREFIX.size:
        raise TaskRecordError(f"task record too short ({len(record)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(record)
    if magic != _MAGIC:
        raise TaskRecordError(f"not a task record (magic {magic!r})")
    if version != _VERSION:
        raise TaskRecordError(f"task record version {version}, this reader knows {_VERSION}")
    start = _PREFIX.size
    try:
        header = json.loads(record[start : start + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskRecordError(f"corrupt task record header: {exc}") from exc
    body = memoryview(record)[start + header_len :]
    arrays = {}
    for name, dtype, shape, offset, nbytes in header["arrays"]:
        if offset + nbytes > len(body):
            raise TaskRecordError(f"task record truncated in array {name!r}")
        arrays[name] = np.frombuffer(body[offset : offset + nbytes], dtype=dtype).reshape(shape)
    return Task(
        X=arrays["X"],
        y=arrays["y"],
        n_classes=header["n_classes"],
        n_train=header["n_train"],
        categorical=arrays["categorical"],
        family=header["family"],
        seed=header["seed"],
        index=header["index"],
        consensus=arrays.get("consensus"),
        extra=header["extra"],
    )
