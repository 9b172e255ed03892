"""Data files shipped inside the package (see datasets/README.md)."""

from __future__ import annotations

from pathlib import Path


def bundled_datasets() -> Path:
    """The directory of the real tables bundled for the demo and examples (*.csv.gz)."""
    return Path(__file__).parent / "datasets"
