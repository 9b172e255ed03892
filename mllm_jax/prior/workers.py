"""Prior tasks from one single-device JAX process per host core.

One process with a JAX CPU device per core runs every device's program on XLA:CPU's
shared intra-op threads, which wait on each other. One process per core, each pinned to
its core, generates more tasks per second (docs/prior.md). ``CoreWorkers`` starts such
processes and feeds them blocks of consecutive task indices, two at a time each, so a
worker never waits for the parent; a block's X and y come back through a memory-mapped
file in shared memory, the rest through the worker's pipe.

A worker sees one core, so XLA compiles its programs for one core: a task's bytes do not
depend on the number of workers or on the host's core count (on one CPU ISA and jax
version), but differ from ``sample_tasks`` run in a process that sees several cores
(docs/prior.md, known gaps).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import traceback
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from mllm_jax.foundation.processes import exit_with
from mllm_jax.prior.batch import TaskBatch
from mllm_jax.prior.config import PriorConfig, PriorConfigError

_QUEUED_PER_WORKER = 2  # blocks sent ahead, so a worker never waits for the parent
_MAX_BLOCK = 128  # tasks per block: small enough that the last ones balance the workers


class WorkerError(RuntimeError):
    """A worker process failed; the message holds its traceback."""


def _one_device_flags(flags: str) -> str:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags)
    return f"{flags} --xla_force_host_platform_device_count=1".strip()


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _keep_freed_memory() -> bool:
    """Lets glibc's malloc keep freed memory for reuse instead of returning it at once.

    Every call of a compiled program allocates its buffers (MBs) afresh; by default
    glibc hands such memory back to the kernel when it is freed, and the next call pays
    page faults and zeroing for it again, ~7% of a worker's CPU time (docs/prior.md).
    Returns False where there is no glibc (nothing changed then).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def _serve(conn: Connection, core: int | None, cache_dir: str, parent: int) -> None:
    """A worker's loop: answers requests on ``conn`` until it receives None or process
    ``parent`` is gone."""
    exit_with(parent)
    if core is not None:
        os.sched_setaffinity(0, {core})
    _keep_freed_memory()
    os.environ["XLA_FLAGS"] = _one_device_flags(os.environ.get("XLA_FLAGS", ""))
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    # Workers share compiled programs through JAX's persistent cache, so each program
    # is compiled by one of them.
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from mllm_jax.prior import sampler

    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent dropped the pool without closing it
            return
        if request is None:
            return
        try:
            conn.send(("ok", _answer(request, sampler)))
        except Exception:  # the parent raises it, with this traceback
            conn.send(("error", traceback.format_exc()))


def _answer(request: tuple, sampler: Any) -> Any:
    op, *args = request
    if op == "devices":
        import jax

        return len(jax.devices())
    if op == "kinds":
        seed, start, count, config = args
        return sampler.needed_kinds(seed, start, count, PriorConfig.from_dict(config))
    if op == "compile":
        kinds, config = args
        sampler.compile_kinds(kinds, PriorConfig.from_dict(config))
        return None
    if op == "sample":
        seed, start, count, config, path, offset, total = args
        config = PriorConfig.from_dict(config)
        out = None
        if count:  # X and y go straight into the batch file (an empty file cannot be mapped)
            X, y = _batch_views(np.memmap(path, np.uint8, "r+"), total, config)
            out = X[offset : offset + count], y[offset : offset + count]
        batch = sampler.sample_tasks(seed, start, count, config, out=out)
        meta = {
            name: getattr(batch, name)
            for name in ("n_features", "n_classes", "n_train", "categorical", "family", "valid")
        }
        return meta | {"extra": batch.extra}
    raise ValueError(f"unknown request {op!r}")


def _batch_bytes(count: int, config: PriorConfig) -> int:
    return 4 * count * config.rows * (config.max_features + 1)


def _batch_views(buffer: Any, count: int, config: PriorConfig) -> tuple[np.ndarray, np.ndarray]:
    """(X f32[count, rows, slots], y i32[count, rows]) laid out in a batch file's buffer."""
    x_shape = (count, config.rows, config.max_features)
    X = np.frombuffer(buffer, np.float32, int(np.prod(x_shape))).reshape(x_shape)
    y = np.frombuffer(buffer, np.int32, count * config.rows, offset=X.nbytes)
    return X, y.reshape(count, config.rows)


def _new_batch_file(path: Path, count: int, config: PriorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Creates a batch file the workers write into; returns the parent's (X, y) views.

    The file is removed once the batch is complete; the views keep its memory.
    """
    size = _batch_bytes(count, config)
    with open(path, "w+b") as f:
        f.truncate(size)
        buffer = mmap.mmap(f.fileno(), size) if size else b""
    return _batch_views(buffer, count, config)


@dataclass
class _Block:
    batch: int
    offset: int  # within its batch
    start: int
    count: int


@dataclass
class _Assembly:
    """One batch being put together from its blocks."""

    seed: int
    start: int
    count: int
    X: np.ndarray
    y: np.ndarray
    blocks: int
    path: Path  # the file X and y live in, removed when complete
    meta: dict[int, dict] = field(default_factory=dict)  # block offset -> metadata

    def batch(self) -> TaskBatch:
        parts = [self.meta[o] for o in sorted(self.meta)]
        cat = lambda name: np.concatenate([p[name] for p in parts])  # noqa: E731
        return TaskBatch(
            X=self.X,
            y=self.y,
            n_features=cat("n_features"),
            n_classes=cat("n_classes"),
            n_train=cat("n_train"),
            categorical=cat("categorical"),
            family=cat("family"),
            valid=cat("valid"),
            seed=self.seed,
            start=self.start,
            extra={k: np.concatenate([p["extra"][k] for p in parts]) for k in parts[0]["extra"]},
        )


class CoreWorkers:
    """A pool of prior worker processes, one per core by default, each pinned to one.

    Use as a context manager (or call ``close``)::

        with CoreWorkers() as workers:
            batch = workers.sample_tasks(seed=0, start=0, count=1024)

    Args:
        processes: worker count (default: the cores this process may run on).
        pin: pin worker i to the i-th of those cores (Linux only).
    """

    def __init__(self, processes: int | None = None, *, pin: bool = True) -> None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        n = processes if processes is not None else max(1, len(cores) or (os.cpu_count() or 1))
        if n < 1:
            raise PriorConfigError(f"processes={n} must be >= 1")
        shm = Path("/dev/shm")
        self._dir = Path(
            tempfile.mkdtemp(prefix="mllm_jax_prior_", dir=shm if shm.is_dir() else None)
        )
        # A pool dropped without close() still removes its files (/dev/shm is memory).
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(self._dir / "xla_cache")
        ctx = mp.get_context("spawn")  # JAX's threads make fork unsafe
        self._conns: list[Connection] = []
        self._procs = []
        try:
            for i in range(n):
                parent, child = ctx.Pipe()
                core = cores[i % len(cores)] if pin and cores else None
                proc = ctx.Process(
                    target=_serve,
                    args=(child, core, cache, os.getpid()),
                    name=f"mllm-jax-prior-{i}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            for conn in self._conns:  # waits until every worker has started JAX
                conn.send(("devices",))
            for i, devices in enumerate(self._gather()):
                if devices != 1:
                    raise WorkerError(f"worker {i} sees {devices} JAX devices, expected 1")
        except BaseException:
            self.close()
            raise
        self._files = 0  # batch files created so far

    @property
    def processes(self) -> int:
        return len(self._procs)

    def __enter__(self) -> CoreWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers and removes the pool's files (idempotent)."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self._remove_dir()

    def _gather(self) -> list[Any]:
        return [self._receive(i) for i in range(len(self._conns))]

    def _receive(self, worker: int) -> Any:
        try:
            status, payload = self._conns[worker].recv()
        except EOFError:
            raise WorkerError(f"prior worker {worker} exited unexpectedly") from None
        if status == "error":
            raise WorkerError(f"prior worker {worker} failed:\n{payload}")
        return payload

    def compile(
        self, seed: int, start: int, count: int, config: PriorConfig | None = None
    ) -> list[tuple[str, int]]:
        """Compiles every program the index range needs in every worker; returns the kinds.

        Each program is compiled once, by one worker, and loaded by the others from the
        shared compilation cache.
        """
        config = config or PriorConfig()
        self._conns[0].send(("kinds", seed, start, count, config.to_dict()))
        kinds = self._receive(0)
        n = len(self._conns)
        for rounds in ([kinds[i::n] for i in range(n)], [kinds] * n):
            for conn, part in zip(self._conns, rounds, strict=True):
                conn.send(("compile", part, config.to_dict()))
            self._gather()
        return kinds

    def sample_tasks(
        self, seed: int, start: int, count: int, config: PriorConfig | None = None
    ) -> TaskBatch:
        """Like :func:`mllm_jax.prior.sample_tasks`, generated by the workers."""
        return next(self._batches(seed, start, count, config, max(1, count), allow_empty=True))

    def iter_task_batches(
        self,
        seed: int,
        start: int,
        count: int,
        config: PriorConfig | None = None,
        batch_size: int = 256,
    ) -> Iterator[TaskBatch]:
        """Like :func:`mllm_jax.prior.iter_task_batches`; workers keep generating the
        next blocks while the caller handles a batch."""
        return self._batches(seed, start, count, config, batch_size, allow_empty=False)

    def _batches(
        self,
        seed: int,
        start: int,
        count: int,
        config: PriorConfig | None,
        batch_size: int,
        *,
        allow_empty: bool,
    ) -> Iterator[TaskBatch]:
        from mllm_jax.prior.sampler import batch_bounds

        config = config or PriorConfig()
        n = len(self._conns)
        spans = batch_bounds(seed, start, count, batch_size)
        if not spans and allow_empty:
            spans = [(start, start)]
        block = max(1, min(_MAX_BLOCK, -(-min(batch_size, count) // (4 * n))))
        todo = deque(
            _Block(b, lo - spans[b][0], lo, min(block, hi - lo))
            for b, (blo, hi) in enumerate(spans)
            for lo in range(blo, max(hi, blo + 1), block)
        )
        assemblies: dict[int, _Assembly] = {}
        queued: list[deque[_Block]] = [deque() for _ in range(n)]

        def assembly(b: int) -> _Assembly:
            if b not in assemblies:
                lo, hi = spans[b]
                path = self._dir / f"batch{self._files}.bin"
                self._files += 1
                X, y = _new_batch_file(path, hi - lo, config)
                blocks = sum(1 for blk in todo if blk.batch == b)
                assemblies[b] = _Assembly(seed, lo, hi - lo, X, y, blocks, path)
            return assemblies[b]

        def feed(w: int) -> None:
            while todo and len(queued[w]) < _QUEUED_PER_WORKER:
                a = assembly(todo[0].batch)
                blk = todo.popleft()
                request = (
                    seed,
                    blk.start,
                    blk.count,
                    config.to_dict(),
                    str(a.path),
                    blk.offset,
                    a.count,
                )
                self._conns[w].send(("sample", *request))
                queued[w].append(blk)

        def take(w: int) -> None:
            blk = queued[w].popleft()
            assemblies[blk.batch].meta[blk.offset] = self._receive(w)
            feed(w)

        try:
            for w in range(n):
                feed(w)
            for b in range(len(spans)):
                while len(assembly(b).meta) < assemblies[b].blocks:
                    busy = [self._conns[w] for w in range(n) if queued[w]]
                    for conn in wait(busy):
                        take(self._conns.index(conn))
                done = assemblies.pop(b)
                done.path.unlink()
                yield done.batch()
        finally:
            todo.clear()
            for w in range(n):  # answers still on their way belong to this call
                while queued[w]:
                    queued[w].popleft()
                    with contextlib.suppress(WorkerError):
                        self._receive(w)
            for a in assemblies.values():
                a.path.unlink(missing_ok=True)
