"""Ctrl-C during `mllm-jax train`: exit status 130 with a one-line message, the run
directory stays resumable, and the resumed run ends exactly where an uninterrupted one
does (same final loss, bit for bit, on one CPU device)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train_tiny.yaml"
STEPS = 60
OVERRIDES = [
    "stages.0.steps=30", "stages.1.steps=30", "checkpoint.every=10", "validation.every=30",
    "logging.every=1", "logging.progress=false",
]  # fmt: skip


def _train(run_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu")
    sets = [arg for o in [*OVERRIDES, f"run_dir={run_dir}"] for arg in ("--set", o)]
    return subprocess.Popen(
        [sys.executable, "-m", "mllm_jax.cli", "train", "--config", str(CONFIG), *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _records(run_dir) if r.get("event") == "train"]


def _final_loss(run_dir: Path) -> float:
    return next(r["loss"] for r in reversed(_records(run_dir)) if r.get("event") == "train")


def test_ctrl_c_then_rerun_matches_an_uninterrupted_run(tmp_path):
    cut = tmp_path / "cut"
    first = _train(cut)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        checkpoints = cut / "checkpoints"
        saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
        if saved and max(_steps(cut), default=0) < STEPS - 5:
            break
        time.sleep(0.1)
    assert first.poll() is None, "training ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 130, output
    # The first Ctrl-C finishes the running step and checkpoints it (a KeyboardInterrupt
    # inside orbax's asynchronous save used to leave its thread hanging at exit).
    assert "stopping after the current step" in output
    assert "interrupted: rerun the same command" in output
    assert "Traceback" not in output
    assert max(_steps(cut)) < STEPS

    resumed = _train(cut)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert f"step {STEPS}/{STEPS}" in output

    whole = tmp_path / "whole"
    straight = _train(whole)
    output, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, output
    assert _final_loss(cut) == _final_loss(whole)
