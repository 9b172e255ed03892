"""tools/device_check.py --cpu-smoke: every GPU check runs at tiny shapes on the CPU, as
its own process, and prints a JSON line (ok, or skipped where the backend cannot exist on
a CPU) and a row of the closing table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import device_check  # noqa: E402

# Backends that need hardware a CPU machine has not got.
NEEDS_ACCELERATOR = {"attention:cudnn": "NVIDIA GPU", "attention:splash": "TPU"}


def test_cpu_smoke_runs_every_check(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "smoke.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools/device_check.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    records = {r["check"]: r for r in map(json.loads, lines)}
    assert out.read_text().splitlines() == lines  # --out holds the same JSON lines

    settings = device_check.parse_args(["--cpu-smoke"])[1]
    expected = ["env"] + [
        name for c in device_check.checks(settings) for name in (c.records or (c.name,))
    ]
    assert list(records) == expected
    for name, record in records.items():
        if name in NEEDS_ACCELERATOR:
            assert record["status"].startswith("skipped: "), record
            assert NEEDS_ACCELERATOR[name] in record["status"], record
        else:
            assert record["status"] == "ok", record
    # The numbers each check exists for.
    assert records["attention:xla"]["worst_out_rel"] <= records["attention:xla"]["attn_tol"]
    for shape in settings.train_shapes:
        xla = records[f"train_lora:{shape}"]["backends"]["xla"]
        assert xla["tokens_per_s"] > 0 and xla["flops_per_step"] > 0
        assert records[f"train_lora:{shape}"]["backends"]["cudnn"].startswith("skipped: ")
        torch_run = records[f"torch_lora:{shape}"]
        assert torch_run["tokens_per_s"] > 0 and torch_run["ratio"] > 0
        assert torch_run["seq"] == xla["seq"]
    assert records["prior"]["tasks_per_s"] > 0 and records["prior"]["programs"] >= 1
    infer = records["infer"]
    assert infer["max_prob_diff"] <= infer["tolerance"] and infer["rows_compared"] > 0
    assert infer["ours_rows_per_s"] > 0 and infer["torch_rows_per_s"] > 0

    table = result.stdout[result.stdout.index("| check | status |") :]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    assert [row.split(" | ")[0][2:] for row in rows] == expected
