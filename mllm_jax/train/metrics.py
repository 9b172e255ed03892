"""Run reporting: metrics as JSON lines and a rich progress bar, from process 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mllm_jax.foundation.files import atomic_file


def is_main_process() -> bool:
    return jax.process_index() == 0


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends one JSON object per line to `path` (process 0 only).

    On resume from step `resume_step`, records of later steps (written by the run that was
    interrupted after its last checkpoint) are dropped first, so every step appears once.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = is_main_process()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._drop_after(resume_step or 0)
        self._file = self.path.open("a")

    def _drop_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        with atomic_file(self.path) as handle:
            handle.writelines(line + "\n" for line in kept)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def progress_bar(enabled: bool, console: Console | None = None) -> Progress:
    """A progress bar for the optimizer steps (disabled on processes other than 0)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and is_main_process()),
        transient=False,
    )
