"""`mllm-jax runs show RUN` on real (tiny) training runs: a finished run, a run stopped
with --stop-at, a run whose newest checkpoint lost its metadata (and the same run after
training set that step aside), a run not started yet, a run of another config, and a
directory that is not a run. The report reads metadata only: no array is restored and
nothing in the run changes."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mllm_jax.cli import app
from mllm_jax.runs.checkpoint import Checkpointer

DATA = "synthetic: {batch_size: 8, seq_len: 32}"
CONFIG = f"""
mode: lora
lora: {{rank: 4}}
model: {{overrides: {{num_hidden_layers: 1, vocab_size: 256}}, compute_dtype: float32}}
stages:
  - {{name: first, steps: 2, learning_rate: 0.05, data: {{seed: 1, {DATA}}}}}
  - {{name: second, steps: 2, learning_rate: 0.02, data: {{seed: 2, {DATA}}}}}
validation: {{every: 2, batches: 1, data: {{seed: 9, {DATA}}}}}
max_answer_tokens: 8
checkpoint: {{every: 1, keep: 10, async_save: false}}
logging: {{progress: false}}
"""


def _train(config: Path, run_dir: Path, *extra: str) -> str:
    args = ["train", "--config", str(config), "--set", f"run_dir={run_dir}", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(config file, the run stopped at step 3 of 4, the same run resumed to the end)."""
    root = tmp_path_factory.mktemp("runs_show")
    config = root / "run.yaml"
    config.write_text(CONFIG)
    finished = root / "finished"
    assert "step 3/4" in _train(config, finished, "--stop-at", "3")
    stopped = shutil.copytree(finished, root / "stopped")
    assert "step 4/4" in _train(config, finished)
    return config, stopped, finished


def _show(run: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["runs", "show", str(run), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _listing(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")}


def test_a_finished_run(runs, monkeypatch):
    _, _, finished = runs

    def no_restore(*args, **kwargs):
        raise AssertionError("runs show restored an array")

    monkeypatch.setattr(Checkpointer, "restore", no_restore)
    before = _listing(finished)
    lines = _show(finished).splitlines()
    assert _listing(finished) == before  # nothing written, created or touched

    config_file = finished / "config.yaml"
    assert lines[0] == f"run {finished} (lora fine-tuning, config {config_file})"
    assert lines[1] == "stages: first (steps 1-2), second (steps 3-4); 4 steps in all"
    assert lines[2] == f"checkpoints in {finished / 'checkpoints'}:"
    assert lines[3:7] == [
        "  step 1: readable, stage first",
        "  step 2: readable, stage first",
        "  step 3: readable, stage second",
        "  step 4: readable, stage second",
    ]
    validations = _records(finished, "validation")
    best = min(validations, key=lambda r: r["val_loss"])
    assert lines[7].startswith(f"best: step {best['step']}, val_loss {best['val_loss']:.4f}")
    last = _records(finished, "train")[-1]
    assert lines[8] == f"last logged: step 4, loss {last['loss']:.4f} (stage second)"
    assert lines[9] == (
        f"next: mllm-jax train --config {config_file} has nothing left to train: "
        "finished at step 4 of 4"
    )
    assert len(lines) == 10

    info = json.loads(_show(finished, "--json"))
    assert info["total_steps"] == 4 and info["mode"] == "lora"
    assert [s["step"] for s in info["checkpoints"] if s["readable"]] == [1, 2, 3, 4]
    assert info["best"]["step"] == best["step"] and info["best"]["val_loss"] == best["val_loss"]
    assert info["last_logged"] == {"step": 4, "loss": last["loss"], "stage": "second"}
    assert info["next"]["action"] == "finished" and info["next"]["step"] == 4
    assert info["set_aside"] == [] and info["notes"] == []


def test_a_run_stopped_early(runs):
    _, stopped, _ = runs
    output = _show(stopped)
    assert "  step 3: readable, stage second" in output and "step 4" not in output
    last = _records(stopped, "train")[-1]
    assert f"last logged: step 3, loss {last['loss']:.4f} (stage second)" in output
    assert output.splitlines()[-1] == (
        f"next: mllm-jax train --config {stopped / 'config.yaml'} would resume from step 3 of 4"
    )
    info = json.loads(_show(stopped, "--json"))
    assert info["next"] == {
        "action": "resume",
        "step": 3,
        "set_aside": [],
        "line": info["next"]["line"],
    }


def test_a_newest_step_without_metadata(runs, tmp_path):
    """Step 4's meta deleted: reported unreadable, a train would resume from step 3 and
    set step 4 aside; once `Checkpointer.set_aside` (what the resume calls) moved it,
    the report lists it under set aside."""
    _, _, finished = runs
    run = shutil.copytree(finished, tmp_path / "damaged")
    shutil.rmtree(run / "checkpoints" / "4" / "meta")
    output = _show(run)
    (step4,) = [line for line in output.splitlines() if line.startswith("  step 4:")]
    assert step4.startswith("  step 4: UNREADABLE (meta: ")
    assert output.splitlines()[-1].endswith(
        "would resume from step 3 of 4; unreadable step 4 would be set aside"
    )
    info = json.loads(_show(run, "--json"))
    assert [s["readable"] for s in info["checkpoints"]] == [True, True, True, False]
    assert info["next"]["action"] == "resume" and info["next"]["set_aside"] == [4]

    checkpointer = Checkpointer(str(run / "checkpoints"), keep=10, async_save=False)
    moved = checkpointer.set_aside(4)
    checkpointer.close()
    info = json.loads(_show(run, "--json"))
    assert [s["step"] for s in info["checkpoints"]] == [1, 2, 3]
    (aside,) = info["set_aside"]
    assert aside["name"] == moved.name and aside["step"] == 4
    output = _show(run)
    assert f"set aside (unreadable): {moved.name} (step 4, set aside " in output
    assert output.splitlines()[-1].endswith("would resume from step 3 of 4")


def test_a_run_not_started_and_a_run_of_another_config(runs, tmp_path):
    _, _, finished = runs
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(finished / "config.yaml", fresh / "config.yaml")
    output = _show(fresh)
    assert "checkpoints: none in" in output and "best: none" in output
    assert "last logged: nothing in metrics.jsonl" in output
    assert output.splitlines()[-1].endswith("would start fresh: no checkpoint yet")
    assert not (fresh / "checkpoints").exists() and not (fresh / "best").exists()

    other = shutil.copytree(finished, tmp_path / "other")
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("weight_decay: 0.0", "weight_decay: 0.1"))
    last = _show(other).splitlines()[-1]
    assert "would stop: checkpoint step 4 was written by a different training config" in last
    assert "optimizer.weight_decay: checkpoint 0.0, config 0.1" in last


def test_a_run_dir_named_elsewhere_in_its_config_is_noted(runs, tmp_path):
    _, _, finished = runs
    moved = shutil.copytree(finished, tmp_path / "moved")
    output = _show(moved)
    assert f"note: config.yaml's run_dir is {finished}" in output
    assert f"add `--set run_dir={moved}` to continue this run" in output


@pytest.mark.parametrize("what", ["empty_dir", "missing", "bad_config", "file"])
def test_not_a_run_is_a_one_line_error(tmp_path, what):
    run = tmp_path / "run"
    if what == "file":
        run.write_text("a,label\n1,0\n")
    elif what != "missing":
        run.mkdir()
    if what == "bad_config":
        (run / "config.yaml").write_text("mode: sideways\n")
    result = CliRunner().invoke(app, ["runs", "show", str(run)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert (
        line
        == {
            "empty_dir": f"error: {run}: not a training run directory (no config.yaml)",
            "missing": f"error: {run}: no such directory",
            "file": f"error: {run}: not a directory",
            "bad_config": f"error: {run / 'config.yaml'}: mode: 'sideways' is not one of "
            "['lora', 'full']",
        }[what]
    )
