"""tools/bench_filter.py pool at a tiny size: the pool, its ablations and the peer
(scikit-learn's own parallelism, n_jobs = 2) filter the same tasks; the peer's decisions
equal the serial scikit-learn loop's, and the JSON line names the peer as the reference."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import bench_filter

from mllm_jax.filtering import FilterConfig
from mllm_jax.foundation.tasks import Task


def _tasks(count, rows=120):
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        X = rng.normal(size=(rows, 4)).astype(np.float32)
        # even tasks learnable, odd ones coin flips: both decisions occur
        y = (X[:, 0] > 0) if index % 2 == 0 else rng.integers(0, 2, rows)
        out.append(
            Task(X, y.astype(np.int32), 2, rows * 2 // 3, np.zeros(4, bool), "mlp", 0, index)
        )
    return out


def test_pool_bench_runs_the_scikit_learn_peer_on_the_same_tasks(tmp_path, capsys):
    tasks = _tasks(6)
    cache = tmp_path / "tasks.npz"
    bench_filter._save_tasks(tasks, cache)
    argv = ["pool", "--tasks", "6", "--cache", str(cache), "--repeats", "1"]
    bench_filter.main([*argv, "--workers", "2", "--reference-jobs", "2"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["name"] == "filter_pool"
    assert record["reference_jobs"] == 2 and "n_jobs=2" in record["reference_impl"]
    assert record["reference_decisions_equal_serial"] is True
    # ours and reference are printed rounded to 3 decimals, the ratio from the exact rates
    assert record["ratio"] == pytest.approx(
        record["ours"] / record["reference"], rel=2e-3, abs=1e-3
    )
    assert {"pool", "single", "serial", "reference"} == set(record["cpu_seconds_per_task"])
    assert record["ablation_serial_loop"]["rate"] > 0
    # The peer decides as the plain filter does, whatever its thread count.
    config = FilterConfig()
    decisions = [bench_filter.reference_filter(t, config, n_jobs=2) for t in tasks]
    assert decisions == [bench_filter.reference_filter(t, config) for t in tasks]
    assert all(decisions[::2]) and not all(decisions[1::2])  # both decisions occur
