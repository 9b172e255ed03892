"""The demo's config: every stage's settings in one strict dataclass tree.

    DemoConfig
      generate   prior settings, random-forest filter, the corpora (index ranges) to draw
      train      a whole `TrainConfig` (paths relative to the demo's output directory)
      export     dtype of the merged HF checkpoint
      eval       shots, seeds, baselines, real tables, held-out synthetic tables
      budgets    planned seconds per stage (printed beside the measured time)

The demo's values live in one file, the packaged `mllm_jax/assets/demo.yaml`
(`mllm-jax demo` without --config). The dataclasses below hold only neutral defaults (the
libraries' own: `PriorConfig()`, `FilterConfig()`, no held-out tables...) and require the
fields that file sets, so no value is written twice. Load it, with a file laid over it and
overrides, by `load_demo_config(path, ["train.stages.1.steps=40", ...])`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_jax.assets import demo_config
from mllm_jax.encoding.sampling import SamplingConfig
from mllm_jax.filtering.config import FilterConfig
from mllm_jax.foundation.config import (
    ConfigError,
    build_with_overrides,
    load_config,
    load_yaml,
    to_dict,
)
from mllm_jax.prior.config import PriorConfig
from mllm_jax.runs.config import DataConfig, TrainConfig

STAGES = ("generate", "train", "export", "eval", "report")
"""The demo's stages, in the order they run."""


@dataclass(frozen=True)
class CorpusConfig:
    """One range of task indices, generated (`mllm-jax generate --filter`) into
    `data/<name>/`: ArrayRecord shards of the accepted tasks and a manifest.

    Attributes:
        name: directory name under `data/`, also how train stages and eval refer to it.
        start: first task index (disjoint ranges never share a task).
        count: tasks drawn from the prior; only those the filter accepts are written.
        consensus: also compute the random-forest consensus row mask (warm-up corpus).
    """

    name: str
    start: int
    count: int
    consensus: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"corpus name {self.name!r} must be a plain directory name")
        if self.start < 0 or self.count < 1:
            raise ValueError(
                f"corpus {self.name!r}: need start >= 0 and count >= 1, got {self.start}, "
                f"{self.count}"
            )


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Synthetic tasks: prior -> random-forest filter -> task shards, per corpus.

    Attributes:
        seed: corpus seed; task i is a function of (seed, i) and the prior settings.
        batch_size: tasks per prior call (a fixed size compiles once).
        tasks_per_shard: records per ArrayRecord file.
        workers: filter processes (None: one per core).
        prior: `mllm_jax.prior.PriorConfig` fields (left out: the prior's defaults).
        filter: `mllm_jax.filtering.FilterConfig` fields (`consensus` is set per corpus).
        corpora: the index ranges to generate, each into its own directory.
    """

    seed: int
    batch_size: int
    tasks_per_shard: int
    workers: int | None = None
    prior: PriorConfig = field(default_factory=PriorConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    corpora: list[CorpusConfig]

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.tasks_per_shard < 1:
            raise ValueError("batch_size and tasks_per_shard must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1 or null, got {self.workers}")
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            raise ValueError(f"corpora: names must be unique, got {names}")
        spans = sorted((c.start, c.start + c.count, c.name) for c in self.corpora)
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                raise ValueError(f"corpora {a!r} and {b!r} overlap: they would share tasks")


@dataclass(frozen=True)
class ExportConfig:
    """dtype: of the merged HF safetensors (None: the training base's, float32 here)."""

    dtype: str | None = None


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The final evaluation, baselines against the exported model.

    Attributes:
        shots: shot counts (the same for every table).
        seeds: shot-draw seeds.
        methods: baselines of `mllm_jax.eval` (rf, knn, xgb, lr, majority).
        datasets: real tables (CSV files, directories, scikit-learn names); empty: the
            three tables bundled with the package.
        heldout: the corpus whose accepted tasks become held-out synthetic tables (None:
            none).
        heldout_tables: how many of them are evaluated.
        max_test: at most this many test rows per table (stratified), for time (None:
            all of the split's test rows).
        model_options: `MLLMClassifier` options for the exported model.
        permuted_shots: also score the model fitted on shot labels shuffled among the
            shots (method `mllm_permuted`): it must lose accuracy if it reads its shots.
    """

    shots: list[int]
    seeds: list[int]
    methods: list[str]
    datasets: list[str] = field(default_factory=list)
    heldout: str | None = None
    heldout_tables: int = 0
    max_test: int | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    permuted_shots: bool = False

    def __post_init__(self) -> None:
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots must be a non-empty list of counts >= 1, got {self.shots}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is required")
        if self.heldout_tables < 0:
            raise ValueError(f"heldout_tables must be >= 0, got {self.heldout_tables}")
        if self.max_test is not None and self.max_test < 1:
            raise ValueError(f"max_test must be >= 1 or null, got {self.max_test}")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The whole demo (see the module docstring).

    Relative paths in `train` (run_dir, shard patterns) are relative to the demo's output
    directory; the corpora of `generate` are written to `<out>/data/<name>/`.

    Attributes:
        budgets: planned seconds per stage, printed beside the measured time.
        compilation_cache: keep compiled XLA programs in `<out>/.jax_cache` (fast reruns).
    """

    generate: GenerateConfig
    train: TrainConfig
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig
    budgets: dict[str, float]
    compilation_cache: bool

    def __post_init__(self) -> None:
        unknown = sorted(set(self.budgets) - set(STAGES))
        if unknown:
            raise ValueError(f"budgets: unknown stages {unknown}; stages are {list(STAGES)}")
        negative = [k for k, v in self.budgets.items() if v <= 0]
        if negative:
            raise ValueError(f"budgets: must be positive seconds, got {negative}")
        corpora = {c.name for c in self.generate.corpora}
        if self.eval.heldout is not None and self.eval.heldout not in corpora:
            raise ValueError(
                f"eval.heldout: no corpus named {self.eval.heldout!r} in generate.corpora "
                f"({sorted(corpora)})"
            )
        for where, data in _train_data(self.train):
            if data.kind != "shards":
                continue
            for pattern in data.shards:
                corpus = _corpus_of(pattern)
                if corpus is not None and Path(pattern).parts[2:] == ():
                    raise ValueError(
                        f"train.{where}: {pattern!r} names the corpus directory; the demo "
                        f"reads its shards by pattern: 'data/{corpus}/*.array_record'"
                    )
                if corpus is not None and corpus not in corpora:
                    raise ValueError(
                        f"train.{where}: {pattern!r} reads corpus {corpus!r}, which "
                        f"generate.corpora does not make ({sorted(corpora)})"
                    )
            # Prompts show up to the prior's classes; a lower sampling limit would stop
            # training at the first such task, so say so at load.
            sampling = data.pipeline.get("sampling") or {}
            limit = sampling.get("max_classes", SamplingConfig().max_classes)
            if any(_corpus_of(p) for p in data.shards) and self.generate.prior.max_classes > limit:
                raise ValueError(
                    f"train.{where}.pipeline.sampling.max_classes is {limit}, below "
                    f"generate.prior.max_classes={self.generate.prior.max_classes}: prompts of "
                    f"tasks with more classes cannot be encoded; set it to "
                    f"{self.generate.prior.max_classes}"
                )


def _train_data(train: TrainConfig) -> list[tuple[str, DataConfig]]:
    out = [(f"stages[{i}].data", s.data) for i, s in enumerate(train.stages)]
    if train.validation.data is not None:
        out.append(("validation.data", train.validation.data))
    return out


def _corpus_of(pattern: str) -> str | None:
    """The corpus a relative `data/<corpus>/...` shard pattern reads, else None."""
    parts = Path(pattern).parts
    if len(parts) >= 2 and parts[0] == "data" and not Path(pattern).is_absolute():
        return parts[1]
    return None


def load_demo_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> DemoConfig:
    """The demo config: the packaged `demo.yaml`, an optional YAML file laid over it, then
    `dotted.key=value` overrides.

    The file is laid over the packaged settings: mappings merge key by key, any other
    value (lists included) replaces the packaged one, so a file may hold only what it
    changes. Overrides then apply to the result (`train.stages.1.steps=40` indexes the
    packaged list). A key the dataclasses do not know, a value of the wrong type or a
    failed check raises `ConfigError` naming the key (and the file).
    """
    # Built first, then flattened: the full tree (every field, defaults included) is what
    # a file merges into and what overrides index, as for any other config.
    data = to_dict(load_config(DemoConfig, demo_config()))
    if path is not None:
        data = _merge(data, load_yaml(path))
    return build_with_overrides(DemoConfig, data, overrides, path)


def _merge(base: Any, top: Any) -> Any:
    if isinstance(base, dict) and isinstance(top, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in top.items()}}
    return top


def resolve_paths(config: DemoConfig, out: Path) -> TrainConfig:
    """`config.train` with its run directory and shard patterns under `out`."""

    def under(path: str) -> str:
        return path if Path(path).is_absolute() else str(out / path)

    def data(d: DataConfig | None) -> DataConfig | None:
        if d is None or d.kind != "shards":
            return d
        return dataclasses.replace(d, shards=[under(p) for p in d.shards])

    train = config.train
    stages = [dataclasses.replace(s, data=data(s.data)) for s in train.stages]
    validation = dataclasses.replace(train.validation, data=data(train.validation.data))
    checkpoint = train.checkpoint
    if checkpoint.directory is not None and "://" not in checkpoint.directory:
        checkpoint = dataclasses.replace(checkpoint, directory=under(checkpoint.directory))
    return dataclasses.replace(
        train,
        run_dir=under(train.run_dir),
        stages=stages,
        validation=validation,
        checkpoint=checkpoint,
    )


__all__ = [
    "STAGES",
    "ConfigError",
    "CorpusConfig",
    "DemoConfig",
    "EvalConfig",
    "ExportConfig",
    "GenerateConfig",
    "load_demo_config",
    "resolve_paths",
]
