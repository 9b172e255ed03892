"""tools/tpu_dry_run.py: the recipe's LoRA step compiles for TPU-slice-shaped meshes of
simulated CPU devices; the per-chip memory extrapolates linearly in the layer count."""

import json
import subprocess
import sys

import pytest
from locations import TOOLS

sys.path.insert(0, str(TOOLS))

from tpu_dry_run import TOPOLOGIES, extrapolate, per_device_gib


def _record(layers, argument, temp, output=0.5, alias=0.0):
    return {
        "layers": layers,
        "argument_gib": argument,
        "temp_gib": temp,
        "output_gib": output,
        "alias_gib": alias,
    }


def test_per_device_memory_and_the_linear_extrapolation():
    assert per_device_gib(_record(2, 1.0, 2.0, output=0.5, alias=0.25)) == 3.25
    two, four = _record(2, 1.0, 2.0), _record(4, 2.0, 3.0)  # 3.5 and 5.5 GiB
    estimate = extrapolate([four, two], full_layers=28, hbm_gib=16.0)
    assert estimate["per_device_gib_est"] == pytest.approx(3.5 + 1.0 * 26)
    assert not estimate["fits"] and estimate["method"] == "linear in layers from 2, 4"
    compiled = extrapolate([two, _record(28, 1.0, 2.0)], full_layers=28, hbm_gib=16.0)
    assert compiled["method"] == "compiled" and compiled["fits"]
    assert TOPOLOGIES["v5p-64"]["chips"] == 32  # v5p names count TensorCores, 2 per chip


@pytest.mark.slow
def test_the_step_compiles_for_an_8_chip_mesh():
    command = [sys.executable, str(TOOLS / "tpu_dry_run.py"), "--shape", "tiny", "--seq", "64"]
    command += ["--topology", "v5e-8", "--layers", "1", "2", "--grad-accum", "1", "--answer", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    compiled = [line for line in lines if "compile_s" in line]
    assert [line["layers"] for line in compiled] == [1, 2]
    assert all(line["devices"] == 8 and line["mesh"]["fsdp"] == 8 for line in compiled)
    assert lines[-1]["name"] == "tpu_dry_run" and lines[-1]["per_device_gib"]["v5e-8"] > 0
