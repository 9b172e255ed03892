"""The filter pool: order, equality with a serial loop, bad tasks, killed workers."""

import dataclasses
import os
import signal

import numpy as np
import pytest

from mllm_jax.filtering import FilterConfig, FilterPool, FilterReport, Reason, apply_filters
from mllm_jax.foundation.tasks import Task

CONFIG = FilterConfig(n_estimators=8, consensus=True, consensus_folds=3)


def _tasks(count, rows=200, seed=0):
    rng = np.random.default_rng(seed)
    tasks = []
    for index in range(count):
        X = rng.normal(size=(rows, 5)).astype(np.float32)
        if index % 3 == 2:  # every third task is pure noise
            y = rng.integers(0, 2, size=rows)
        else:
            y = (X[:, index % 5] > 0).astype(np.int64)
        tasks.append(
            Task(X, y.astype(np.int32), 2, rows * 2 // 3, np.zeros(5, bool), "mlp", seed, index)
        )
    return tasks


def _same(item, expected):
    got = item.result
    assert (got.accepted, got.reason, got.metrics) == (
        expected.accepted,
        expected.reason,
        expected.metrics,
    )
    if expected.consensus is None:
        assert got.consensus is None
    else:
        np.testing.assert_array_equal(got.consensus, expected.consensus)


class _Bomb:
    """Kills whichever process unpickles it: a task that crashes its worker every time."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_pool_matches_serial_in_order_with_bad_tasks_mixed_in():
    tasks = _tasks(10)
    nan_X = tasks[4].X.copy()
    nan_X[0, 0] = np.nan
    tasks[4] = dataclasses.replace(tasks[4], X=nan_X)
    tasks[7] = dataclasses.replace(tasks[7], y=np.zeros_like(tasks[7].y))
    batches = [tasks[:4], tasks[4:9], tasks[9:]]  # a stream of batches, as the prior yields
    report = FilterReport()
    with FilterPool(CONFIG, workers=2, max_in_flight=4) as pool:
        out = []
        for item in pool.imap(iter(batches)):
            report.add(item)
            out.append(item)
    assert [item.position for item in out] == list(range(10))
    assert [item.task.index for item in out] == list(range(10))
    for item, task in zip(out, tasks, strict=True):
        _same(item, apply_filters(task, CONFIG))
        assert item.task.extra["filter"]["accepted"] == item.result.accepted
    assert out[4].result.reason is Reason.NONFINITE_FEATURES
    assert out[7].result.reason is Reason.SINGLE_CLASS
    assert out[0].task.consensus is not None and out[0].result.accepted
    summary = report.to_json()
    assert summary["tasks_seen"] == 10
    assert summary["accepted"] + sum(summary["rejected_by_reason"].values()) == 10
    assert summary["rejected_by_reason"]["nonfinite_features"] == 1
    assert 0 < summary["consensus_keep_rate"] <= 1


def test_killed_worker_loses_and_duplicates_nothing():
    tasks = _tasks(16, rows=300, seed=1)
    config = dataclasses.replace(CONFIG, n_estimators=12)
    out = []
    with FilterPool(config, workers=2) as pool:
        for item in pool.imap(tasks):
            if not out:  # first result back: the pool is mid-batch, 15 tasks in flight
                os.kill(item.worker_pid, signal.SIGKILL)
            out.append(item)
        assert pool.restarts >= 1
    assert [item.task.index for item in out] == list(range(16))
    assert any(item.attempts > 1 for item in out)
    for item, task in zip(out, tasks, strict=True):
        _same(item, apply_filters(task, config))


def test_task_that_always_kills_its_worker_is_rejected_not_retried_forever():
    tasks = _tasks(6, seed=2)
    tasks[2] = dataclasses.replace(tasks[2], extra={"bomb": _Bomb()})
    with FilterPool(CONFIG, workers=2, max_crashes=2) as pool:
        out = list(pool.imap(tasks))
    assert [item.task.index for item in out] == list(range(6))
    assert out[2].result.reason is Reason.WORKER_CRASHED
    assert "2 times it ran alone" in out[2].result.message
    for i in (0, 1, 3, 4, 5):
        _same(out[i], apply_filters(tasks[i], CONFIG))


def test_pool_refuses_fork_and_foreign_items():
    with pytest.raises(ValueError, match="fork"):
        FilterPool(CONFIG, start_method="fork")
    with FilterPool(CONFIG, workers=1) as pool, pytest.raises(TypeError, match="Task"):
        list(pool.imap([[1, 2]]))


def test_filter_into_writes_accepted_tasks_report_and_log(tmp_path):
    import json

    from mllm_jax.filtering.run import filter_into

    tasks = _tasks(6, seed=3)
    kept = []
    summary = filter_into(
        [tasks[:3], tasks[3:]],
        kept.append,
        CONFIG,
        workers=2,
        report_path=tmp_path / "report.json",
        log_path=tmp_path / "tasks.jsonl",
        progress=False,
        settings={"seed": 3},
    )
    expected = [apply_filters(t, CONFIG) for t in tasks]
    assert [t.index for t in kept] == [
        t.index for t, r in zip(tasks, expected, strict=True) if r.accepted
    ]
    assert all(t.consensus is not None and t.extra["filter"]["accepted"] for t in kept)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == summary
    assert on_disk["tasks_seen"] == 6 and on_disk["accepted"] == len(kept)
    assert on_disk["seed"] == 3 and on_disk["config"]["n_estimators"] == CONFIG.n_estimators
    lines = (tmp_path / "tasks.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "tasks.jsonl"]


def test_a_filter_that_always_raises_fails_the_run_with_its_traceback(tmp_path):
    """A systematic filter bug must not pass as an empty corpus with exit status 0."""
    from mllm_jax.filtering.run import FilterErrorRateError, _check_errors, filter_into

    broken = dataclasses.replace(CONFIG)
    object.__setattr__(broken, "max_features", "bogus")  # past validation: sklearn raises
    kept = []
    with pytest.raises(FilterErrorRateError, match=r"3 of 3 tasks made a filter raise") as err:
        filter_into([_tasks(12)], kept.append, broken, workers=2, progress=False)
    assert "Traceback" in str(err.value) and "max_features" in str(err.value)
    assert kept == []
    # rare errors pass; more than 1% at the end fails
    _check_errors(["one"], 200, final=True)
    with pytest.raises(FilterErrorRateError, match="3 of 200"):
        _check_errors(["a", "b", "c"], 200, final=True)
