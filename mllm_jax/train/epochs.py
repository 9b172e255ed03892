"""Stage lengths given in epochs: passes over a stage's task shards, turned into steps.

    steps = ceil(epochs * tasks of this host / (rows per step * tasks per row))

Rows per step are `pipeline.batch_size * grad_accum` (per host; every host reads its
`index::count` share of the tasks). Without packing a row holds one task, as the
reference trains. With packing the tasks per row depend on the prompts' lengths, so they
are measured on the stage's first batches (the same seeded pipeline the stage reads) and
the estimate is printed with the result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np

from mllm_jax.runs.config import DataConfig, StageConfig, TrainConfig
from mllm_jax.train.data import expand_shards

SAMPLE_BATCHES = 8
"""Batches measured for the tasks per packed row."""


def tasks_on_this_host(paths: list[str], process_index: int, process_count: int) -> int:
    """Tasks in the shards that host `process_index` of `process_count` reads."""
    from array_record.python.array_record_module import ArrayRecordReader

    total = 0
    for path in paths:
        reader = ArrayRecordReader(path)
        try:
            total += reader.num_records()
        finally:
            reader.close()
    return len(range(process_index, total, process_count))


def tasks_per_row(batches) -> float:
    """Mean packed sequences per row over `SAMPLE_BATCHES` batches of an iterator."""
    counts = []
    for _ in range(SAMPLE_BATCHES):
        batch = next(batches)
        counts.extend(int(row.max()) for row in np.asarray(batch["segment_ids"]))
    return float(np.mean(counts))


def resolve_steps(
    config: TrainConfig,
    data_factory: Callable[[DataConfig, str], object],
    report: Callable[[str], None] = print,
) -> TrainConfig:
    """`config` with every stage given in epochs turned into steps (others unchanged);
    each conversion is reported in one line."""
    if all(stage.epochs is None for stage in config.stages):
        return config
    stages = []
    for stage in config.stages:
        if stage.epochs is None:
            stages.append(stage)
            continue
        where = f"stage {stage.name!r}"
        paths = expand_shards(stage.data.shards, f"{where} data")
        tasks = tasks_on_this_host(paths, jax.process_index(), jax.process_count())
        pipeline = stage.data.pipeline
        rows = int(pipeline.get("batch_size", 1)) * config.grad_accum
        if pipeline.get("packing", True):
            per_row = tasks_per_row(iter(data_factory(stage.data, f"{where} (epoch count)")))
            how = f"{per_row:.2f} tasks per packed row (measured on {SAMPLE_BATCHES} batches)"
        else:
            per_row, how = 1.0, "1 task per row (no packing)"
        steps = max(1, math.ceil(stage.epochs * tasks / (rows * per_row)))
        report(
            f"{where}: {stage.epochs:g} epoch(s) of {tasks:,} tasks on this host / "
            f"({rows} rows per step x {how}) = {steps:,} steps"
        )
        stages.append(_with_steps(stage, steps))
    return dataclasses.replace(config, stages=stages)


def _with_steps(stage: StageConfig, steps: int) -> StageConfig:
    return dataclasses.replace(stage, steps=steps, epochs=None)
