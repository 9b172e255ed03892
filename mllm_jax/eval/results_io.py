"""Files of an evaluation run: atomic writes and the append-only results log.

The log holds one JSON object per line, appended and flushed as each result finishes, so
a killed run keeps everything it completed. A kill in the middle of a write can leave a
partial last line; `read_log` reports it and `repair_log` rewrites the file without it
(atomically) before a resumed run appends again.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mllm_jax.foundation.files import atomic_write_text


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); numpy scalars -> Python; recurses into containers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Appends one JSON line and forces it to disk before returning."""
    line = json.dumps(json_safe(record), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_log(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], bool]:
    """(records, partial_tail): every complete line, and whether a partial last line exists.

    A malformed line anywhere but the end is an error naming the file and line number.
    """
    path = Path(path)
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8").split("\n")
    # A complete log ends with "\n", so the final element is "" unless a write was cut.
    tail, body = lines[-1], lines[:-1]
    records = []
    for number, line in enumerate(body, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from error
    return records, bool(tail.strip())


def repair_log(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Rewrites the log with exactly `records` (drops a partial tail)."""
    text = "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)
    atomic_write_text(path, text)
