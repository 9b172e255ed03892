"""Ctrl-C during `mllm-jax demo` leaves a run that the same command finishes: SIGINT once
training has checkpointed, exit status 130, nothing half-written; the rerun skips the
finished stages, resumes training from its checkpoint and ends with every artifact."""

import json
import signal
import time
from pathlib import Path

import pytest
from test_demo import check_artifacts, shrunk_config, start_demo, write_config

pytestmark = pytest.mark.slow

SHRUNK = shrunk_config(
    (4, 8), count=32, heldout=16, eval_={"shots": [8, 16], "methods": ["knn", "majority"]}
)
TOTAL_STEPS = 12


def _train_steps(out: Path) -> list[int]:
    path = out / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in lines if r.get("event") == "train"]


def _checkpoints(out: Path) -> list[int]:
    directory = out / "train" / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_interrupted_demo_resumes_to_a_complete_run(tmp_path):
    config = write_config(tmp_path, SHRUNK)
    out = tmp_path / "run"
    first = start_demo(out, config)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and first.poll() is None:
        if _checkpoints(out) and max(_train_steps(out), default=0) < TOTAL_STEPS - 2:
            break
        time.sleep(0.2)
    assert first.poll() is None, (
        "the demo ended before training checkpointed:\n" + (first.communicate()[0])
    )
    first.send_signal(signal.SIGINT)
    first_output, _ = first.communicate(timeout=120)
    assert first.returncode == 130, first_output
    assert "interrupted" in first_output and "run the same command again" in first_output
    interrupted_at = _train_steps(out)
    assert 0 < len(interrupted_at) < TOTAL_STEPS
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["generate"]  # train was cut: not recorded as done
    assert not (out / "model").exists() and not (out / "report").exists()

    second = start_demo(out, config)
    second_output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, second_output
    assert "generate: done in an earlier run" in second_output
    # Resumed from a checkpoint, not from scratch: one start event in the metrics log.
    records = [json.loads(line) for line in (out / "train/metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "start" for r in records) == 1
    assert _train_steps(out)[-1] == TOTAL_STEPS
    check_artifacts(out, SHRUNK)
