"""Stage bookkeeping of a demo run: which stages finished, how long each took.

`<out>/stages.json` is rewritten atomically when a stage finishes, so after an interrupt
it lists exactly the stages whose outputs are complete; a rerun skips those and redoes
(or resumes) the one that was cut. Each entry records wall seconds, CPU seconds of this
process, the stage's budget and the 1-minute load average, because on a shared machine
the wall time alone says little.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from mllm_jax.eval.results_io import write_json

STAGES_FILE = "stages.json"


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its reaped child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StageBook:
    """The finished stages of one run directory, with their timings.

    Args:
        out: the run directory.
        budgets: planned seconds per stage name.
        console: where stage headers and timing lines go.
    """

    def __init__(self, out: Path, budgets: Mapping[str, float], console: Console) -> None:
        self.path = Path(out) / STAGES_FILE
        self.budgets = dict(budgets)
        self.console = console
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text())
            except json.JSONDecodeError as error:
                # Written atomically, so this is not an interrupted write of ours.
                raise ValueError(f"{self.path}: not valid JSON ({error})") from error

    def done(self, name: str) -> bool:
        return name in self.records

    def forget(self, name: str) -> None:
        """Marks a stage as not done (its inputs changed)."""
        if self.records.pop(name, None) is not None:
            write_json(self.path, self.records)

    @contextmanager
    def run(self, name: str, number: int, total: int, what: str) -> Iterator[dict[str, Any]]:
        """Times the body as stage `name`; records it when the body returns normally.

        Yields a dict the body may fill with facts worth keeping in the record.
        """
        budget = self.budgets.get(name)
        self.console.rule(f"[bold]{number}/{total} {name}[/]: {what}", align="left")
        detail: dict[str, Any] = {}
        start, cpu = time.perf_counter(), _cpu_seconds()
        yield detail
        seconds = time.perf_counter() - start
        record = {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(_cpu_seconds() - cpu, 2),
            "budget_seconds": budget,
            "load_avg_1m": load_average(),
            **detail,
        }
        self.records[name] = record
        write_json(self.path, self.records)
        self.console.print(self.timing_line(name))

    def timing_line(self, name: str) -> str:
        r = self.records[name]
        budget = r.get("budget_seconds")
        over = budget is not None and r["seconds"] > budget
        verdict = "" if budget is None else f" of {budget:.0f} s budget"
        colour = "yellow" if over else "green"
        mark = "!" if over else "✓"
        return (
            f"[{colour}]{mark}[/] {name:<9} {r['seconds']:7.1f} s{verdict}"
            f" (CPU {r['cpu_seconds']:.1f} s, load {r['load_avg_1m']})"
            + (" [yellow]over budget[/]" if over else "")
        )

    def total_seconds(self) -> float:
        return round(sum(r["seconds"] for r in self.records.values()), 2)
