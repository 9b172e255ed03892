"""`generate` killed with SIGKILL: no worker of it outlives it, and reruns finish the very
corpus an uninterrupted run writes (byte for byte)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fake_prior import FILTER, fake_batches, records
from locations import TESTS

from mllm_jax.data.generate import GenerateConfig, generate

CONFIG = {"seed": 3, "start": 0, "count": 240, "shard_size": 4, "batch_size": 8, "workers": 2}

# The child: the fake prior, slowed so that a kill lands mid-run, and a 2-worker filter pool.
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from mllm_jax.data.generate import GenerateConfig, generate
from fake_prior import FILTER, fake_batches

def slow(*args):
    for batch in fake_batches(*args):
        time.sleep(0.05)
        yield batch

generate(GenerateConfig(filter=FILTER, **{config!r}), {out!r}, progress=False, batches=slow)
"""


def _marked(mark: str) -> list[int]:
    """Processes (not zombies) whose environment carries ``mark``: the child and every
    process it started, however they were started (forkserver, spawn)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark.encode() not in (proc / "environ").read_bytes():
                continue
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(proc.name))
    return found


def _kill_mid_run(out: Path, rng: random.Random) -> None:
    mark = f"MLLM_JAX_KILL_TEST={uuid.uuid4().hex}"
    env = {**os.environ, mark.split("=")[0]: mark.split("=")[1]}
    code = CHILD.format(tests=str(TESTS), config=CONFIG, out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    # Kill once this run has written a journal of its own, after a random extra moment.
    before = (
        (out / ".journal-p00000.json").stat().st_mtime_ns
        if (out / ".journal-p00000.json").exists()
        else None
    )
    while time.monotonic() < deadline and child.poll() is None:
        journal = out / ".journal-p00000.json"
        if journal.exists() and journal.stat().st_mtime_ns != before:
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    assert child.poll() is None, "the run ended before it could be killed"
    assert len(_marked(mark.split("=")[1])) >= 3  # the child, its filter workers (and forkserver)
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 15
    while _marked(mark.split("=")[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(mark.split("=")[1]) == [], "processes outlived the killed generate"


@pytest.mark.parametrize("kills", [1, pytest.param(8, marks=pytest.mark.slow)])
def test_killed_generate_leaves_no_process_and_resumes_byte_for_byte(tmp_path, kills):
    straight = generate(
        GenerateConfig(filter=FILTER, **CONFIG), tmp_path / "straight", progress=False,
        batches=fake_batches,
    )  # fmt: skip
    out = tmp_path / "killed"
    rng = random.Random(kills)
    nexts = []
    for _ in range(kills):
        _kill_mid_run(out, rng)
        nexts.append(json.loads((out / ".journal-p00000.json").read_text())["next_index"])
        if nexts[-1] >= CONFIG["count"] - 40:
            break
    resumed = generate(
        GenerateConfig(filter=FILTER, **CONFIG), out, progress=False, batches=fake_batches
    )
    assert nexts == sorted(nexts) and nexts[0] > 0  # every kill kept the work before it
    assert resumed["resumed_at"] == nexts[-1]
    assert records(out) == records(tmp_path / "straight")
    for key in ("tasks_written", "invalid_indices", "rejected_by_reason", "shards"):
        assert resumed[key] == straight[key], key


def test_a_killed_unreaped_process_counts_as_gone():
    from mllm_jax.foundation.processes import is_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert is_alive(child.pid)
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_alive(child.pid) and time.monotonic() < deadline:  # a zombie until waited for
        time.sleep(0.05)
    assert not is_alive(child.pid)
    child.wait()
    assert not is_alive(child.pid)
