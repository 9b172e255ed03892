"""The docs cite only what exists: file paths and test names in README.md and docs/*.md
are in the repository, and every tool they name answers --help."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A repository path in backticks or a markdown link: tests/..., tools/..., configs/...,
# docs/..., mllm_jax/...; globs and placeholders are left out.
PATH = re.compile(
    r"(?<![\w/.-])((?:tests|tools|configs|docs|mllm_jax)/[\w./-]+\.(?:py|yaml|md|png))"
)
TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def cited(pattern: re.Pattern[str]) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for doc in DOCS:
        for match in pattern.finditer(doc.read_text()):
            out.append((doc.name, match.groups()))
    return out


def test_cited_paths_exist():
    missing = sorted(
        {f"{doc}: {path}" for doc, (path,) in cited(PATH) if not (ROOT / path).exists()}
    )
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_cited_tests_exist():
    missing = []
    for doc, (path, name) in cited(TEST):
        source = ROOT / path
        if not source.exists() or not re.search(rf"def {name}\b", source.read_text()):
            missing.append(f"{doc}: {path}::{name}")
    assert not missing, "cited tests that do not exist:\n" + "\n".join(sorted(set(missing)))


TOOLS = sorted({path for _, (path,) in cited(PATH) if path.startswith("tools/")})


@pytest.mark.parametrize("tool", TOOLS)
def test_cited_tools_answer_help(tool):
    result = subprocess.run(
        [sys.executable, str(ROOT / tool), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
