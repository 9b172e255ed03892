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
