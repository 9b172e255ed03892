"""The demo's config: every stage's settings in one strict dataclass tree.

    DemoConfig
      generate   prior settings, random-forest filter, the corpora (index ranges) to draw
      train      a whole `TrainConfig` (paths relative to the demo's output directory)
      export     dtype of the merged HF checkpoint
      eval       shots, seeds, baselines, real tables, held-out synthetic tables
      budgets    planned seconds per stage (printed beside the measured time)

The defaults here are the demo (`mllm-jax demo` without --config); `configs/demo.yaml`
spells the same values out (a test keeps the two equal). Load a file with
`load_demo_config(path, ["train.stages.1.steps=40", ...])`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_jax.config import ConfigError, build_with_overrides, load_yaml, to_dict
from mllm_jax.filtering.config import FilterConfig
from mllm_jax.prior.config import PriorConfig
from mllm_jax.train.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    StageConfig,
    TrainConfig,
    ValidationConfig,
)

STAGES = ("generate", "train", "export", "eval", "report")
"""The demo's stages, in the order they run."""

# Qwen2.5's tokenizer: the tiny model must hold its ids (151,665 tokens; Qwen2.5 pads the
# embedding to 151,936) and use its special tokens.
QWEN_VOCAB = 151936
QWEN_PAD = 151643  # <|endoftext|>
QWEN_EOS = 151645  # <|im_end|>


@dataclass(frozen=True)
class CorpusConfig:
    """One range of task indices, filtered into `data/<name>/` as ArrayRecord shards.

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


@dataclass(frozen=True)
class GenerateConfig:
    """Synthetic tasks: prior -> random-forest filter -> task shards.

    Attributes:
        seed: corpus seed; task i is a function of (seed, i) and the prior settings.
        batch_size: tasks per prior call (a fixed size compiles once).
        tasks_per_shard: records per ArrayRecord file.
        workers: filter processes (None: one per core).
        prior: `mllm_jax.prior.PriorConfig` fields.
        filter: `mllm_jax.filtering.FilterConfig` fields (`consensus` is set per corpus).
        corpora: the index ranges to generate, each into its own directory.
    """

    seed: int = 0
    batch_size: int = 64
    tasks_per_shard: int = 1000
    workers: int | None = None
    prior: PriorConfig = field(
        default_factory=lambda: PriorConfig(
            rows=512, min_features=4, max_features=10, max_classes=5, max_hidden=64, widths=(64,)
        )
    )
    filter: FilterConfig = field(default_factory=FilterConfig)
    corpora: list[CorpusConfig] = field(
        default_factory=lambda: [
            CorpusConfig("warmup", start=0, count=64, consensus=True),
            CorpusConfig("full", start=64, count=256),
            CorpusConfig("heldout", start=1_000_000, count=64),
        ]
    )

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


@dataclass(frozen=True)
class EvalConfig:
    """The final evaluation, baselines against the exported model.

    Attributes:
        shots: shot counts (the same for every table).
        seeds: shot-draw seeds.
        methods: baselines of `mllm_jax.eval` (rf, knn, xgb, lr, majority).
        datasets: real tables (CSV files, directories, scikit-learn names); empty: the
            three tables bundled with the package.
        heldout: the corpus whose accepted tasks become held-out synthetic tables.
        heldout_tables: how many of them are evaluated.
        max_test: at most this many test rows per table (stratified), for time.
        model_options: `MLLMClassifier` options for the exported model.
        permuted_shots: also score the model fitted on shot labels shuffled among the
            shots (method `mllm_permuted`): it must lose accuracy if it reads its shots.
    """

    shots: list[int] = field(default_factory=lambda: [8, 32, 128])
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["rf", "knn", "xgb", "lr", "majority"])
    datasets: list[str] = field(default_factory=list)
    heldout: str | None = "heldout"
    heldout_tables: int = 4
    max_test: int | None = 100
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


def _default_budgets() -> dict[str, float]:
    # Planned seconds on 2 idle CPU cores; the whole demo must stay under 600.
    return {"generate": 120.0, "train": 150.0, "export": 20.0, "eval": 180.0, "report": 15.0}


def _shards(corpus: str, seed: int, consensus_only: bool = False) -> DataConfig:
    sampling: dict[str, Any] = {
        "min_shots": 8,
        "max_shots": 64,
        "max_queries": 4,
        "token_budget": 1024,
    }
    if consensus_only:
        sampling["consensus_only"] = True
    return DataConfig(
        kind="shards",
        shards=[f"data/{corpus}/*.array_record"],
        seed=seed,
        pipeline={"sampling": sampling, "seq_len": 1024, "batch_size": 2, "packing_bins": 4},
    )


def _default_train() -> TrainConfig:
    # A 2-layer Qwen2 with hidden size 64 and Qwen2.5's vocabulary, trained from random
    # init in full fine-tuning mode (a LoRA on frozen random weights learns little).
    # Sequences of <= 1024 tokens (>= ~450 each, so <= 2 per packed row) with <= 4
    # queries of 12 answer tokens + <|im_end|>: <= 100 answer tokens per row.
    return TrainConfig(
        run_dir="train",
        mode="full",
        model=ModelConfig(
            preset="tiny",
            overrides={
                "vocab_size": QWEN_VOCAB,
                "tie_word_embeddings": True,
                "max_position_embeddings": 32768,
                "bos_token_id": QWEN_PAD,
                "eos_token_id": QWEN_EOS,
                "pad_token_id": QWEN_PAD,
            },
            compute_dtype="float32",
        ),
        stages=[
            StageConfig("warmup", 1e-2, 40, _shards("warmup", 1, consensus_only=True)),
            StageConfig("full", 5e-3, 120, _shards("full", 2)),
        ],
        validation=ValidationConfig(every=40, batches=2, data=_shards("heldout", 99)),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        remat="none",
        max_answer_tokens=104,
        checkpoint=CheckpointConfig(every=20, keep=2),
        logging=LoggingConfig(every=5),
    )


@dataclass(frozen=True)
class DemoConfig:
    """The whole demo (see the module docstring).

    Relative paths in `train` (run_dir, shard patterns) are relative to the demo's output
    directory; the corpora of `generate` are written to `<out>/data/<name>/`.
    """

    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=_default_train)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    budgets: dict[str, float] = field(default_factory=_default_budgets)
    compilation_cache: bool = True

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
    """The demo config from an optional YAML file plus `dotted.key=value` overrides.

    The file is laid over the demo's defaults: mappings merge key by key, any other
    value (lists included) replaces the default, so a file may hold only what it
    changes. Overrides then apply to the result (`train.stages.1.steps=40` indexes the
    default list). A key the dataclasses do not know, a value of the wrong type or a
    failed check raises `ConfigError` naming the key (and the file).
    """
    data = to_dict(DemoConfig())
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
