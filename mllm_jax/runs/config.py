"""The training run config: one dataclass tree, loaded with `mllm_jax.foundation.config.load_config`.

    TrainConfig
      model         base checkpoint (or a preset for a random-init base), dtypes, attention
      mode          "lora" (only adapter weights train) | "full" (every parameter trains)
      optimizer     AdamW + warmup-cosine + global-norm clipping (shared by all stages)
      stages        the curriculum: each stage its own data, steps and peak learning rate
      validation    held-out batches, how often, best-checkpoint tracking
      mesh, rules   device mesh sizes and logical-axis overrides
      checkpoint    orbax: every N steps, keep K, async
      logging       JSON-lines metrics and the progress bar

Compatibility of a checkpoint with a config is decided by `resume_fingerprint`: the
fields that change what is trained or how (model, mode, optimizer, stages, seed, ...);
paths, logging, mesh and checkpoint cadence may change between runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mllm_jax.foundation.config import to_dict
from mllm_jax.model.lora import LoRAConfig
from mllm_jax.model.sharding import LOGICAL_AXIS_NAMES, ShardingRules

# Per-layer remat policy names (mllm_jax.model.config.REMAT_NAMES).
RematPolicy = Literal[
    "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"
]


@dataclass(frozen=True)
class ModelConfig:
    """Which model trains and in which dtypes.

    Attributes:
        base: an HF Qwen2 checkpoint directory. None: a random-init model of `preset`
            (with `overrides`), saved once into the run directory as an HF checkpoint so
            a resumed run re-reads the very same base.
        preset: `mllm_jax.model.preset` name used when `base` is None.
        overrides: Qwen2Config field overrides for the preset (e.g. num_hidden_layers).
        adapter: a PEFT LoRA adapter directory to continue training (mode "lora") instead
            of fresh adapters; its r / lora_alpha / lora_dropout must equal `lora`'s.
        init_seed: PRNG seed of the random-init base.
        master_dtype: storage of the trainable parameters (and of AdamW's moments).
        frozen_dtype: storage of frozen base weights in LoRA mode.
        compute_dtype: activations and matmul inputs (matmuls accumulate in float32).
        attention_backend: "xla" | "cudnn" | "splash" (see mllm_jax.model.attention).
        attention_query_chunk: queries per block of the dense attention.
    """

    base: str | None = None
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    init_seed: int = 0
    master_dtype: str = "float32"
    frozen_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    attention_backend: str = "xla"
    attention_query_chunk: int = 512


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, after global-norm clipping.

    The peak learning rate belongs to each stage; the schedule restarts in every stage
    (the reference runs each stage as a new LLaMA-Factory job from the previous adapter).
    Weight decay applies to matrices only (not biases, norm scales).
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or null, got {self.clip_norm}")


@dataclass(frozen=True)
class SyntheticConfig:
    """The learnable synthetic sequence task of `mllm_jax.train.synthetic`."""

    batch_size: int = 4
    seq_len: int = 64
    vocab_size: int = 512
    num_keys: int = 32
    num_values: int = 16
    min_pairs: int = 3
    max_pairs: int = 8
    queries: int = 3
    in_context: bool = False


@dataclass(frozen=True)
class DataConfig:
    """One stage's data selection.

    Attributes:
        kind: "synthetic" (the learnable toy task; tests, demos, benchmarks) or "shards"
            (ArrayRecord task shards through `mllm_jax.data.pipeline`).
        shards: shard paths or glob patterns (kind "shards").
        pipeline: `mllm_jax.data.pipeline.PipelineConfig` fields (kind "shards").
        synthetic: the toy task's settings (kind "synthetic").
        seed: data seed (shuffling, sampling); each stage and the validation set should
            use their own.
    """

    kind: Literal["synthetic", "shards"] = "synthetic"
    shards: list[str] = field(default_factory=list)
    pipeline: dict[str, Any] = field(default_factory=dict)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind == "shards" and not self.shards:
            raise ValueError("data.kind is 'shards' but data.shards lists no files")
        if self.kind == "synthetic" and (self.shards or self.pipeline):
            # kind defaults to synthetic: shards given without it were silently ignored
            # and the run trained on the toy task.
            given = " and ".join(k for k in ("shards", "pipeline") if getattr(self, k))
            raise ValueError(
                f"data.{given} given but data.kind is 'synthetic' (the default), which "
                "ignores them; set data.kind: shards"
            )


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage: trains `steps` optimizer steps on `data` at peak `learning_rate`,
    starting from the previous stage's trainable parameters (fresh optimizer state).

    `epochs` instead of `steps`: passes over the stage's task shards, turned into steps at
    the start of training (`train.epochs.resolve_steps`: tasks / tasks per step) and printed.
    """

    name: str
    learning_rate: float
    steps: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    epochs: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"stage {self.name!r}: give exactly one of steps and epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.epochs is not None:
            if self.epochs <= 0:
                raise ValueError(f"stage {self.name!r}: epochs must be > 0, got {self.epochs}")
            if self.data.kind != "shards":
                raise ValueError(f"stage {self.name!r}: epochs need task shards (data.kind)")
        if self.learning_rate < 0:
            raise ValueError(f"stage {self.name!r}: learning_rate must be >= 0")

    @property
    def length(self) -> int:
        """The stage's steps; an error while they are still given in epochs."""
        if self.steps is None:
            raise ValueError(
                f"stage {self.name!r} is given in epochs; resolve its steps first "
                "(mllm_jax.train.epochs.resolve_steps)"
            )
        return self.steps


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out evaluation: every `every` steps (0: never) on the first `batches` batches of
    `data` (the same batches each time); the best (lowest loss) trainable parameters are
    kept in `<run>/best`."""

    every: int = 0
    batches: int = 4
    data: DataConfig | None = None

    def __post_init__(self) -> None:
        if self.every < 0 or self.batches < 1:
            raise ValueError(f"need every >= 0 and batches >= 1, got {self.every}, {self.batches}")
        if self.every and self.data is None:
            raise ValueError("validation.every > 0 needs validation.data")


@dataclass(frozen=True)
class ShotLabelConfig:
    """The shot-label auxiliary loss (off by default: the paper trains on answers only).

    Every shot's label token is predicted from its features and the shots before it,
    scored among the label candidates only (`label_token_ids`, the digits). This gives a
    label signal per shot instead of per query: the in-context curve itself.

    Attributes:
        weight: the term's weight beside the answer loss (0: not trained on; its numbers
            are still measured in validation).
        max_per_row: shot-label slots scored per batch row (static; more are cut).
        label_token_ids: the label candidates; None = Qwen2's digit tokens '0'..'9'.
    """

    weight: float = 0.0
    max_per_row: int = 256
    label_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"shot_labels.weight must be >= 0, got {self.weight}")
        if self.max_per_row < 1:
            raise ValueError(f"shot_labels.max_per_row must be >= 1, got {self.max_per_row}")


@dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes (one may be -1: the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: every `every` steps (and at the end of each stage), keep the
    newest `keep`; `directory` defaults to `<run>/checkpoints` (any orbax path, e.g.
    gs://...). `resume`: "auto" continues from the newest checkpoint if there is one,
    "never" refuses a directory that holds checkpoints."""

    every: int = 100
    keep: int = 3
    async_save: bool = True
    directory: str | None = None
    resume: Literal["auto", "never"] = "auto"

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"need every >= 1 and keep >= 1, got {self.every}, {self.keep}")


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics every `every` steps to `<run>/metrics.jsonl`; a rich progress bar.
    `peak_flops_per_device`: for MFU; None looks the device kind up (no MFU on CPU)."""

    every: int = 1
    progress: bool = True
    peak_flops_per_device: float | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"logging.every must be >= 1, got {self.every}")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run (see the module docstring).

    Attributes:
        run_dir: where the resolved config, metrics, checkpoints and the base copy go.
        max_answer_tokens: static budget of answer (loss) tokens per batch row: the LM
            head runs on exactly this many gathered positions per row. A row with more
            answer tokens is an error (never silently truncated).
        grad_accum: micro-batches (iterator batches) per optimizer step.
        remat: per-layer rematerialisation: "full" recomputes each decoder layer in the
            backward pass, "none" keeps every activation, "dots_saveable" keeps the matmul
            outputs, "dots_with_no_batch_dims_saveable" the projections' outputs only
            (`mllm_jax.model.qwen2`).
        rules: logical axis -> mesh axes overrides of `ShardingRules.default()`.
        lora: adapter rank, alpha, dropout and target patterns (mode "lora").
        shot_labels: the shot-label auxiliary loss (off by default).
        seed: PRNG seed of the adapter init, the step keys (dropout), everything not data.
    """

    run_dir: str = "runs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    mode: Literal["lora", "full"] = "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    stages: list[StageConfig] = field(
        default_factory=lambda: [StageConfig(name="main", learning_rate=1e-3, steps=100)]
    )
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rules: dict[str, str | list[str] | None] = field(default_factory=dict)
    remat: RematPolicy = "full"
    grad_accum: int = 1
    max_answer_tokens: int = 256
    shot_labels: ShotLabelConfig = field(default_factory=ShotLabelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: at least one stage is required")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        if self.model.adapter is not None and self.mode != "lora":
            raise ValueError("model.adapter (a PEFT adapter to continue) needs mode 'lora'")
        unknown = sorted(set(self.rules) - set(LOGICAL_AXIS_NAMES))
        if unknown:
            raise ValueError(
                f"rules: no logical axis {unknown[0]!r}; known: {', '.join(LOGICAL_AXIS_NAMES)}"
            )

    def sharding_rules(self) -> ShardingRules:
        """The default sharding rules with this config's `rules` overrides."""
        return ShardingRules.default().replace(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in self.rules.items()}
        )

    @property
    def total_steps(self) -> int:
        return sum(s.length for s in self.stages)

    def stage_bounds(self) -> list[tuple[int, int]]:
        """[start, end) global optimizer steps of each stage."""
        bounds, start = [], 0
        for stage in self.stages:
            bounds.append((start, start + stage.length))
            start += stage.length
        return bounds


# Fields a resumed run may change: where things go and how they are reported, memory
# trade-offs that compute the same values, and the mesh (orbax reshards on restore;
# results then match only up to float reassociation).
_RESUME_FREE = (
    "run_dir",
    "validation",
    "mesh",
    "rules",
    "remat",
    "max_answer_tokens",
    "checkpoint",
    "logging",
)


def resume_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The plain-data subset of `config` that a checkpoint must agree with to resume."""
    data = to_dict(config)
    for name in _RESUME_FREE:
        data.pop(name)
    for stage in data["stages"]:
        if stage.get("epochs") is None:  # runs from before epochs existed still resume
            stage.pop("epochs", None)
    return data


def fingerprint_differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Dotted keys at which two fingerprints differ (with both values)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{where}.{key}" if where else str(key)
            if key not in saved or key not in current:
                out.append(f"{sub}: only in {'checkpoint' if key in saved else 'config'}")
            else:
                out.extend(fingerprint_differences(saved[key], current[key], sub))
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        out = []
        for i, (a, b) in enumerate(zip(saved, current, strict=True)):
            out.extend(fingerprint_differences(a, b, f"{where}[{i}]"))
        return out
    return [] if saved == current else [f"{where}: checkpoint {saved!r}, config {current!r}"]


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(config, **changes)
