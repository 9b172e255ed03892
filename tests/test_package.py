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


def test_test_modules_have_unique_names():
    """The test directories are not packages, so pytest imports each test file by its
    bare name: two files of one name in different directories fail collection."""
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    names = Counter(p.name for p in tests.rglob("test_*.py") if "fixtures" not in p.parts)
    assert not [n for n, count in names.items() if count > 1], names.most_common(3)
