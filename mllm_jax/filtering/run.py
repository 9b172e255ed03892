"""One filtering run: stream tasks through the pool into a sink, with progress and reports.

This is what ``mllm-jax generate --filter`` calls between the prior and the shard writer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mllm_jax.filtering.config import FilterConfig
from mllm_jax.filtering.pool import FilterPool
from mllm_jax.filtering.report import FilterReport
from mllm_jax.filtering.result import Reason
from mllm_jax.foundation.files import atomic_write_json
from mllm_jax.foundation.tasks import Task

MAX_ERROR_SHARE = 0.01
"""Filter errors (a filter raised) beyond this share of the tasks seen fail the run."""


class FilterErrorRateError(RuntimeError):
    """Too many tasks made a filter raise: a bug, not bad tasks; the message shows the first."""


def _check_errors(errors: list[str], seen: int, final: bool) -> None:
    # Mid-stream a systematic bug shows within a few tasks; at the end, the share decides.
    limit = MAX_ERROR_SHARE * seen
    if len(errors) > max(limit, 0 if final else 2):
        raise FilterErrorRateError(
            f"{len(errors)} of {seen} tasks made a filter raise (more than "
            f"{MAX_ERROR_SHARE:.0%}); a systematic error, the first:\n{errors[0]}"
        )


def filter_into(
    source: Iterable[Any],
    sink: Callable[[Task], None],
    config: FilterConfig | None = None,
    *,
    workers: int | None = None,
    total: int | None = None,
    report_path: Path | None = None,
    log_path: Path | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    report: FilterReport | None = None,
) -> dict[str, Any]:
    """Filters ``source`` and passes every accepted (annotated) task to ``sink`` in order.

    Args:
        source: tasks or batches of tasks (see :meth:`FilterPool.imap`), consumed lazily
            so a generator produces the next batch while workers filter this one.
        sink: called with each accepted task, in input order (e.g. a shard writer's add).
        config: filter settings.
        workers: worker processes (default one per core).
        total: expected task count, for the progress bar.
        report_path: where to write the JSON report at the end (atomically).
        log_path: optional JSON-lines file, one line per task: index, decision, metrics.
        progress: show a rich progress bar on stderr.
        settings: extra fields for the report (e.g. the generate command's options).
        report: the running totals to add to (a resumed run's, or one the caller reads
            while ``sink`` runs: it has counted every task up to the one passed); default
            a fresh one.

    Returns:
        The report as plain data (see :meth:`FilterReport.to_json`), also written to
        ``report_path``.

    Raises:
        FilterErrorRateError: more than 1% of the tasks (or, before the end, more than 2
            in all) made a filter raise; the message holds the first traceback.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    config = config or FilterConfig()
    report = report if report is not None else FilterReport()
    log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115
    errors: list[str] = []
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    try:
        with bar, FilterPool(config, workers=workers) as pool:
            task_id = bar.add_task("filtering", total=total)
            for item in pool.imap(source):
                report.add(item)
                if item.result.reason == Reason.FILTER_ERROR:
                    errors.append(item.result.message or "")
                    _check_errors(errors, report.tasks_seen, final=False)
                if item.result.accepted:
                    sink(item.task)
                if log is not None:
                    log.write(json.dumps({"index": item.task.index, **item.result.to_json()}))
                    log.write("\n")
                bar.update(
                    task_id,
                    advance=1,
                    description=f"filtering (kept {report.accepted}/{report.tasks_seen})",
                )
            restarts, workers_used = pool.restarts, pool.workers
        _check_errors(errors, report.tasks_seen, final=True)
    finally:
        if log is not None:
            log.close()
    summary = report.to_json(
        worker_restarts=restarts,
        workers=workers_used,
        config=_config_json(config),
        **(settings or {}),
    )
    if report_path is not None:
        atomic_write_json(Path(report_path), summary)
    return summary


def _config_json(config: FilterConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)
