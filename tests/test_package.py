import subprocess
import sys

import mllm_jax


def test_version_command_matches_package():
    out = subprocess.run(
        [sys.executable, "-m", "mllm_jax.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"mllm-jax {mllm_jax.__version__}"


def test_code_is_ruff_clean():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(root)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
