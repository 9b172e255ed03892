"""The training run end to end through `mllm-jax train`, on 8 simulated CPU devices
(data=2, fsdp=2, tensor=2), LoRA mode with dropout and a bf16 frozen base, two curriculum
stages, gradient accumulation, validation:

- a run interrupted mid-stage and resumed in a NEW process ends bitwise equal to a
  straight run (parameters, dropout rng state, logged losses);
- only the LoRA weights change; the frozen base stays the bf16 base, bit for bit;
- validation and the best checkpoint; metrics JSON lines;
- a checkpoint of another config or base, an empty data iterator, a bad LoRA target and
  a bad batch are refused with errors that name the problem.

The three CLI processes share a persistent XLA compilation cache, so only the first
compiles the train step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from mllm_jax.cli import app
from mllm_jax.export import save_peft_adapter
from mllm_jax.foundation.config import load_config
from mllm_jax.model import load_hf, save_hf
from mllm_jax.model.lora import LoRAError, LoRAParam
from mllm_jax.runs.checkpoint import CheckpointMismatchError
from mllm_jax.runs.config import TrainConfig
from mllm_jax.runs.loading import build_model, host_params, load_trained
from mllm_jax.train.batches import BatchError, DataExhaustedError
from mllm_jax.train.loop import train

DATA = "synthetic: {batch_size: 4, seq_len: 48}"
CONFIG = f"""
mode: lora
lora: {{rank: 4, dropout: 0.1}}
model: {{overrides: {{num_hidden_layers: 1}}, compute_dtype: float32, frozen_dtype: bfloat16}}
stages:
  - {{name: warmup, steps: 3, learning_rate: 0.05, data: {{seed: 1, {DATA}}}}}
  - {{name: main, steps: 3, learning_rate: 0.02, data: {{seed: 2, {DATA}}}}}
validation: {{every: 2, batches: 2, data: {{seed: 9, {DATA}}}}}
mesh: {{data: 2, fsdp: 2, tensor: 2}}
grad_accum: 2
max_answer_tokens: 16
checkpoint: {{every: 2, keep: 10}}
logging: {{progress: false}}
"""


def _cli(config: Path, run_dir: Path, cache: Path, *extra: str) -> str:
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    command = [sys.executable, "-m", "mllm_jax.cli", "train", "--config", str(config)]
    command += ["--set", f"run_dir={run_dir}", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record in log order: a step logged twice shows."""
    return [(m["step"], m["loss"]) for m in _metrics(run_dir) if m["event"] == "train"]


def _assert_same_end_state(straight: Path, run_dir: Path) -> None:
    """The LoRA weights bit for bit and every logged (step, loss) of the straight run."""
    a, _ = load_trained(straight)
    b, _ = load_trained(run_dir)
    pa, pb = host_params(nnx.state(a, LoRAParam)), host_params(nnx.state(b, LoRAParam))
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), name
    assert _losses(straight) == _losses(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_loop")
    config = root / "run.yaml"
    config.write_text(CONFIG)
    cache = root / "xla_cache"
    straight, resumed = root / "straight", root / "resumed"
    out = _cli(config, straight, cache)
    assert "step 6/6" in out
    assert "step 4/6" in _cli(config, resumed, cache, "--stop-at", "4")
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir()) == [2, 3, 4]
    assert "step 6/6" in _cli(config, resumed, cache)
    return config, straight, resumed


def test_resume_in_a_new_process_is_bitwise_exact(runs):
    _, straight, resumed = runs
    a, _ = load_trained(straight)
    b, _ = load_trained(resumed)
    pa, pb = host_params(nnx.state(a, LoRAParam)), host_params(nnx.state(b, LoRAParam))
    assert len(pa) == 14  # q,k,v,o,gate,up,down x (A, B) in one layer
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), name
    ra, rb = host_params(nnx.state(a, nnx.RngCount)), host_params(nnx.state(b, nnx.RngCount))
    assert ra and ra == rb and all(int(v) == 12 for v in ra.values())  # 6 steps x 2 micro
    assert _losses(straight) == _losses(resumed)  # every step once, same values
    assert [step for step, _ in _losses(resumed)] == [1, 2, 3, 4, 5, 6]


def test_only_lora_weights_change(runs):
    _, straight, _ = runs
    trained, config = load_trained(straight)
    base = load_hf(straight / "base", "bfloat16")
    got = host_params(nnx.state(trained, nnx.Param))
    want = host_params(nnx.state(base, nnx.Param))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == jnp.bfloat16, name
        assert np.array_equal(got[name], want[name]), name
    lora = host_params(nnx.state(trained, LoRAParam))
    b_norms = [np.abs(v).max() for k, v in lora.items() if k.endswith(".b")]
    assert min(b_norms) > 0  # B starts at zero: every adapter trained
    assert config.mode == "lora"


def test_validation_best_checkpoint_and_metrics(runs):
    _, straight, _ = runs
    metrics = _metrics(straight)
    validations = [m for m in metrics if m["event"] == "validation"]
    assert [m["step"] for m in validations] == [2, 4, 6]
    best = min(validations, key=lambda m: m["val_loss"])
    assert validations[-1]["best_step"] == best["step"]
    assert [int(p.name) for p in (straight / "best").iterdir() if p.name.isdigit()] == [
        best["step"]
    ]
    load_trained(straight, "best")
    train_lines = [m for m in metrics if m["event"] == "train"]
    assert {m["stage"] for m in train_lines} == {"warmup", "main"}
    assert train_lines[0]["lr"] == 0.0  # warmup starts at 0 in each stage
    assert all(m["tokens"] == 2 * 4 * 48 for m in train_lines)
    assert any(m.get("tokens_per_s", 0) > 0 for m in train_lines)
    assert metrics[0]["event"] == "start" and metrics[0]["mesh"] == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_of_another_config_is_refused(runs, tmp_path):
    config_path, straight, _ = runs
    run_dir = _copy_run(straight, tmp_path / "run")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(config_path),
            "--set",
            f"run_dir={run_dir}",
            "--set",
            "optimizer.weight_decay=0.1",
        ],
    )
    assert result.exit_code == 2
    assert "a different training config" in result.output
    assert "optimizer.weight_decay: checkpoint 0.0, config 0.1" in result.output


def test_checkpoint_of_another_base_is_refused(runs, tmp_path):
    config_path, straight, _ = runs
    run_dir = _copy_run(straight, tmp_path / "run")
    other = load_hf(run_dir / "base")
    kernel = other.layers[0].mlp.up_proj.kernel
    kernel.set_value(kernel[...] + 1)
    save_hf(other, run_dir / "base", overwrite=True)
    config = load_config(TrainConfig, config_path, [f"run_dir={run_dir}"])
    with pytest.raises(CheckpointMismatchError, match="trained from another base model"):
        train(config)


def _fresh(config_path: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig, config_path, [f"run_dir={run_dir}", "validation.every=0", *overrides]
    )


def test_empty_data_iterator_is_refused(runs, tmp_path):
    config_path, _, _ = runs
    with pytest.raises(DataExhaustedError, match="stage 'warmup' step 1: the data iterator ended"):
        train(_fresh(config_path, tmp_path / "run"), data_factory=lambda data, what: iter([]))


def test_bad_batch_is_refused(runs, tmp_path):
    config_path, _, _ = runs
    bad = {"input_ids": np.zeros((4, 8), np.int32)}
    with pytest.raises(BatchError, match=r"stage 'warmup' step 1 micro-batch 0: batch lacks"):
        train(_fresh(config_path, tmp_path / "run"), data_factory=lambda data, what: iter([bad]))


def test_lora_target_that_matches_nothing_is_refused(runs, tmp_path):
    config_path, _, _ = runs
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(config_path),
            "--set",
            f"run_dir={tmp_path / 'run'}",
            "--set",
            "lora.targets=[q_proj, qkv]",
        ],
    )
    assert result.exit_code == 2
    assert "LoRA target patterns ['qkv'] match no linear layer" in result.output


def test_mesh_larger_than_the_devices_is_a_one_line_error(runs, tmp_path):
    config_path, _, _ = runs
    args = ["train", "--config", str(config_path), "--set", f"run_dir={tmp_path / 'run'}"]
    result = CliRunner().invoke(app, [*args, "--set", "mesh={data: 4, fsdp: 4, tensor: 1}"])
    assert result.exit_code == 2, result.output
    assert "mesh data=4 x fsdp=4 x tensor=1 = 16 devices, but 8 are available" in result.output
    assert "Traceback" not in result.output


def test_continue_from_a_peft_adapter(runs, tmp_path):
    config_path, straight, _ = runs
    trained, _ = load_trained(straight)
    adapter = save_peft_adapter(trained, tmp_path / "adapter")
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.base={straight / 'base'}"]
    config = load_config(TrainConfig, config_path, [*overrides, f"model.adapter={adapter}"])
    model = build_model(config, straight / "base", None, None)
    got = host_params(nnx.state(model, LoRAParam))
    want = host_params(nnx.state(trained, LoRAParam))
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    other = load_config(
        TrainConfig, config_path, [*overrides, f"model.adapter={adapter}", "lora.rank=8"]
    )
    with pytest.raises(LoRAError, match="adapter r=4 but the config's lora asks for 8"):
        build_model(other, straight / "base", None, None)


@pytest.mark.slow  # the default suite's kill soak (3 kills) covers it
def test_killed_process_resumes_bitwise(runs, tmp_path):
    """SIGKILL a training process (mid-run, possibly mid-save), rerun: same end state."""
    config_path, straight, _ = runs
    run_dir, cache = tmp_path / "killed", straight.parent / "xla_cache"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    command = [sys.executable, "-m", "mllm_jax.cli", "train", "--config", str(config_path)]
    command += ["--set", f"run_dir={run_dir}", "--set", "checkpoint.every=1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "3").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert "step 6/6" in _cli(config_path, run_dir, cache)
    _assert_same_end_state(straight, run_dir)


def _train_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"event": "train"' in line for line in path.read_text().splitlines())


def _metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize(("kills", "steps"), [(3, 3), pytest.param(20, 12, marks=pytest.mark.slow)])
def test_kill_soak_ends_bitwise_equal_to_a_straight_run(runs, tmp_path, kills, steps):
    """SIGKILL `mllm-jax train` at random moments (start-up and restore, steps,
    validations, best-model saves, async checkpoint writes: every step checkpoints here),
    rerunning after each kill: the final parameters and the whole loss log equal a
    straight run's. The slow version runs 2 x 12 steps, so 20 kills land while training."""
    import random

    config_path, straight, _ = runs
    cache = straight.parent / "xla_cache"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    longer = (
        []
        if steps == 3
        else ["--set", f"stages.0.steps={steps}", "--set", f"stages.1.steps={steps}"]
    )
    if longer:
        straight = tmp_path / "straight"
        _cli(config_path, straight, cache, *longer)
    run_dir = tmp_path / "soak"
    command = [sys.executable, "-m", "mllm_jax.cli", "train", "--config", str(config_path)]
    command += ["--set", f"run_dir={run_dir}", "--set", "checkpoint.every=1", *longer]
    rng = random.Random(kills)
    landed, training = 0, 0
    for _ in range(kills):
        lines, before = _metric_lines(run_dir), _train_lines(run_dir)
        in_training = rng.random() < 0.8  # else during start-up or the restore
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 600
        # In training: once this process logged its start (its restore is done) and
        # trained one step; then a random moment within about two more steps.
        while (
            in_training
            and process.poll() is None
            and not (_metric_lines(run_dir) > lines and _train_lines(run_dir) > before)
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            landed += 1
            training += in_training
        process.wait()
        stderr = process.stderr.read().decode()
        process.stderr.close()
        assert process.returncode in (0, -signal.SIGKILL), stderr[-3000:]
        if process.returncode == 0:
            break  # the run finished before this kill
    print(f"kill soak: {landed} kills landed, {training} of them while training")
    assert landed >= min(kills, 3) and training >= min(kills // 2, 2), (landed, training)
    assert f"step {2 * steps}/{2 * steps}" in _cli(config_path, run_dir, cache, *longer)
    _assert_same_end_state(straight, run_dir)


def _truncate_arrays(step_dir: Path) -> None:
    """Halves every data file of the item (OCDBT keeps a merged copy beside the
    per-process files; either may be read)."""
    for path in (step_dir / "trainable").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated_array_file": _truncate_arrays,
    "deleted_item": lambda step_dir: shutil.rmtree(step_dir / "trainable"),
    "deleted_meta": lambda step_dir: shutil.rmtree(step_dir / "meta"),
}


@pytest.mark.parametrize(
    "corruption",
    [
        "truncated_array_file",
        pytest.param("deleted_item", marks=pytest.mark.slow),
        pytest.param("deleted_meta", marks=pytest.mark.slow),
    ],
)
def test_unreadable_newest_checkpoint_is_set_aside_and_an_older_one_resumes(
    runs, tmp_path, corruption
):
    """The newest step (6) damaged: one warning line, step 6 moved (not deleted) into
    checkpoints.unreadable/, resume from step 4, and the end state of the straight run."""
    config_path, straight, _ = runs
    run_dir, cache = tmp_path / "damaged", straight.parent / "xla_cache"
    shutil.copytree(straight, run_dir)
    CORRUPTIONS[corruption](run_dir / "checkpoints" / "6")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "mllm_jax.cli", "train", "--config", str(config_path)]
    done = subprocess.run(
        [*command, "--set", f"run_dir={run_dir}"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 6/6" in done.stdout
    warning = [line for line in done.stderr.splitlines() if "unreadable" in line]
    assert len(warning) == 1 and "step 6" in warning[0] and "resuming from step 4" in warning[0]
    assert "Traceback" not in done.stderr
    (aside,) = (run_dir / "checkpoints.unreadable").iterdir()
    assert aside.name.startswith("6-") and any(aside.iterdir())
    _assert_same_end_state(straight, run_dir)  # steps 5 and 6 logged once each


def test_no_readable_checkpoint_is_a_one_line_error_naming_the_run(runs, tmp_path):
    config_path, straight, _ = runs
    run_dir = tmp_path / "all-damaged"
    shutil.copytree(straight, run_dir)
    steps = sorted((run_dir / "checkpoints").iterdir())
    for step_dir in steps:
        shutil.rmtree(step_dir / "meta")
    result = CliRunner().invoke(
        app, ["train", "--config", str(config_path), "--set", f"run_dir={run_dir}"]
    )
    assert result.exit_code == 2, result.output
    assert f"run {run_dir}: no checkpoint in" in result.output
    assert "left in place" in result.output
    assert sorted((run_dir / "checkpoints").iterdir()) == steps  # nothing moved
    assert not (run_dir / "checkpoints.unreadable").exists()
