"""Data files shipped inside the package: the demo's config (demo.yaml) and the real
tables bundled for the demo and examples (see datasets/README.md)."""

from __future__ import annotations

from pathlib import Path


def bundled_datasets() -> Path:
    """The directory of the real tables bundled for the demo and examples (*.csv.gz)."""
    return Path(__file__).parent / "datasets"


def demo_config() -> Path:
    """The demo's settings (`mllm-jax demo` without --config; files given are laid over it)."""
    return Path(__file__).parent / "demo.yaml"
