"""Stage data: a `DataConfig` -> an iterator of training batches.

The trainer takes any iterator of batch dicts (see `mllm_jax.train.batches`); iterators
with `get_state()`/`set_state()` (grain's, `SyntheticBatches`) are checkpointed and
resumed exactly. A run can also be given its own `DataFactory`.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mllm_jax.config import ConfigError, from_dict
from mllm_jax.train.config import DataConfig
from mllm_jax.train.synthetic import SyntheticBatches

Batches = Iterator[Mapping[str, Any]]
# (data selection, what it is for, e.g. "stage 'warmup'" or "validation") -> batches
DataFactory = Callable[[DataConfig, str], Batches]


def expand_shards(patterns: list[str], where: str) -> list[str]:
    """Shard paths from paths / glob patterns, in the given order (each glob sorted)."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"{where}: no task shard matches {pattern!r}")
        paths.extend(matches)
    return paths


def default_data(data: DataConfig, purpose: str) -> Batches:
    """Batches of `data`: the synthetic task, or task shards through the grain pipeline."""
    if data.kind == "synthetic":
        return SyntheticBatches(data.synthetic, data.seed)
    from mllm_jax.data.pipeline import PipelineConfig, build_pipeline

    try:
        pipeline = from_dict(PipelineConfig, data.pipeline, where="pipeline")
    except ConfigError as err:
        raise ConfigError(f"{purpose} data: {err}") from err
    dataset = build_pipeline(
        expand_shards(data.shards, f"{purpose} data"), pipeline, seed=data.seed
    )
    return iter(dataset)
