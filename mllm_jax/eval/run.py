"""The evaluation runner: methods over a plan, one logged result at a time, resumable.

An output directory holds `run.json` (the protocol and a digest of every dataset), the log
`results.jsonl` (one line per (dataset, seed, shots, method), appended as each finishes)
and the reports written from the whole log at the end (`report.py`, `plots.py`). Running
again into the same directory skips the entries the log already holds as "ok", so an
interrupted run resumes, and new datasets, shots, seeds or methods extend it. A different
protocol, or a dataset whose content changed under the same name, is refused rather than
mixed in. A method that raises is logged as an "error" entry (retried on the next run)
unless `on_error="raise"`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mllm_jax.eval.estimator import MethodFactory
from mllm_jax.eval.metrics import check_probabilities, compute_metrics
from mllm_jax.eval.protocol import Plan, PlanEntry, Protocol, Skipped, build_plan
from mllm_jax.eval.report import write_reports
from mllm_jax.eval.results_io import append_record, read_log, repair_log, write_json
from mllm_jax.foundation.tables import Dataset

RESULTS_LOG = "results.jsonl"
RUN_FILE = "run.json"

ResultKey = tuple[str, int, int, str]  # (dataset, seed, shots, method)


class RunDirectoryError(ValueError):
    """The output directory holds results that a new run must not be mixed with."""


@dataclass
class RunSummary:
    out_dir: Path
    completed: int  # results computed by this call
    resumed: int  # results found in the log and not recomputed
    errors: list[dict[str, Any]]  # error records of this call
    skipped: tuple[Skipped, ...]
    records: list[dict[str, Any]] = field(repr=False)  # the whole log after this call


def result_key(record: Mapping[str, Any]) -> ResultKey:
    return (record["dataset"], int(record["seed"]), int(record["shots"]), record["method"])


def dataset_digest(dataset: Dataset) -> str:
    """sha1 over feature values, labels and classes: detects a changed file under one name."""
    digest = hashlib.sha1()
    digest.update(pd.util.hash_pandas_object(dataset.features, index=False).to_numpy().tobytes())
    digest.update(",".join(map(str, dataset.features.columns)).encode())
    digest.update(dataset.labels.tobytes())
    digest.update(repr(dataset.classes.tolist()).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class EntryPrediction:
    """proba: f64[n_test, K] over all dataset classes, rows in `PlanEntry.test` order;
    labels: i64[n_test] the method's own label codes where it decides them otherwise than
    by the argmax of proba (`predict_details().codes`, the LLM's reference vote), else
    None."""

    proba: np.ndarray
    shot_classes: int  # fewest classes any episode's shots held
    fit_seconds: float
    predict_seconds: float
    labels: np.ndarray | None = None


def predict_entry(
    dataset: Dataset, entry: PlanEntry, method: str, factory: MethodFactory
) -> EntryPrediction:
    """Fits a fresh classifier per episode; probabilities of every test row of the entry."""
    features = dataset.features.iloc[:, list(entry.columns)]
    proba = np.zeros((len(entry.test), dataset.n_classes), dtype=np.float64)
    labels: np.ndarray | None = None
    fit_seconds = predict_seconds = 0.0
    shot_classes: list[int] = []
    row = 0
    for episode in entry.episodes:
        shot_labels = dataset.labels[episode.train]
        model = factory(entry.seed)
        start = time.perf_counter()
        model.fit(features.iloc[episode.train].reset_index(drop=True), shot_labels)
        fit_seconds += time.perf_counter() - start
        start = time.perf_counter()
        test_rows = features.iloc[episode.test].reset_index(drop=True)
        own_labels = getattr(model, "vote", "mean") != "mean"
        if own_labels:  # the classifier decides its labels by a vote: keep them
            details = model.predict_details(test_rows)
            episode_proba = details.proba
        else:
            episode_proba = model.predict_proba(test_rows)
        predict_seconds += time.perf_counter() - start

        who = f"method {method!r} on {dataset.name} (seed {entry.seed}, {entry.shots} shots)"
        classes = np.asarray(model.classes_)
        present = np.unique(shot_labels)
        if (
            classes.ndim != 1
            or not np.all(np.isin(classes, present))
            or len(np.unique(classes)) != len(classes)
        ):
            raise ValueError(
                f"{who}: classes_ {classes.tolist()} must be distinct label codes seen in the "
                f"shots {present.tolist()}"
            )
        episode_proba = check_probabilities(episode_proba, len(episode.test), len(classes), who)
        # Classes absent from the shots keep probability 0: the method never saw them.
        proba[row : row + len(episode.test), classes.astype(np.int64)] = episode_proba
        if own_labels:
            if labels is None:
                labels = np.full(len(entry.test), -1, np.int64)
            labels[row : row + len(episode.test)] = classes.astype(np.int64)[details.codes]
        row += len(episode.test)
        shot_classes.append(len(present))
    return EntryPrediction(proba, min(shot_classes), fit_seconds, predict_seconds, labels)


def evaluate_entry(
    dataset: Dataset, entry: PlanEntry, method: str, factory: MethodFactory
) -> dict[str, Any]:
    """The log record of one (dataset, seed, shots, method): counts, metrics, timings."""
    prediction = predict_entry(dataset, entry, method, factory)
    return {
        "dataset": dataset.name,
        "seed": entry.seed,
        "shots": entry.shots,
        "method": method,
        "status": "ok",
        "shots_used": entry.shots_used,
        "n_test": len(entry.test),
        "n_classes": dataset.n_classes,
        "shot_classes": prediction.shot_classes,
        "episodes": len(entry.episodes),
        **compute_metrics(dataset.labels[entry.test], prediction.proba, prediction.labels),
        "fit_seconds": prediction.fit_seconds,
        "predict_seconds": prediction.predict_seconds,
    }


def _comparable(protocol: Any) -> Any:
    """A protocol as resuming compares it: without `max_classes`, which only decides which
    tables are planned, never a recorded number (a run resumed with a larger limit, or
    none, adds the tables skipped before; older run directories recorded 10)."""
    if not isinstance(protocol, dict):
        return protocol
    return {k: v for k, v in protocol.items() if k != "max_classes"}


def _check_run_directory(
    out_dir: Path, protocol: Protocol, datasets: Sequence[Dataset]
) -> dict[str, Any]:
    """Returns the updated run.json content; raises RunDirectoryError on a mismatch."""
    digests = {dataset.name: dataset_digest(dataset) for dataset in datasets}
    run_path = out_dir / RUN_FILE
    previous: dict[str, Any] = {}
    if run_path.exists():
        previous = json.loads(run_path.read_text(encoding="utf-8"))
        if _comparable(previous.get("protocol")) != _comparable(protocol.to_dict()):
            raise RunDirectoryError(
                f"{out_dir} holds results of another protocol ({previous.get('protocol')}); "
                f"this run uses {protocol.to_dict()}; choose a new output directory"
            )
        for name, digest in digests.items():
            old = previous.get("datasets", {}).get(name)
            if old is not None and old != digest:
                raise RunDirectoryError(
                    f"{out_dir}: dataset {name!r} differs from the one evaluated there "
                    "before (same name, other content); choose a new output directory"
                )
    elif (out_dir / RESULTS_LOG).exists():
        raise RunDirectoryError(f"{out_dir} has {RESULTS_LOG} but no {RUN_FILE}; not resuming")
    return {
        "protocol": protocol.to_dict(),
        "datasets": {**previous.get("datasets", {}), **digests},
        "skipped": previous.get("skipped", []),
    }


Outcome = tuple[PlanEntry, str, "dict[str, Any] | Exception"]


def _check_picklable(methods: Mapping[str, MethodFactory]) -> None:
    for name, factory in methods.items():
        try:
            pickle.dumps(factory)
        except Exception as error:
            raise ValueError(
                f"method {name!r} cannot run in worker processes (its factory does not "
                f"pickle: {error}); use jobs=1"
            ) from error


def _outcomes(
    pending: Sequence[tuple[PlanEntry, str]],
    by_name: Mapping[str, Dataset],
    methods: Mapping[str, MethodFactory],
    jobs: int,
) -> Iterator[Outcome]:
    """(entry, method, record or the exception it raised), in completion order."""
    if jobs <= 1:
        for entry, name in pending:
            try:
                yield (
                    entry,
                    name,
                    evaluate_entry(by_name[entry.dataset], entry, name, methods[name]),
                )
            except Exception as error:
                yield entry, name, error
        return
    # spawn, not fork: the progress bar runs a thread, and forking a threaded process can
    # deadlock the child.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(evaluate_entry, by_name[entry.dataset], entry, name, methods[name]): (
                entry,
                name,
            )
            for entry, name in pending
        }
        try:
            for future in as_completed(futures):
                entry, name = futures[future]
                try:
                    yield entry, name, future.result()
                except Exception as error:
                    yield entry, name, error
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_evaluation(
    datasets: Sequence[Dataset],
    methods: Mapping[str, MethodFactory],
    shots: Sequence[int],
    seeds: Sequence[int],
    out_dir: str | Path,
    protocol: Protocol | None = None,
    *,
    on_error: Literal["record", "raise"] = "record",
    console: Console | None = None,
    write_plots: bool = True,
    jobs: int = 1,
) -> RunSummary:
    """Runs every (entry, method) not yet in `out_dir`'s log, then writes the reports.

    jobs > 1 runs entries in that many worker processes (the factories must pickle, as the
    baselines do); results do not depend on `jobs`, only the log's line order does.
    """
    protocol = protocol or Protocol()
    console = console or Console(stderr=True)
    if jobs > 1:
        _check_picklable(methods)
    out_dir = Path(out_dir)
    plan: Plan = build_plan(datasets, shots, seeds, protocol)  # bad shots: no directory
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # these were tracebacks
        raise RunDirectoryError(f"--out {out_dir} is a file, not a directory") from None
    except OSError as error:
        reason = error.strerror or str(error)
        raise RunDirectoryError(
            f"--out {out_dir}: cannot create the directory ({reason})"
        ) from None
    run_info = _check_run_directory(out_dir, protocol, datasets)

    log_path = out_dir / RESULTS_LOG
    records, partial_tail = read_log(log_path)
    if partial_tail:
        console.print(f"[yellow]{log_path}: dropping a partial last line (interrupted write)")
        repair_log(log_path, records)
    skipped_before = {s["dataset"]: s["reason"] for s in run_info.get("skipped", [])}
    for planned in {entry.dataset for entry in plan.entries}:  # skipped before, run now
        skipped_before.pop(planned, None)
    skipped_before.update({s.dataset: s.reason for s in plan.skipped})
    run_info["skipped"] = [{"dataset": d, "reason": r} for d, r in sorted(skipped_before.items())]
    write_json(out_dir / RUN_FILE, run_info)
    for skip in plan.skipped:
        console.print(f"[yellow]skipping {skip.dataset}: {skip.reason}")

    done = {result_key(r) for r in records if r.get("status") == "ok"}
    by_name = {dataset.name: dataset for dataset in datasets}
    pending = [
        (entry, name)
        for entry in plan.entries
        for name in methods
        if (*entry.key, name) not in done
    ]
    resumed = len(plan.entries) * len(methods) - len(pending)
    if resumed:
        console.print(f"resuming: {resumed} results already in {log_path}")

    errors: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
    )
    with progress:
        task = progress.add_task("", total=len(pending))
        for entry, name, outcome in _outcomes(pending, by_name, methods, jobs):
            progress.update(
                task, description=f"{entry.dataset} seed={entry.seed} shots={entry.shots} {name}"
            )
            if isinstance(outcome, BaseException):
                record = {
                    "dataset": entry.dataset,
                    "seed": entry.seed,
                    "shots": entry.shots,
                    "method": name,
                    "status": "error",
                    "error": f"{type(outcome).__name__}: {outcome}",
                }
            else:
                record = outcome
            append_record(log_path, record)
            records.append(record)
            if record["status"] == "error":
                if on_error == "raise":
                    raise outcome
                errors.append(record)
                progress.console.print(f"[red]error: {record['error']}")
            progress.advance(task)

    write_reports(out_dir, records, run_info["skipped"], protocol, write_plots=write_plots)
    return RunSummary(
        out_dir=out_dir,
        completed=len(pending) - len(errors),
        resumed=resumed,
        errors=errors,
        skipped=plan.skipped,
        records=records,
    )
