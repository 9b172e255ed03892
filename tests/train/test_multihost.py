"""Multi-host training proven on one machine: `mllm-jax train` as 2 processes x 4 CPU
devices (jax.distributed, gloo collectives) against 1 process x 8 devices, same mesh
(data=2, fsdp=2, tensor=2), LoRA with dropout, gradient accumulation:

- losses, grad norms and final parameters equal the single-process run;
- the 2-process checkpoint restores in a 1-process run (trainable, optimizer state, data
  position) and training continues to the single-process result;
- a per-process data position (grain) is refused on another process count;
- a process killed (SIGKILL) or failing with an exception makes the others exit non-zero
  within a bounded time (10 s heartbeat timeout), never hang.

Every subprocess runs under a hard timeout (a bug must fail the test, never hang it).
The single-process runs share a persistent XLA compilation cache. The 2-process jobs
compile for themselves: jax 0.10 does not cache executables that span processes on CPU,
and with jax_share_binary_between_hosts the gloo collectives hang (measured).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from mllm_jax.model.lora import LoRAParam
from mllm_jax.runs.checkpoint import CheckpointMismatchError
from mllm_jax.runs.config import TrainConfig
from mllm_jax.runs.loading import host_params, load_trained
from mllm_jax.train.loop import train

DATA = "synthetic: {batch_size: 8, seq_len: 48}"
STEPS = 4
CONFIG = f"""
mode: lora
lora: {{rank: 4, dropout: 0.1}}
model: {{overrides: {{num_hidden_layers: 1}}, compute_dtype: float32, frozen_dtype: bfloat16}}
stages:
  - {{name: main, steps: {STEPS}, learning_rate: 0.05, data: {{seed: 1, {DATA}}}}}
mesh: {{data: 2, fsdp: 2, tensor: 2}}
remat: none
grad_accum: 2
max_answer_tokens: 16
checkpoint: {{every: 2, keep: 10}}
logging: {{progress: false}}
"""
TIMEOUT_S = 300  # per subprocess; a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **extra,
    }
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _train_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "mllm_jax.cli", "train", "--config", str(config)]
    return [*command, "--set", f"run_dir={run_dir}", *extra]


def _launch(command: list[str], logs: str, **env: str) -> list[subprocess.Popen]:
    """`command` as 2 processes of 4 CPU devices each, joined through the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); process i's output
    goes to `<logs>.process<i>.log`."""
    port = _free_port()
    processes = []
    for i in range(2):
        job = {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
        }
        with open(f"{logs}.process{i}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    env=_env(4, **job, **env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return processes


def _finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[int]:
    """Waits for every process, killing all of them past `timeout`; their exit codes."""
    deadline = time.monotonic() + timeout
    try:
        for p in processes:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in processes]


def _log(logs: Path | str, process: int) -> str:
    return Path(f"{logs}.process{process}.log").read_text(errors="replace")


def _one_process(config: Path, run_dir: Path, cache: Path, *extra: str) -> str:
    done = subprocess.run(
        _train_command(config, run_dir, *extra),
        env=_env(8, cache),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _metrics(run_dir: Path, key: str) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m[key] for m in map(json.loads, lines) if m["event"] == "train"}


def _lora_params(run_dir: Path) -> dict[str, np.ndarray]:
    model, _ = load_trained(run_dir)
    return host_params(nnx.state(model, LoRAParam))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(config path, 2-process run, 1-process run, XLA cache)."""
    root = tmp_path_factory.mktemp("multihost")
    config = root / "run.yaml"
    config.write_text(CONFIG)
    cache = root / "xla_cache"
    two, one = root / "two_processes", root / "one_process"
    codes = _finish(_launch(_train_command(config, two), str(two)))
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited {code}:\n{_log(two, i)[-4000:]}"
        assert f"step {STEPS}/{STEPS}" in _log(two, i)
    assert f"step {STEPS}/{STEPS}" in _one_process(config, one, cache)
    return config, two, one, cache


def test_two_processes_train_like_one_process(runs):
    _, two, one, _ = runs
    losses_2, losses_1 = _metrics(two, "loss"), _metrics(one, "loss")
    assert sorted(losses_2) == list(range(1, STEPS + 1))
    assert losses_1[STEPS] < losses_1[1]  # the steps did something
    steps = sorted(losses_1)
    np.testing.assert_allclose(
        [losses_2[s] for s in steps], [losses_1[s] for s in steps], rtol=1e-5
    )
    norms_2, norms_1 = _metrics(two, "grad_norm"), _metrics(one, "grad_norm")
    np.testing.assert_allclose([norms_2[s] for s in steps], [norms_1[s] for s in steps], rtol=1e-5)
    # Host-side counts are global (summed over processes), not one process's share.
    assert _metrics(two, "tokens") == _metrics(one, "tokens") == dict.fromkeys(steps, 2 * 8 * 48)
    p2, p1 = _lora_params(two), _lora_params(one)
    assert p1.keys() == p2.keys() and len(p1) == 14
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], rtol=1e-4, atol=2e-5, err_msg=name)
    meta = json.loads((two / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["process_count"] == 2
    assert meta["data_states"] == [{"next_index": 4}, {"next_index": 4}]  # 2 steps x 2 micro
    # Only process 0 wrote reports: one start line, one line per step.
    events = [
        json.loads(line)["event"] for line in (two / "metrics.jsonl").read_text().splitlines()
    ]
    assert events == ["start"] + ["train"] * STEPS


def _resumable_copy(run_dir: Path, dst: Path, step: int) -> Path:
    """A copy of `run_dir` as if it had been stopped after checkpoint `step`."""
    shutil.copytree(run_dir, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)
    return dst


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    config, two, one, cache = runs
    resumed = _resumable_copy(two, tmp_path / "resumed", step=2)
    assert f"step {STEPS}/{STEPS}" in _one_process(config, resumed, cache)
    losses, want = _metrics(resumed, "loss"), _metrics(one, "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    # Steps 3-4 ran in one process from the 2-process state (parameters, AdamW moments,
    # dropout rng, data position): they match the straight single-process run.
    np.testing.assert_allclose([losses[3], losses[4]], [want[3], want[4]], rtol=1e-5)
    p, p1 = _lora_params(resumed), _lora_params(one)
    for name in p1:
        np.testing.assert_allclose(p[name], p1[name], rtol=1e-4, atol=2e-5, err_msg=name)


class _PerProcessPosition:
    """Synthetic batches whose position does not claim to be global (like grain's)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state):
        self.batches.set_state(state)


def test_per_process_data_position_is_refused_on_another_process_count(runs, tmp_path):
    from mllm_jax.foundation.config import load_config
    from mllm_jax.train.data import default_data

    config_path, two, _, _ = runs
    resumed = _resumable_copy(two, tmp_path / "resumed", step=2)
    config = load_config(TrainConfig, config_path, [f"run_dir={resumed}"])
    with pytest.raises(CheckpointMismatchError, match="written by 2 processes and this run has 1"):
        train(config, data_factory=lambda data, what: _PerProcessPosition(default_data(data, what)))


# ------------------------------------------------------------------ bounded failure

# Two processes in lockstep, like training: a cross-process reduction on the devices
# (gloo) and a host collective every tick; process 1 raises at tick FAIL_AT if given.
WORKER = """
import sys, time
from mllm_jax.foundation import distributed
distributed.initialize()
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
mesh = jax.make_mesh((jax.device_count(),), ("d",))
rows = jax.make_array_from_process_local_data(
    NamedSharding(mesh, PartitionSpec("d")), np.ones(jax.local_device_count(), np.float32)
)
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))
fail_at = int(sys.argv[1])
for tick in range(10**6):
    assert float(total(rows)) == jax.device_count()
    distributed.allgather_json(tick, "tick")
    print("tick", tick, flush=True)
    if tick == fail_at and jax.process_index() == 1:
        raise RuntimeError("process 1 fails")
    time.sleep(0.05)
"""


def _wait_for(predicate, processes, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert all(p.poll() is None for p in processes), f"a process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def _stop_times(processes, start: float, timeout: float = 120) -> list[float]:
    """Seconds from `start` until each process exited (all are killed after `timeout`)."""
    ended: list[float | None] = [None] * len(processes)
    deadline = time.monotonic() + timeout
    while None in ended and time.monotonic() < deadline:
        for i, p in enumerate(processes):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic() - start
        time.sleep(0.05)
    _finish(processes, timeout=0.1)
    return [timeout if t is None else t for t in ended]


# The default suite kills process 1 (process 0 must notice through missed heartbeats);
# the coordinator's host (0) and an exception are the slow variants.
@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_process_stops_the_others(tmp_path, victim):
    """SIGKILL one process (1: a worker, 0: the coordinator's host) while both are in
    lockstep: the other exits non-zero within the 10 s heartbeat timeout plus slack."""
    logs = str(tmp_path / "job")
    processes = _launch([sys.executable, "-c", WORKER, "-1"], logs)
    try:
        _wait_for(
            lambda: "tick 3" in _log(logs, 0) and "tick 3" in _log(logs, 1), processes, "ticks"
        )
        processes[victim].send_signal(signal.SIGKILL)
        stopped = _stop_times(processes, time.monotonic())
    finally:
        _finish(processes, timeout=0.1)
    survivor = processes[1 - victim]
    assert survivor.returncode != 0, _log(logs, 1 - victim)[-2000:]
    assert stopped[1 - victim] < 30, f"the survivor took {stopped[1 - victim]:.1f} s to stop"


@pytest.mark.slow
def test_a_failing_process_stops_the_others(tmp_path):
    """An exception in process 1: it reports it, waits at most the shutdown timeout for
    the others (here 10 s), and the whole job exits non-zero instead of hanging."""
    logs = str(tmp_path / "job")
    processes = _launch([sys.executable, "-c", WORKER, "3"], logs, MLLM_JAX_SHUTDOWN_TIMEOUT="10")
    try:
        _wait_for(lambda: "process 1 fails" in _log(logs, 1), processes, "the failure")
        stopped = _stop_times(processes, time.monotonic())
    finally:
        _finish(processes, timeout=0.1)
    assert "RuntimeError: process 1 fails" in _log(logs, 1)
    assert [p.returncode != 0 for p in processes] == [True, True]
    assert max(stopped) < 40, f"the job took {stopped} s to stop"


@pytest.mark.slow
def test_killing_a_training_process_stops_the_job(runs, tmp_path):
    """`mllm-jax train` on 2 processes, SIGKILL process 1 after a few steps: process 0
    (blocked in the next step's collectives) exits non-zero within the heartbeat bound."""
    config, _, _, _ = runs
    run_dir = tmp_path / "killed"
    command = _train_command(config, run_dir, "--set", "stages.0.steps=100000")
    processes = _launch(command, str(run_dir))
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
            processes,
            "training steps",
        )
        processes[1].send_signal(signal.SIGKILL)
        stopped = _stop_times(processes, time.monotonic())
    finally:
        _finish(processes, timeout=0.1)
    assert processes[0].returncode != 0
    assert stopped[0] < 30, f"process 0 took {stopped[0]:.1f} s to stop"
