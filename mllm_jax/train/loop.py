"""The training run: base model -> curriculum stages -> checkpoints, metrics, validation.

    train(config)           runs (or resumes) `config.run_dir`

The run directory's layout is `mllm_jax.runs.layout`'s; building the model and loading a
trained run are `mllm_jax.runs.loading`'s.

Resuming re-reads the base, restores the trainable parameters, optimizer state, step and
data-iterator position of the newest checkpoint and continues; on the same backend,
mesh and jax version the result is bitwise the run that was never interrupted.

Multi-host (`mllm_jax.foundation.distributed`): every process runs `train` with the same
config; each feeds its own rows of the global batch (`mllm_jax.train.data`), orbax saves
and restores collectively, process 0 alone writes config.yaml, metrics and the random
base. Decisions that must agree (resume or not, the base identity) are taken once and
shared.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from mllm_jax.encoding.tokens import QWEN2_DIGIT_IDS
from mllm_jax.foundation import distributed
from mllm_jax.foundation.config import ConfigError, save_config
from mllm_jax.foundation.mesh import make_mesh
from mllm_jax.model.config import Qwen2Config
from mllm_jax.model.sharding import ShardingRules
from mllm_jax.runs.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointReadError,
    abstract_like,
    base_identity,
    check_compatible,
    failure_line,
    silence_closed_loop_callbacks,
)
from mllm_jax.runs.config import StageConfig, TrainConfig, resume_fingerprint
from mllm_jax.runs.layout import CONFIG_FILE, METRICS_FILE, best_dir, checkpoints_dir, make_run_dir
from mllm_jax.runs.loading import build_model, prepare_base
from mllm_jax.runs.state import (
    SplitModel,
    count_params,
    init_optimizer,
    optimizer_shardings,
    split_model,
)
from mllm_jax.train import flops
from mllm_jax.train.batches import BatchError, next_batches, to_device
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
from mllm_jax.train.metrics import MetricsLog, is_main_process, progress_bar
from mllm_jax.train.optim import learning_rate, make_optimizer
from mllm_jax.train.step import ShotLabels, make_eval_step, make_train_step, sums_metrics

log = logging.getLogger(__name__)


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
    rules = config.sharding_rules()
    return mesh, rules


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
            **_excluded(means["shot_label_tokens_excluded"], "val_shot_label_tokens_excluded"),
        }
        labels = label_metrics(self.slots, slots["logits"])
        labels.update(shot_metrics(self.shot_slots, slots["shot_logits"]))
        out.update({f"val_{k}": v for k, v in labels.items()})
        return out


# ------------------------------------------------------------------------------ train


def _excluded(count: Any, key: str) -> dict[str, int]:
    """{key: count} when label tokens were left out of a digit-softmax metric (prompts
    with labels of 10 and above, `loss.one_token_prompts`), else nothing."""
    return {key: int(count)} if count else {}


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
        self.ckpt_dir = checkpoints_dir(config, self.run_dir)
        best = best_dir(self.run_dir) if config.validation.every else None
        self.checkpointer = Checkpointer(
            self.ckpt_dir,
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
            best_directory=best,
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
                    **_excluded(values["shot_label_tokens_excluded"], "shot_label_tokens_excluded"),
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
    make_run_dir(Path(config.run_dir))
    return _Run(config, data_factory, stop_at, console).run()
