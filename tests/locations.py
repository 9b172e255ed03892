"""Where the tests' inputs live, for test modules at any depth of `tests/`."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TABLES = TESTS / "tables"  # small real classification tables (gzipped CSV, `label` column)
FIXTURES = TESTS / "fixtures"  # reference outputs the tests compare against
TOOLS = REPO / "tools"
CONFIGS = REPO / "configs"
