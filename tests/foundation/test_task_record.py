import numpy as np
import pytest

from mllm_jax.foundation.tasks import Task, TaskRecordError, decode_task, encode_task


def _task(consensus: bool) -> Task:
    rng = np.random.default_rng(0)
    rows, feats = 37, 6
    return Task(
        X=rng.normal(size=(rows, feats)).astype(np.float32),
        y=rng.integers(0, 3, size=rows).astype(np.int32),
        n_classes=3,
        n_train=30,
        categorical=np.array([True, False, False, True, False, False]),
        family="tree",
        seed=123,
        index=42,
        consensus=rng.random(rows) > 0.5 if consensus else None,
        extra={"kappa": 0.5},
    )


@pytest.mark.parametrize("consensus", [False, True])
def test_round_trip_preserves_every_field(consensus):
    task = _task(consensus)
    back = decode_task(encode_task(task))
    np.testing.assert_array_equal(back.X, task.X)
    np.testing.assert_array_equal(back.y, task.y)
    np.testing.assert_array_equal(back.categorical, task.categorical)
    assert (back.consensus is None) == (task.consensus is None)
    if consensus:
        np.testing.assert_array_equal(back.consensus, task.consensus)
    assert (back.n_classes, back.n_train, back.family, back.seed, back.index, back.extra) == (
        3,
        30,
        "tree",
        123,
        42,
        {"kappa": 0.5},
    )


def test_truncated_and_foreign_records_are_refused():
    record = encode_task(_task(True))
    with pytest.raises(TaskRecordError, match="truncated"):
        decode_task(record[:-5])
    with pytest.raises(TaskRecordError, match="magic"):
        decode_task(b"XXXX" + record[4:])
    with pytest.raises(TaskRecordError, match="too short"):
        decode_task(b"ML")


def test_inconsistent_task_is_refused():
    task = _task(False)
    with pytest.raises(ValueError, match="n_train"):
        Task(task.X, task.y, 3, 37, task.categorical, "mlp", 0, 0)
    with pytest.raises(ValueError, match="family"):
        Task(task.X, task.y, 3, 10, task.categorical, "xgb", 0, 0)
