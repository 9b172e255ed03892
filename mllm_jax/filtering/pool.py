"""A crash-safe pool of filter processes that streams alongside the task generator.

The caller's thread pulls tasks from the generator and submits them; worker processes
(one per core, one thread each) filter them; results come back in submission order.
While the workers filter batch k, pulling the next task makes the generator produce
batch k+1, so generation and filtering overlap with at most ``max_in_flight`` tasks
buffered.

A worker that dies (killed, out of memory, a crash in native code) breaks a
``ProcessPoolExecutor``: every unfinished future fails with ``BrokenProcessPool``. The
pool then starts a fresh executor and resubmits exactly the unfinished tasks, tracked by
their position in the stream, so nothing is lost and nothing is yielded twice. Tasks that
may have been running when a worker died are re-run one at a time, so a task that kills
its worker every time is found and rejected (``worker_crashed``) without blaming others.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from mllm_jax.filtering.config import FilterConfig
from mllm_jax.filtering.result import FilterResult, Problem, Reason
from mllm_jax.filtering.task_filter import annotate, apply_filters
from mllm_jax.foundation.processes import exit_with
from mllm_jax.foundation.tasks import Task

_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def default_workers() -> int:
    """One worker per core this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_start_method() -> str:
    """forkserver where the platform has it, else spawn; never fork (see module doc)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _init_worker(parent: int) -> None:
    """Keeps each worker on one thread (parallelism comes from the processes) and ends it
    when the process that owns the pool is gone."""
    exit_with(parent)
    for name in _THREAD_ENV:
        os.environ[name] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _filter_in_worker(task: Task, config: FilterConfig) -> tuple[FilterResult, int]:
    """Runs in a worker: never raises for a bad task, so one task cannot stop the stream."""
    start = time.perf_counter()
    try:
        result = apply_filters(task, config)
    except Exception as exc:
        result = FilterResult(
            False,
            Reason.FILTER_ERROR,
            f"task {task.index}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}",
            None,
            seconds=time.perf_counter() - start,
        )
    return result, os.getpid()


def _warm_up_worker() -> int:
    import sklearn.ensemble  # noqa: F401  (the import is the warm-up)

    return os.getpid()


@dataclass(frozen=True)
class FilteredTask:
    """One task out of the pool.

    Attributes:
        task: the input task, annotated (``extra["filter"]`` holds the decision and
            metrics; ``consensus`` holds the mask where one was computed).
        result: the decision.
        position: 0-based position in the input stream.
        attempts: submissions it took (> 1 only after a worker crash).
        worker_pid: the process that produced the result (0 if none did).
    """

    task: Task
    result: FilterResult
    position: int
    attempts: int
    worker_pid: int


@dataclass
class _Job:
    """One task's way through the pool.

    ``lane`` is "main" (the worker pool) or "solo" (one worker, one task at a time, where
    tasks suspected of crashing a worker are re-run so that a crash has one culprit).
    ``ticket`` orders submissions: executors start work first-in first-out.
    """

    task: Task
    position: int
    lane: str = "main"
    future: Future | None = None
    ticket: int | None = None
    attempts: int = 0
    crashes: int = 0
    final: tuple[FilterResult, int] | None = None


@dataclass
class _Lane:
    workers: int
    executor: ProcessPoolExecutor | None = None


def _iter_tasks(source: Iterable[Any]) -> Iterator[Task]:
    """Flattens a stream of tasks, lists of tasks or batches with ``to_tasks()``."""
    for item in source:
        if isinstance(item, Task):
            yield item
            continue
        items = item.to_tasks() if hasattr(item, "to_tasks") else item
        for task in items:
            if not isinstance(task, Task):
                raise TypeError(
                    f"the filter pool takes Task objects, batches of them or objects with "
                    f"to_tasks(); got {type(task).__name__}"
                )
            yield task


class FilterPool:
    """Worker processes that filter tasks; use as a context manager.

    Crash handling: when a worker dies, the unfinished tasks that may have been running
    (the first ``2 * workers + 1`` in submission order: executors start work in order and
    queue at most ``workers + 1`` ahead) are re-run one at a time in a one-worker "solo"
    executor; the rest go back to a fresh main executor. In the solo executor a crash has
    exactly one culprit; a task that crashes it ``max_crashes`` times is rejected with
    reason ``worker_crashed``, and no other task is blamed.

    Args:
        config: filter settings, sent with every task.
        workers: processes; default one per available core.
        start_method: "forkserver" or "spawn" (default: forkserver where available).
            "fork" is refused: forking after JAX started its threads can deadlock.
        max_in_flight: tasks submitted but not yet yielded; bounds memory and how far
            the generator runs ahead. Default ``max(64, 8 * workers)``.
        max_crashes: solo crashes after which a task is rejected.
        max_fruitless_restarts: executor restarts in a row without any task finishing
            before the pool gives up (workers that cannot even start).
    """

    def __init__(
        self,
        config: FilterConfig | None = None,
        *,
        workers: int | None = None,
        start_method: str | None = None,
        max_in_flight: int | None = None,
        max_crashes: int = 2,
        max_fruitless_restarts: int = 8,
    ) -> None:
        self.config = config or FilterConfig()
        self.workers = workers or default_workers()
        self.start_method = start_method or default_start_method()
        if self.start_method == "fork":
            raise ValueError("start_method='fork' can deadlock once JAX runs threads")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self.max_in_flight = max_in_flight or max(64, 8 * self.workers)
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if max_crashes < 1:
            raise ValueError(f"max_crashes must be >= 1, got {max_crashes}")
        self.max_crashes = max_crashes
        self.max_fruitless_restarts = max_fruitless_restarts
        self.restarts = 0
        self._fruitless_restarts = 0
        self._tickets = 0
        self._context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # The fork server (one per Python process, started on first use) imports the
            # filter code once; every worker, including those replacing crashed ones, is
            # then forked from it ready to run instead of importing scikit-learn anew.
            self._context.set_forkserver_preload(["__main__", __name__])
        self._lanes = {"main": _Lane(self.workers), "solo": _Lane(1)}

    def __enter__(self) -> FilterPool:
        self._executor("main")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for name in self._lanes:
            self._shutdown(name)

    def warm_up(self) -> None:
        """Starts every main worker and waits until each has imported the filter code."""
        executor = self._executor("main")
        futures = [executor.submit(_warm_up_worker) for _ in range(self.workers)]
        for future in futures:
            future.result()

    def _executor(self, name: str) -> ProcessPoolExecutor:
        lane = self._lanes[name]
        if lane.executor is None:
            lane.executor = ProcessPoolExecutor(
                max_workers=lane.workers,
                mp_context=self._context,
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
        return lane.executor

    def _shutdown(self, name: str) -> None:
        lane = self._lanes[name]
        if lane.executor is not None:
            lane.executor.shutdown(wait=True, cancel_futures=True)
            lane.executor = None

    def _submit(self, job: _Job, lane: str) -> None:
        """Submits a job; leaves ``job.future`` None if the executor is already broken."""
        job.lane = lane
        try:
            future = self._executor(lane).submit(_filter_in_worker, job.task, self.config)
        except BrokenProcessPool:
            job.future, job.ticket = None, None
            return
        job.attempts += 1
        job.future, job.ticket = future, self._tickets
        self._tickets += 1

    def _recover(self, lane: str, pending: deque[_Job]) -> None:
        """After a worker of ``lane`` died: harvest what finished, re-run the rest."""
        self.restarts += 1
        self._fruitless_restarts += 1
        if self._fruitless_restarts > self.max_fruitless_restarts:
            raise RuntimeError(
                f"filter workers died {self._fruitless_restarts} times in a row without "
                f"finishing a task; see the worker's error output above"
            )
        self._shutdown(lane)  # joins the executor's thread: every future is settled now
        unfinished = []
        for job in pending:
            if job.final is not None or job.lane != lane:
                continue
            future = job.future
            if future is not None and not future.cancelled() and future.exception() is None:
                job.final = future.result()
            else:
                unfinished.append(job)
        unfinished.sort(key=lambda job: (job.ticket is None, job.ticket or 0))
        submitted = [job for job in unfinished if job.ticket is not None]
        if lane == "main":
            suspects = {id(job) for job in submitted[: 2 * self.workers + 1]}
            for job in unfinished:
                self._submit(job, "solo" if id(job) in suspects else "main")
            return
        if submitted:  # one worker, first in first out: the oldest one was running
            culprit = submitted[0]
            culprit.crashes += 1
            if culprit.crashes >= self.max_crashes:
                message = (
                    f"task {culprit.task.index}: its worker process died each of the "
                    f"{culprit.crashes} times it ran alone"
                )
                culprit.final = (FilterResult.reject(Problem(Reason.WORKER_CRASHED, message)), 0)
        for job in unfinished:
            if job.final is None:
                self._submit(job, "solo")

    def _outcome(self, job: _Job, pending: deque[_Job]) -> tuple[FilterResult, int]:
        while job.final is None:
            if job.future is None:
                self._recover(job.lane, pending)
                continue
            try:
                job.final = job.future.result()
                self._fruitless_restarts = 0
            except BrokenProcessPool:
                self._recover(job.lane, pending)
            except Exception as exc:  # e.g. a task that cannot be pickled
                message = f"task {job.task.index}: {type(exc).__name__}: {exc}"
                job.final = (FilterResult.reject(Problem(Reason.FILTER_ERROR, message)), 0)
        return job.final

    def imap(self, source: Iterable[Any]) -> Iterator[FilteredTask]:
        """Filters a stream of tasks (or batches of tasks), yielding them in input order.

        Args:
            source: an iterable of ``Task``, of sequences of ``Task`` or of batches with
                ``to_tasks()``; it is consumed lazily, at most ``max_in_flight`` ahead.
        """
        tasks = _iter_tasks(source)
        pending: deque[_Job] = deque()
        position = 0
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    task = next(tasks, None)
                    if task is None:
                        exhausted = True
                        break
                    job = _Job(task, position)
                    position += 1
                    pending.append(job)
                    self._submit(job, "main")
                if not pending:
                    return
                job = pending[0]
                result, pid = self._outcome(job, pending)
                pending.popleft()
                yield FilteredTask(
                    annotate(job.task, result), result, job.position, job.attempts, pid
                )
        finally:
            for job in pending:
                if job.future is not None:
                    job.future.cancel()


def filter_stream(
    source: Iterable[Any],
    config: FilterConfig | None = None,
    *,
    workers: int | None = None,
    start_method: str | None = None,
    max_in_flight: int | None = None,
) -> Iterator[FilteredTask]:
    """Filters a stream of tasks in a fresh pool; yields :class:`FilteredTask` in order."""
    with FilterPool(
        config, workers=workers, start_method=start_method, max_in_flight=max_in_flight
    ) as pool:
        yield from pool.imap(source)
