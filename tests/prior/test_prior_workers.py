"""CoreWorkers: prior generation in single-device worker processes pinned per core.

The workers compile their own (one-device) programs, so the tiny config of
test_prior keeps that to two kinds, compiled once for the module.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from mllm_jax.prior import PriorConfig, PriorConfigError
from mllm_jax.prior.workers import CoreWorkers, WorkerError, _one_device_flags

SEED = 11
COUNT = 20
TINY = PriorConfig(rows=64, max_features=6, max_hidden=16, widths=(16,), chunk_size=2)
ARRAYS = ("X", "y", "n_features", "n_classes", "n_train", "categorical", "family", "valid")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One compilation cache for the module's pools (each would otherwise compile)."""
    before = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    yield
    if before is None:
        del os.environ["JAX_COMPILATION_CACHE_DIR"]
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def workers(shared_cache):
    with CoreWorkers(2) as pool:
        pool.compile(SEED, 0, COUNT, TINY)
        yield pool


@pytest.fixture(scope="module")
def batch(workers):
    return workers.sample_tasks(SEED, 0, COUNT, TINY)


def _assert_same(a, b) -> None:
    for name in ARRAYS:
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.extra.keys() == b.extra.keys()
    for name in a.extra:
        assert np.array_equal(a.extra[name], b.extra[name]), name


def test_a_batch_has_the_prior_shapes_and_ranges(batch):
    assert batch.X.shape == (COUNT, TINY.rows, TINY.max_features)
    assert batch.y.shape == (COUNT, TINY.rows) and batch.y.dtype == np.int32
    assert batch.start == 0 and batch.seed == SEED
    assert batch.valid.all()
    assert ((batch.n_features >= 1) & (batch.n_features <= TINY.max_features)).all()
    assert set(batch.family) == {"mlp", "tree"}
    for i in range(COUNT):
        assert batch.y[i].max() < batch.n_classes[i]
        assert not batch.X[i, :, batch.n_features[i] :].any()


def test_bytes_do_not_depend_on_batching_or_worker_count(workers, batch):
    parts = list(workers.iter_task_batches(SEED, 0, COUNT, TINY, batch_size=7))
    assert [(p.start, len(p)) for p in parts] == [(0, 7), (7, 7), (14, 6)]
    joined = type(batch)(
        **{n: np.concatenate([getattr(p, n) for p in parts]) for n in ARRAYS},
        seed=SEED,
        start=0,
        extra={n: np.concatenate([p.extra[n] for p in parts]) for n in batch.extra},
    )
    _assert_same(batch, joined)
    with CoreWorkers(1) as one:
        _assert_same(batch, one.sample_tasks(SEED, 0, COUNT, TINY))


def test_empty_ranges_and_bad_arguments(workers):
    empty = workers.sample_tasks(SEED, 5, 0, TINY)
    assert empty.X.shape == (0, TINY.rows, TINY.max_features) and len(empty) == 0
    assert list(workers.iter_task_batches(SEED, 5, 0, TINY)) == []
    with pytest.raises(PriorConfigError, match="batch_size"):
        list(workers.iter_task_batches(SEED, 0, 4, TINY, batch_size=0))
    with pytest.raises(PriorConfigError, match="indices"):
        workers.sample_tasks(SEED, 2**32 - 1, 2, TINY)
    with pytest.raises(PriorConfigError, match="processes"):
        CoreWorkers(0)


def test_a_stopped_iteration_leaves_no_files_and_the_pool_usable(workers, batch):
    it = workers.iter_task_batches(SEED, 0, COUNT, TINY, batch_size=4)
    next(it)
    it.close()  # answers still queued are drained, their files removed
    assert not list(workers._dir.glob("batch*.bin"))
    _assert_same(batch, workers.sample_tasks(SEED, 0, COUNT, TINY))


def test_a_worker_error_carries_its_traceback(workers):
    workers._conns[0].send(("no-such-request",))
    with pytest.raises(WorkerError, match="unknown request"):
        workers._receive(0)


def test_close_removes_the_pool_directory():
    pool = CoreWorkers(1)
    directory = pool._dir
    assert directory.is_dir()
    pool.close()
    pool.close()
    assert not directory.exists()


def test_workers_get_exactly_one_device_flag():
    flags = _one_device_flags("--xla_force_host_platform_device_count=8 --xla_foo=1")
    assert flags.split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=1"]
    assert os.environ.get("XLA_FLAGS", "").count("device_count=8") <= 1  # parent untouched


def test_cli_generate_with_prior_processes_writes_the_workers_tasks(tmp_path, batch):
    from array_record.python.array_record_module import ArrayRecordReader
    from typer.testing import CliRunner

    from mllm_jax.cli import app
    from mllm_jax.data.shards import list_corpus_shards
    from mllm_jax.foundation.tasks import decode_task

    sets = [f"prior.{k}={v}" for k, v in TINY.to_dict().items() if k in ("rows", "max_features")]
    sets += ["prior.max_hidden=16", "prior.widths=[16]", "prior.chunk_size=2"]
    args = ["generate", "--out", str(tmp_path), "--count", str(COUNT), "--seed", str(SEED)]
    args += ["--prior-processes", "2", "--batch-size", "8", "--shard-size", "6", "--no-progress"]
    result = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    tasks = []
    for path in list_corpus_shards(tmp_path):
        reader = ArrayRecordReader(str(path))
        tasks += [decode_task(r) for r in reader.read_all()]
        reader.close()
    assert [t.index for t in tasks] == list(range(COUNT))
    for t in tasks:
        want = batch.task(t.index)
        assert np.array_equal(t.X, want.X) and np.array_equal(t.y, want.y)
    manifest = (tmp_path / "manifest-p00000.json").read_text()
    assert '"prior_processes": 2' in manifest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_workers_malloc_reuses_freed_memory():
    """After _keep_freed_memory, buffers of the sizes a program call allocates come back
    without new page faults (by default glibc returned some of them to the kernel here:
    ~6800 faults over the same loop)."""
    sizes = [3 << 20, 40 << 20, 7 << 20, 20 << 20]
    code = f"""
import resource
import numpy as np
from mllm_jax.prior.workers import _keep_freed_memory
assert _keep_freed_memory()
sizes = {sizes}
for size in sizes:
    np.ones(size, np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    for size in sizes:
        np.ones(size, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    one_round_pages = sum(sizes) // 4096
    assert int(out.stdout) < one_round_pages // 10


def test_a_dropped_pool_stops_its_workers_and_removes_its_files():
    pool = CoreWorkers(1)
    directory, proc = pool._dir, pool._procs[0]
    del pool
    gc.collect()
    assert not directory.exists()
    proc.join(timeout=30)
    assert proc.exitcode == 0
