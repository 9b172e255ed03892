"""Running totals of a filtering run, written as the JSON report of `generate --filter`."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mllm_jax.filtering.pool import FilteredTask


@dataclass
class FilterReport:
    """Counts over the tasks seen so far; ``add`` each :class:`FilteredTask` in turn.

    Attributes:
        tasks_seen / accepted: task counts.
        rejected_by_reason: rejection count per :class:`Reason` value.
        rows_accepted: rows (train + test) of the accepted tasks.
        consensus_rows_kept / consensus_rows_total: rows kept by consensus, out of the rows
            of accepted tasks that have a mask.
        filter_seconds / filter_cpu_seconds: wall / CPU time the workers spent filtering,
            summed over tasks.
        retried_tasks: tasks resubmitted after a worker crash.
        started: ``time.perf_counter()`` at creation, for throughput.
    """

    tasks_seen: int = 0
    accepted: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    rows_accepted: int = 0
    consensus_rows_kept: int = 0
    consensus_rows_total: int = 0
    filter_seconds: float = 0.0
    filter_cpu_seconds: float = 0.0
    retried_tasks: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, item: FilteredTask) -> None:
        result = item.result
        self.tasks_seen += 1
        self.filter_seconds += result.seconds
        self.filter_cpu_seconds += result.cpu_seconds
        self.retried_tasks += item.attempts > 1
        if not result.accepted:
            self.rejected_by_reason[str(result.reason)] += 1
            return
        self.accepted += 1
        self.rows_accepted += item.task.n_rows
        if result.consensus is not None:
            self.consensus_rows_kept += int(result.consensus.sum())
            self.consensus_rows_total += int(result.consensus.size)

    def snapshot(self) -> dict[str, Any]:
        """The counts as plain data, for a journal that a resumed run continues from."""
        return {
            "tasks_seen": self.tasks_seen,
            "accepted": self.accepted,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "rows_accepted": self.rows_accepted,
            "consensus_rows_kept": self.consensus_rows_kept,
            "consensus_rows_total": self.consensus_rows_total,
            "filter_seconds": self.filter_seconds,
            "filter_cpu_seconds": self.filter_cpu_seconds,
            "retried_tasks": self.retried_tasks,
        }

    @classmethod
    def from_snapshot(cls, counts: dict[str, Any]) -> FilterReport:
        """A report that goes on counting from :meth:`snapshot`'s counts (timer restarted)."""
        return cls(
            **{**counts, "rejected_by_reason": Counter(counts.get("rejected_by_reason", {}))}
        )

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The report as plain data; ``extra`` (settings, restarts) is appended."""
        wall = time.perf_counter() - self.started
        return {
            "tasks_seen": self.tasks_seen,
            "accepted": self.accepted,
            "rejected": self.tasks_seen - self.accepted,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "acceptance_rate": self.accepted / self.tasks_seen if self.tasks_seen else None,
            "rows_accepted": self.rows_accepted,
            "consensus_rows_kept": self.consensus_rows_kept,
            "consensus_rows_total": self.consensus_rows_total,
            "consensus_keep_rate": (
                self.consensus_rows_kept / self.consensus_rows_total
                if self.consensus_rows_total
                else None
            ),
            "retried_tasks": self.retried_tasks,
            "filter_seconds": round(self.filter_seconds, 3),
            "filter_cpu_seconds": round(self.filter_cpu_seconds, 3),
            "wall_seconds": round(wall, 3),
            "tasks_per_second": self.tasks_seen / wall if wall > 0 else None,
            **extra,
        }
