"""The training run: base model -> curriculum stages -> checkpoints, metrics, validation.

    train(config)           runs (or resumes) `config.run_dir`
    load_trained(run_dir)   the model with the trained parameters of a run (for export)

Run directory:

    config.yaml       the resolved config
    base/, base.json  the random-init base as an HF checkpoint (when model.base is None)
    checkpoints/      orbax steps (newest `checkpoint.keep`), see `checkpoint`
    best/             the best validation step's trainable parameters
    metrics.jsonl     one JSON object per logged step / validation

Resuming re-reads the base, restores the trainable parameters, optimizer state, step and
data-iterator position of the newest checkpoint and continues; on the same backend,
mesh and jax version the result is bitwise the run that was never interrupted.

Multi-host (`mllm_jax.train.distributed`): every process runs `train` with the same
config; each feeds its own rows of the global batch (`mllm_jax.train.data`), orbax saves
and restores collectively, process 0 alone writes config.yaml, metrics and the random
base. Decisions that must agree (resume or not, the base identity) are taken once and
shared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

from mllm_jax.config import ConfigError, load_config, save_config, to_dict
from mllm_jax.encoding.tokens import QWEN2_DIGIT_IDS
from mllm_jax.model import Qwen2ForCausalLM, init_model, load_hf, preset, save_hf
from mllm_jax.model.config import Qwen2Config
from mllm_jax.train import distributed, flops
from mllm_jax.train.batches import BatchError, next_batches, to_device
from mllm_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointReadError,
    abstract_like,
    base_identity,
    check_compatible,
    failure_line,
    silence_closed_loop_callbacks,
)
from mllm_jax.train.config import StageConfig, TrainConfig, resume_fingerprint
from mllm_jax.train.data import (
    DataFactory,
    check_process_rows,
    check_task_overlap,
    data_position,
    default_data,
    restore_positions,
)
from mllm_jax.train.epochs import resolve_steps
from mllm_jax.train.interrupt import StopOnInterrupt
from mllm_jax.train.label_metrics import label_metrics, label_slots, shot_metrics, shot_slots
from mllm_jax.train.mesh import ShardingRules, make_mesh
from mllm_jax.train.metrics import MetricsLog, is_main_process, progress_bar
from mllm_jax.train.optim import learning_rate, make_optimizer
from mllm_jax.train.state import (
    SplitModel,
    count_params,
    init_optimizer,
    optimizer_shardings,
    split_model,
)
from mllm_jax.train.step import ShotLabels, make_eval_step, make_train_step, sums_metrics

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class TrainResult:
    """What a `train` call did: the last completed global step, the metric records it
    wrote (train and validation), the best validation so far, and the final model split
    (`split.trainable` holds the trained parameters)."""

    step: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    run_dir: Path
    split: SplitModel
    model_config: Qwen2Config
    total_steps: int  # of the whole curriculum (stages in epochs resolved)


# ------------------------------------------------------------------------- model setup


def _mesh_and_rules(config: TrainConfig) -> tuple[jax.sharding.Mesh, ShardingRules]:
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = ShardingRules.default().replace(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.rules.items()}
    )
    return mesh, rules


def _random_base_config(config: TrainConfig) -> Qwen2Config:
    m = config.model
    return preset(m.preset, **{**m.overrides, "param_dtype": m.master_dtype})


def prepare_base(config: TrainConfig, run_dir: Path) -> Path:
    """The base checkpoint directory: `model.base`, or a random-init model of the preset
    saved once into `<run_dir>/base` (refusing one made from other settings).

    Multi-host: process 0 alone makes the random base; the others must then see it
    (run_dir on a shared filesystem), else FileNotFoundError. Collective."""
    if config.model.base is not None:
        base = Path(config.model.base)
        if not (base / "config.json").is_file():
            raise FileNotFoundError(
                f"model.base {base}: no HF checkpoint (config.json) there"
                + (f" on process {jax.process_index()}" if jax.process_count() > 1 else "")
            )
        return base
    base = run_dir / "base"
    problem = distributed.broadcast_json(
        _make_random_base(config, run_dir) if distributed.is_main() else None, "random base"
    )
    if problem is not None:
        raise CheckpointMismatchError(problem)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{base}: process {jax.process_index()} cannot see the random-init base that "
            "process 0 wrote; in a multi-host run, run_dir must be on a filesystem all "
            "hosts share (or set model.base to a checkpoint present on every host)"
        )
    return base


def _make_random_base(config: TrainConfig, run_dir: Path) -> str | None:
    """Writes the random-init base unless the run already has it; the reason it cannot
    be used, or None."""
    base, record = run_dir / "base", run_dir / "base.json"
    wanted = {
        "preset": config.model.preset,
        "overrides": to_dict(config.model.overrides),
        "init_seed": config.model.init_seed,
        "dtype": config.model.master_dtype,
    }
    if record.exists():
        made = json.loads(record.read_text())
        if made != wanted:
            return (
                f"{base} is a random-init base made from {made}, this config asks for "
                f"{wanted}; use another run_dir"
            )
        return None
    model = init_model(_random_base_config(config), config.model.init_seed)
    save_hf(model, base, overwrite=True)
    record.write_text(json.dumps(wanted, indent=2) + "\n")
    return None


def build_model(
    config: TrainConfig,
    base: Path,
    mesh: jax.sharding.Mesh | None,
    rules: ShardingRules | None,
) -> Qwen2ForCausalLM:
    """The base model, in its training dtype, with adapters in LoRA mode."""
    m = config.model
    dtype = m.frozen_dtype if config.mode == "lora" else m.master_dtype
    model = load_hf(
        base,
        dtype,
        mesh=mesh,
        rules=rules,
        compute_dtype=m.compute_dtype,
        attention_backend=m.attention_backend,
        attention_query_chunk=m.attention_query_chunk,
    )
    if config.mode == "lora" and m.adapter is not None:
        _load_adapter(model, config, mesh, rules)
    elif config.mode == "lora":
        from mllm_jax.model.lora import apply_lora

        apply_lora(model, config.lora, jax.random.key(config.seed), mesh=mesh, rules=rules)
    return model


def _load_adapter(model, config: TrainConfig, mesh, rules) -> None:
    """Attaches the PEFT adapter `model.adapter`, refusing one whose rank, alpha or
    dropout differ from the config's `lora` (the run would not train what it says)."""
    from mllm_jax.export.peft_format import load_peft_adapter, read_adapter_config
    from mllm_jax.model.lora import LoRAError

    path = Path(config.model.adapter)
    saved = read_adapter_config(path)
    lora = config.lora
    wanted = {"r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout}
    for key, value in wanted.items():
        if float(saved.get(key, 0.0)) != float(value):
            raise LoRAError(
                f"{path}: adapter {key}={saved.get(key)!r} but the config's lora asks for "
                f"{value!r}; set lora to the adapter's settings"
            )
    load_peft_adapter(model, path, key=jax.random.key(config.seed), mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------- helpers


def _saved_positions(meta: dict[str, Any]) -> list[Any]:
    """Every saving process's data position (checkpoints from before multi-host support
    hold one, `data_state`)."""
    if "data_states" in meta:
        return list(meta["data_states"])
    return [meta.get("data_state")]


def _peak_flops(config: TrainConfig) -> float | None:
    if config.logging.peak_flops_per_device is not None:
        return config.logging.peak_flops_per_device
    return flops.peak_flops_per_device(jax.devices()[0].device_kind)


class _Validation:
    """A fixed set of held-out batches, evaluated on demand."""

    def __init__(self, config: TrainConfig, data_factory: DataFactory, split, mesh, vocab):
        v = config.validation
        iterator = data_factory(v.data, "validation")
        self.batch, self.stats = next_batches(
            iterator,
            v.batches,
            where="validation",
            vocab_size=vocab,
            max_answer_tokens=config.max_answer_tokens,
            shape=None,
        )
        check_process_rows(self.batch["input_ids"].shape[1], mesh, "validation")
        if self.stats.answer_tokens == 0:
            raise BatchError("validation: the held-out batches hold no answer tokens")
        self.device_batch = to_device(self.batch, mesh)
        shots = shot_labels(config)
        self.slots = label_slots(self.batch, config.max_answer_tokens, shots.candidates)
        self.shot_slots = shot_slots(self.batch, shots.budget, shots.candidates)
        self.step = make_eval_step(split, mesh, budget=config.max_answer_tokens, shots=shots)

    def __call__(self, split: SplitModel) -> dict[str, Any]:
        sums, slots = jax.device_get(
            self.step(split.trainable, split.rngs, split.frozen, self.device_batch)
        )
        means = sums_metrics(sums)
        out: dict[str, Any] = {
            "val_loss": float(sums.loss / sums.tokens),
            "val_accuracy": float(sums.correct / sums.tokens),
            "val_answer_tokens": int(sums.tokens),
            "val_frame_loss": float(means["frame_loss"]),
            "val_shot_label_loss": float(means["shot_label_loss"]),
            "val_shot_label_accuracy": float(means["shot_label_accuracy"]),
        }
        labels = label_metrics(self.slots, slots["logits"])
        labels.update(shot_metrics(self.shot_slots, slots["shot_logits"]))
        out.update({f"val_{k}": v for k, v in labels.items()})
        return out


# ------------------------------------------------------------------------------ train


_LABEL_KEYS = (
    "frame_loss",
    "frame_accuracy",
    "label_loss",
    "label_accuracy",
    "shot_label_loss",
    "shot_label_accuracy",
)


class _Throughput:
    """Tokens and model FLOPs per second over the steps since the last report, with the
    time spent checkpointing and validating taken out."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.tokens = 0
        self.flops = 0.0
        self.paused = 0.0

    def restart(self) -> None:
        self.start, self.tokens, self.flops, self.paused = time.perf_counter(), 0, 0.0, 0.0

    def add(self, tokens: int, step_flops: float) -> None:
        self.tokens += tokens
        self.flops += step_flops

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def report(self, peak_total: float | None, tokens: int, flops: float) -> dict[str, Any]:
        """Rates since the last report; `tokens`, `flops`: this window's counts summed over
        all processes (`self.tokens`, `self.flops` are this process's)."""
        if self.start is None or not tokens:
            return {}
        elapsed = time.perf_counter() - self.start - self.paused
        out = {
            "tokens_per_s": tokens / elapsed,
            "model_flops_per_s": flops / elapsed,
            "mfu": flops / elapsed / peak_total if peak_total else None,
        }
        self.restart()
        return out


class _StepFeed:
    """Each step's stacked batch, checked and placed on the mesh, pulled one step ahead so
    the host work overlaps the device step. Keeps the iterator state as of each step's
    own batches (what a checkpoint of that step must hold), and defers an error of the
    prefetch to the step it belongs to."""

    def __init__(self, iterator, stage: str, config: TrainConfig, mesh, vocab_size: int):
        self.iterator = iterator
        self.stage = stage
        self.config = config
        self.mesh = mesh
        self.vocab_size = vocab_size
        self.shape: tuple[int, ...] | None = None
        self.pending: tuple[int, Any, BaseException | None] | None = None

    def _pull(self, step: int):
        where = f"stage {self.stage!r} step {step + 1}"
        host, stats = next_batches(
            self.iterator,
            self.config.grad_accum,
            where=where,
            vocab_size=self.vocab_size,
            max_answer_tokens=self.config.max_answer_tokens,
            shape=self.shape,
        )
        if self.shape is None:
            self.shape = host["input_ids"].shape[1:]
            check_process_rows(self.shape[0], self.mesh, where)
        if stats.answer_tokens == 0:
            raise BatchError(f"{where}: no answer tokens in the step's batches")
        return to_device(host, self.mesh), stats, data_position(self.iterator)

    def prefetch(self, step: int) -> None:
        try:
            self.pending = (step, self._pull(step), None)
        except Exception as error:  # raised by take(step), after this step's checkpoint
            self.pending = (step, None, error)

    def take(self, step: int):
        if self.pending is None or self.pending[0] != step:
            self.prefetch(step)
        _, value, error = self.pending
        self.pending = None
        if error is not None:
            raise error
        return value


class _Run:
    """One `train` call: the state of the run and the steps of the loop, in order."""

    def __init__(
        self,
        config: TrainConfig,
        data_factory: DataFactory,
        stop_at: int | None,
        console: Console | None,
    ):
        self.config = config
        self.data_factory = data_factory
        self.stop_at = stop_at
        self.interrupt = StopOnInterrupt()
        self.console = console
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mesh, self.rules = _mesh_and_rules(config)
        self.base = prepare_base(config, self.run_dir)
        self.base_sha256 = base_identity(self.base)
        self.fingerprint = resume_fingerprint(config)
        self.ckpt_dir = config.checkpoint.directory or str(
            (self.run_dir / "checkpoints").absolute()
        )
        best_dir = str((self.run_dir / "best").absolute()) if config.validation.every else None
        self.checkpointer = Checkpointer(
            self.ckpt_dir,
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
            best_directory=best_dir,
        )
        self.meta: dict[str, Any] | None = None
        self.done = 0
        self.best: dict[str, Any] | None = None
        if is_main_process():
            save_config(config, self.run_dir / CONFIG_FILE)

        model = build_model(config, self.base, self.mesh, self.rules)
        self.model_config: Qwen2Config = model.config
        self.split = split_model(
            model,
            config.mode,
            self.mesh,
            self.rules,
            master_dtype=jnp.dtype(config.model.master_dtype),
            frozen_dtype=jnp.dtype(config.model.frozen_dtype),
        )
        del model
        self.tx = make_optimizer(config.optimizer)
        self.opt_shardings = optimizer_shardings(
            self.tx, self.split.trainable, self.split.trainable_shardings, self.mesh
        )
        self.resumed_opt_state = self._resume()
        self.train_step = make_train_step(
            self.split,
            self.tx,
            self.opt_shardings,
            self.mesh,
            budget=config.max_answer_tokens,
            remat=config.remat,
            rules=self.rules,
            shots=shot_labels(config) if config.shot_labels.weight > 0 else None,
        )
        self.log = MetricsLog(self.run_dir / METRICS_FILE, resume_step=self.done)
        self.history: list[dict[str, Any]] = []
        self.validation = (
            _Validation(config, data_factory, self.split, self.mesh, self.model_config.vocab_size)
            if config.validation.every
            else None
        )
        peak = _peak_flops(config)
        self.peak_total = peak * self.mesh.devices.size if peak else None
        self.throughput = _Throughput()

    def _resume(self) -> Any:
        """Restores the newest readable checkpoint (parameters, rngs, optimizer state) and
        returns its optimizer state; None for a fresh run.

        A step that cannot be read back is reported in one line and, once an older step
        has been read, set aside (never deleted); when no step can be read the run stops
        with an error naming it and every step stays where it is.
        """
        steps = sorted(self.checkpointer.all_steps(), reverse=True)
        if not steps:
            return None
        if self.config.checkpoint.resume == "never":
            raise CheckpointMismatchError(
                f"{self.ckpt_dir} already holds checkpoints (newest step {steps[0]}) and "
                "checkpoint.resume is 'never'"
            )
        silence_closed_loop_callbacks()  # a failing restore's stragglers print after it
        unreadable: list[tuple[int, str]] = []
        for step in steps:
            try:
                meta = self.checkpointer.read_meta(step)
            except Exception as error:  # any read failure means unreadable
                unreadable.append((step, failure_line(error)))
                continue
            check_compatible(
                meta,
                fingerprint=self.fingerprint,
                base_sha256=self.base_sha256,
                where=f"checkpoint {self.ckpt_dir}/{step}",
            )
            try:
                restored = self._restore_step(step)
            except Exception as error:
                unreadable.append((step, failure_line(error)))
                continue
            for bad, why in unreadable:
                where = self.checkpointer.set_aside(bad) if is_main_process() else None
                log.warning(
                    "checkpoint step %d of %s is unreadable (%s); resuming from step %d, the "
                    "bad step moved to %s",
                    bad, self.run_dir, why, step, where,
                )  # fmt: skip
            if unreadable:
                distributed.barrier("checkpoint-set-aside")
            self.meta, self.done, self.best = meta, int(meta["step"]), meta.get("best")
            return restored
        listed = "; ".join(f"step {step}: {why}" for step, why in unreadable)
        raise CheckpointReadError(
            f"run {self.run_dir}: no checkpoint in {self.ckpt_dir} can be read ({listed}); "
            "they are left in place: move them away to start over"
        )

    def _restore_step(self, step: int) -> Any:
        """Parameters and rngs of `step` into the split model; returns its optimizer state."""
        split = self.split
        trainable = self.checkpointer.restore(
            step, "trainable", abstract_like(split.trainable, split.trainable_shardings)
        )
        rngs = self.checkpointer.restore_rngs(step, split.rngs, split.rngs_shardings)
        abstract = jax.eval_shape(self.tx.init, trainable)
        opt_state = self.checkpointer.restore(
            step, "opt_state", abstract_like(abstract, self.opt_shardings)
        )
        split.trainable, split.rngs = trainable, rngs
        return opt_state

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        self.log.write(entry)

    def meta_for(self, stage: str, data_states: list[Any] | None) -> dict[str, Any]:
        """The checkpoint's meta; `data_states`: every process's data position."""
        return {
            "step": self.done,
            "stage": stage,
            "fingerprint": self.fingerprint,
            "base": {"path": str(self.base), "sha256": self.base_sha256},
            "seed": self.config.seed,
            "process_count": jax.process_count(),
            "data_states": data_states,
            "best": self.best,
            "jax_version": jax.__version__,
            "backend": jax.default_backend(),
            "time": time.time(),
        }

    # -------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        config = self.config
        if self.done == 0:
            self.record(
                {
                    "event": "start",
                    "step": 0,
                    "mode": config.mode,
                    "trainable_params": count_params(self.split.trainable),
                    "frozen_params": count_params(self.split.frozen),
                    "devices": int(self.mesh.devices.size),
                    "mesh": dict(self.mesh.shape),
                }
            )
        with self.interrupt, progress_bar(config.logging.progress, self.console) as bar:
            task = bar.add_task("train", total=config.total_steps, completed=self.done, status="")
            for stage, (lo, hi) in zip(config.stages, config.stage_bounds(), strict=True):
                if self.done >= hi or self._stopped():
                    continue
                bar.update(task, description=f"train [{stage.name}]")
                self._run_stage(stage, lo, hi, bar, task)
        self.checkpointer.close()
        self.log.close()
        if self.interrupt.requested:
            # Callers (the CLI, the demo) treat this as Ctrl-C; the checkpoint is complete.
            raise KeyboardInterrupt
        return TrainResult(
            step=self.done,
            history=self.history,
            best=self.best,
            run_dir=self.run_dir,
            split=self.split,
            model_config=self.model_config,
            total_steps=self.config.total_steps,
        )

    def _stopped(self) -> bool:
        if self.interrupt.requested:
            return True
        return self.stop_at is not None and self.done >= self.stop_at

    def _run_stage(self, stage: StageConfig, lo: int, hi: int, bar, task) -> None:
        config, split = self.config, self.split
        iterator = self.data_factory(stage.data, f"stage {stage.name!r}")
        if self.meta is not None and lo < self.done:
            # Resuming inside this stage: its optimizer state and data position.
            opt_state, self.resumed_opt_state = self.resumed_opt_state, None
            restore_positions(
                iterator, _saved_positions(self.meta), f"checkpoint {self.ckpt_dir}/{self.done}"
            )
        else:
            self.resumed_opt_state = None  # a resume at a stage boundary starts it afresh
            opt_state = init_optimizer(self.tx, split.trainable, self.opt_shardings)
        feed = _StepFeed(iterator, stage.name, config, self.mesh, self.model_config.vocab_size)
        self.throughput.start = None
        for step in range(self.done, hi):
            batch, stats, data_state = feed.take(step)
            lr = learning_rate(config.optimizer, stage.learning_rate, stage.length, step - lo)
            first = self.throughput.start is None
            t0 = time.perf_counter()
            split.trainable, opt_state, split.rngs, metrics = self.train_step(
                split.trainable,
                opt_state,
                split.rngs,
                split.frozen,
                batch,
                np.float32(lr),
            )
            self.done = step + 1
            if self.done < hi and not self._stopped():
                feed.prefetch(self.done)  # host work overlaps the dispatched step
            if first:
                # A stage's first step may compile: time throughput from its end.
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - t0
                self.throughput.restart()
            else:
                self.throughput.add(
                    stats.tokens, flops.step_flops(self.model_config, stats, config.mode)
                )
            if first or self.done % config.logging.every == 0 or self.done == hi:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                # Host-side counts are per process: sum them (a collective; every
                # process logs at the same steps).
                tokens, window_tokens, window_flops = _sum_over_processes(
                    stats.tokens, self.throughput.tokens, self.throughput.flops
                )
                entry = {
                    "event": "train",
                    "step": self.done,
                    "stage": stage.name,
                    "loss": values["loss"],
                    "accuracy": values["accuracy"],
                    "grad_norm": values["grad_norm"],
                    "lr": lr,
                    "answer_tokens": int(values["answer_tokens"]),
                    "tokens": int(tokens),
                    **{k: values[k] for k in _LABEL_KEYS},
                }
                if first:
                    entry["first_step_s"] = round(compile_s, 3)
                entry.update(self.throughput.report(self.peak_total, window_tokens, window_flops))
                self.record(entry)
                bar.update(task, status=f"loss {values['loss']:.4f}")
            bar.update(task, completed=self.done)

            t_pause = None
            if self.validation is not None and self.done % config.validation.every == 0:
                jax.block_until_ready(split.trainable)
                t_pause = time.perf_counter()
                self._validate(stage.name)
            if self.done % config.checkpoint.every == 0 or self.done == hi or self._stopped():
                if t_pause is None:
                    jax.block_until_ready(split.trainable)
                    t_pause = time.perf_counter()
                self.checkpointer.save(
                    self.done,
                    split.trainable,
                    opt_state,
                    split.rngs,
                    self.meta_for(
                        stage.name, distributed.allgather_json(data_state, "data positions")
                    ),
                )
            if t_pause is not None:
                self.throughput.pause(time.perf_counter() - t_pause)
            if self._stopped():
                return

    def _validate(self, stage: str) -> None:
        assert self.validation is not None
        result = self.validation(self.split)
        improved = self.best is None or result["val_loss"] < self.best["val_loss"]
        if improved:
            self.best = {"step": self.done, "stage": stage, **result}
        self.record(
            {
                "event": "validation",
                "step": self.done,
                "stage": stage,
                **result,
                "best_step": self.best["step"],
            }
        )
        if improved:
            self.checkpointer.save_best(
                self.done,
                self.split.trainable,
                self.split.rngs,
                self.meta_for(stage, data_states=None),
            )


def shot_labels(config: TrainConfig) -> ShotLabels:
    """The shot-label loss settings of a run (label candidates default to Qwen2's digits)."""
    ids = config.shot_labels.label_token_ids
    return ShotLabels(
        weight=config.shot_labels.weight,
        budget=config.shot_labels.max_per_row,
        candidates=tuple(QWEN2_DIGIT_IDS if ids is None else ids),
    )


def _sum_over_processes(*values: float) -> list[float]:
    """Each value summed over all processes (collective)."""
    return [
        sum(column)
        for column in zip(*distributed.allgather_json(values, "log counts"), strict=True)
    ]


def train(
    config: TrainConfig,
    *,
    data_factory: DataFactory | None = None,
    stop_at: int | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Runs the curriculum of `config`, resuming from its newest checkpoint if any.

    data_factory: builds each stage's (and the validation) batch iterator; default
    `mllm_jax.train.data.default_data`. stop_at: stop after this global step (with a
    checkpoint), e.g. to fit a job's time slot; rerun to continue.
    Raises CheckpointMismatchError (checkpoint of another config/base), BatchError (bad
    batch), DataExhaustedError (an iterator ended early) before or while training.
    Stages given in `epochs` get their steps first (`mllm_jax.train.epochs.resolve_steps`,
    reported on the console, the resolved config saved in the run directory).
    """
    data_factory = data_factory or default_data
    shown = console or Console(stderr=True)
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"stop_at (--stop-at) must be a step >= 1, got {stop_at}")

    def report(line: str) -> None:
        if is_main_process():
            shown.print(line)

    check_task_overlap(config)
    config = resolve_steps(config, data_factory, report)
    _make_run_dir(Path(config.run_dir))
    return _Run(config, data_factory, stop_at, console).run()


def _make_run_dir(run_dir: Path) -> None:
    """Creates the run directory; a place that is a file, lies below a file or cannot be
    written is a ConfigError naming it (were tracebacks from mkdir)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory") from None
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"run_dir {run_dir}: cannot create the directory ({reason})") from None


# ----------------------------------------------------------------------- load_trained


def load_trained(
    run_dir: str | Path,
    step: int | str | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
) -> tuple[nnx.Module, TrainConfig]:
    """The model of a run with its trained parameters: `step` None = newest checkpoint,
    an int = that checkpoint, "best" = the best validation step. Without a mesh the
    model lives on one device of this process. Returns (model, the run's config)."""
    run_dir = Path(run_dir)
    config = load_config(TrainConfig, run_dir / CONFIG_FILE)
    if mesh is None:
        mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    rules = rules or ShardingRules.default()
    base = prepare_base(config, run_dir)
    model = build_model(config, base, mesh, rules)
    split = split_model(
        model,
        config.mode,
        mesh,
        rules,
        master_dtype=jnp.dtype(config.model.master_dtype),
        frozen_dtype=jnp.dtype(config.model.frozen_dtype),
    )
    directory = (
        str((run_dir / "best").absolute())
        if step == "best"
        else config.checkpoint.directory or str((run_dir / "checkpoints").absolute())
    )
    checkpointer = Checkpointer(directory, keep=1 << 30, async_save=False)
    steps = list(checkpointer.all_steps())
    if not steps:
        raise FileNotFoundError(
            f"{directory}: no {'best ' if step == 'best' else ''}checkpoint: the run has "
            "not saved one yet"
        )
    chosen = checkpointer.latest_step() if step in (None, "best") else int(step)
    if chosen not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint {step} (have {steps})")
    where = f"checkpoint {directory}/{chosen}"
    silence_closed_loop_callbacks()  # a failing restore's stragglers print after it
    try:
        meta = checkpointer.read_meta(chosen)
    except Exception as error:  # any read failure: the step is damaged
        raise CheckpointReadError(_unreadable(where, error, steps, chosen)) from None
    check_compatible(
        meta,
        fingerprint=resume_fingerprint(config),
        base_sha256=base_identity(base),
        where=where,
    )
    target = abstract_like(split.trainable, split.trainable_shardings)
    try:
        split.trainable = checkpointer.restore(chosen, "trainable", target)
        split.rngs = checkpointer.restore_rngs(chosen, split.rngs, split.rngs_shardings)
    except Exception as error:
        raise CheckpointReadError(_unreadable(where, error, steps, chosen)) from None
    checkpointer.close()
    return split.merge(), config


def _unreadable(where: str, error: BaseException, steps: list[int], chosen: int) -> str:
    others = [s for s in steps if s != chosen]
    hint = f"; the run's other checkpoints: steps {others}" if others else ""
    return f"{where} cannot be read ({failure_line(error)}){hint}"


def host_params(state: nnx.State) -> dict[str, np.ndarray]:
    """Flat {dotted path: numpy array} of a state (for comparisons and export)."""
    return {
        ".".join(str(p) for p in path): np.asarray(jax.device_get(var.get_value()))
        for path, var in nnx.to_flat_state(state)
    }
