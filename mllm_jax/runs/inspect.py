"""What a training run directory holds, and what `mllm-jax train` would do with it.

    inspect_run(run_dir) -> RunInfo       (`mllm-jax runs show RUN`)

Reads config.yaml, metrics.jsonl and the checkpoints' metadata; writes nothing and
restores no array, so it takes seconds on any run. A checkpoint step counts as readable
when its meta restores (through `Checkpointer.read_meta`, as a resume does) and each of
its items (trainable, opt_state, and whatever else the step recorded) is a non-empty
directory. The arrays' bytes are not read: a truncated array file shows only when a
resume restores it (and then sets the step aside).

What the next `mllm-jax train --config RUN/config.yaml` does follows `_Run._resume`:
the newest step whose meta reads, whose config fingerprint matches config.yaml and
whose items are there is resumed; unreadable newer steps would be set aside into
`<checkpoints>.unreadable/`. Not checked: the base model's sha256 (hashing the base
reads every byte of it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from etils import epath

from mllm_jax.foundation.config import load_config
from mllm_jax.runs.checkpoint import Checkpointer, failure_line
from mllm_jax.runs.config import TrainConfig, fingerprint_differences, resume_fingerprint
from mllm_jax.runs.layout import CONFIG_FILE, METRICS_FILE

UNREADABLE_SUFFIX = ".unreadable"  # Checkpointer.set_aside's `<checkpoints>.unreadable/`
_CHECKPOINT_ITEMS = ("trainable", "opt_state")  # what every periodic checkpoint saves
_BEST_ITEMS = ("trainable",)
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step JSON: item_handlers


class RunInspectError(ValueError):
    """A directory that is not a training run."""


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """One curriculum stage: global steps first_step..last_step (1-based, inclusive;
    None while the stage is still given in epochs, resolved when training starts)."""

    name: str
    steps: int | None
    epochs: float | None
    first_step: int | None
    last_step: int | None


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """A checkpoint step: readable, or the first reason it is not; its stage (from meta)."""

    step: int
    readable: bool
    problem: str | None = None
    stage: str | None = None


@dataclasses.dataclass(frozen=True)
class BestInfo:
    """The best validation checkpoint (best/<step>/) and its numbers from its meta:
    val_loss, and every other validation number the run logged (val_label_accuracy,
    ...)."""

    step: int
    readable: bool
    problem: str | None
    val_loss: float | None
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class SetAsideInfo:
    """A step moved into `<checkpoints>.unreadable/` as `<step>-<unix time>`."""

    name: str
    step: int | None
    time: int | None


@dataclasses.dataclass(frozen=True)
class LoggedInfo:
    """The last train record of metrics.jsonl."""

    step: int
    loss: float | None
    stage: str | None


@dataclasses.dataclass(frozen=True)
class NextRun:
    """What `mllm-jax train --config RUN/config.yaml` would do.

    action: "fresh" (no checkpoint), "resume" (from `step`), "finished" (`step` is the
    last one: nothing left to train), "blocked" (it would stop with an error, `line`
    says which). set_aside: unreadable steps newer than `step` that a resume moves into
    `<checkpoints>.unreadable/`.
    """

    action: Literal["fresh", "resume", "finished", "blocked"]
    step: int | None
    set_aside: list[int]
    line: str


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A training run directory, as `inspect_run` found it.

    checkpoints: oldest first. total_steps: None while a stage is given in epochs.
    notes: things that change what `next` means (config.yaml's run_dir is another
    directory, so training with it would not continue this one).
    """

    run_dir: str
    config_file: str
    mode: str
    stages: list[StageInfo]
    total_steps: int | None
    checkpoint_dir: str
    checkpoints: list[StepInfo]
    best: BestInfo | None
    set_aside: list[SetAsideInfo]
    last_logged: LoggedInfo | None
    next: NextRun
    notes: list[str]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


# ------------------------------------------------------------------------ pieces


def _stages(config: TrainConfig) -> tuple[list[StageInfo], int | None]:
    out, start = [], 0
    for stage in config.stages:
        if start is None or stage.steps is None:
            start = None
            out.append(StageInfo(stage.name, None, stage.epochs, None, None))
            continue
        out.append(StageInfo(stage.name, stage.steps, stage.epochs, start + 1, start + stage.steps))
        start += stage.steps
    return out, start


def _first_line(error: BaseException) -> str:
    return failure_line(error)


def _item_problem(step_dir: epath.Path, required: tuple[str, ...]) -> str | None:
    """Why the items of `step_dir` are not all there: the `required` ones and every one
    orbax recorded for the step (item_handlers of its step metadata)."""
    items = set(required)
    try:
        recorded = json.loads((step_dir / _ORBAX_STEP_METADATA).read_text())
        items |= set(recorded.get("item_handlers") or {})
    except (OSError, ValueError, AttributeError):
        pass  # a step without readable orbax metadata: the required items still count
    for item in sorted(items - {"meta"}):
        directory = step_dir / item
        if not directory.is_dir():
            return f"item {item!r} is missing"
        if not any(directory.iterdir()):
            return f"item {item!r} is empty"
    return None


def _check_step(
    checkpointer: Any, directory: epath.Path, step: int, required: tuple[str, ...]
) -> tuple[StepInfo, dict[str, Any] | None]:
    """The step's StepInfo and its meta (None when the meta cannot be read)."""
    try:
        meta = checkpointer.read_meta(step)
    except Exception as error:  # any read failure makes the step unreadable, as on resume
        return StepInfo(step, False, f"meta: {_first_line(error)}"), None
    stage = meta.get("stage")
    problem = _item_problem(directory / str(step), required)
    return StepInfo(step, problem is None, problem, stage), meta


def _open(directory: epath.Path) -> Any:
    """A Checkpointer that reads `directory` (only made when it exists: orbax would create
    it)."""
    return Checkpointer(str(directory), keep=1 << 30, async_save=False)


def _checkpoints(
    directory: epath.Path, fingerprint: dict[str, Any]
) -> tuple[list[StepInfo], dict[int, list[str]]]:
    """Every step of `directory` (oldest first) and, per step whose meta reads, how its
    config fingerprint differs from config.yaml's."""
    if not directory.is_dir():
        return [], {}
    checkpointer = _open(directory)
    try:
        infos, differences = [], {}
        for step in sorted(checkpointer.all_steps()):
            info, meta = _check_step(checkpointer, directory, step, _CHECKPOINT_ITEMS)
            infos.append(info)
            if meta is not None:
                differences[step] = fingerprint_differences(meta.get("fingerprint"), fingerprint)
        return infos, differences
    finally:
        checkpointer.close()


def _best(directory: epath.Path) -> BestInfo | None:
    if not directory.is_dir():
        return None
    checkpointer = _open(directory)
    try:
        step = checkpointer.latest_step()
        if step is None:
            return None
        info, meta = _check_step(checkpointer, directory, step, _BEST_ITEMS)
    finally:
        checkpointer.close()
    best = (meta or {}).get("best") or {}
    numbers = {
        k: float(v)
        for k, v in best.items()
        if k.startswith("val_")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)  # JSON has no NaN
    }
    return BestInfo(step, info.readable, info.problem, numbers.pop("val_loss", None), numbers)


def _set_aside(directory: epath.Path) -> list[SetAsideInfo]:
    aside = directory.parent / (directory.name + UNREADABLE_SUFFIX)
    if not aside.is_dir():
        return []
    out = []
    for entry in sorted(aside.iterdir(), key=lambda p: p.name):
        step, _, when = entry.name.partition("-")
        out.append(
            SetAsideInfo(
                entry.name,
                int(step) if step.isdigit() else None,
                int(when) if when.isdigit() else None,
            )
        )
    return out


def _last_logged(path: Path) -> LoggedInfo | None:
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and record.get("event") == "train" and "step" in record:
            last = record
    if last is None:
        return None
    loss = last.get("loss")
    loss = float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None
    return LoggedInfo(int(last["step"]), loss, last.get("stage"))


def _next_run(
    config: TrainConfig,
    checkpoints: list[StepInfo],
    differences: dict[int, list[str]],
    total: int | None,
    command: str,
) -> NextRun:
    """Mirrors `_Run._resume`: newest step first; an unreadable one is passed over (and
    set aside once an older one restores); a readable meta of another config stops."""
    if not checkpoints:
        return NextRun("fresh", None, [], f"{command} would start fresh: no checkpoint yet")
    newest = checkpoints[-1].step
    if config.checkpoint.resume == "never":
        return NextRun(
            "blocked",
            None,
            [],
            f"{command} would stop: checkpoint.resume is 'never' and the checkpoints "
            f"directory holds steps (newest {newest})",
        )
    passed: list[int] = []
    for info in reversed(checkpoints):
        if differences.get(info.step):
            shown = "; ".join(differences[info.step][:3])
            return NextRun(
                "blocked",
                info.step,
                [],
                f"{command} would stop: checkpoint step {info.step} was written by a "
                f"different training config ({shown})",
            )
        if not info.readable:
            passed.append(info.step)
            continue
        aside = (
            f"; unreadable step{'s' if len(passed) > 1 else ''} "
            f"{', '.join(map(str, passed))} would be set aside"
            if passed
            else ""
        )
        if total is not None and info.step >= total:
            return NextRun(
                "finished",
                info.step,
                passed,
                f"{command} has nothing left to train: finished at step {info.step} of "
                f"{total}{aside}",
            )
        of = f" of {total}" if total is not None else ""
        return NextRun(
            "resume",
            info.step,
            passed,
            f"{command} would resume from step {info.step}{of}{aside}",
        )
    return NextRun(
        "blocked",
        None,
        passed,
        f"{command} would stop: no checkpoint can be read (steps "
        f"{', '.join(map(str, sorted(passed)))})",
    )


# ------------------------------------------------------------------------ inspect


def inspect_run(run_dir: str | Path) -> RunInfo:
    """What `run_dir` holds and what training it again would do (module docstring).
    Raises RunInspectError if it is not a run directory (no config.yaml), ConfigError if
    its config.yaml does not load."""
    run_dir = Path(run_dir)
    config_file = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "no such directory"
        raise RunInspectError(f"{run_dir}: {what}")
    if not config_file.is_file():
        raise RunInspectError(f"{run_dir}: not a training run directory (no {CONFIG_FILE})")
    config = load_config(TrainConfig, config_file)
    stages, total = _stages(config)
    ckpt_dir = epath.Path(config.checkpoint.directory or (run_dir / "checkpoints").absolute())
    checkpoints, differences = _checkpoints(ckpt_dir, resume_fingerprint(config))
    notes = []
    configured = Path(config.run_dir)
    if configured.absolute().resolve() != run_dir.absolute().resolve():
        # A moved or copied run, or a relative run_dir read from another directory.
        where = "" if configured.is_absolute() else f" (here: {configured.absolute()})"
        notes.append(
            f"config.yaml's run_dir is {config.run_dir}{where}: `--config {config_file}` "
            f"trains there, add `--set run_dir={run_dir}` to continue this run"
        )
    command = f"mllm-jax train --config {config_file}"
    return RunInfo(
        run_dir=str(run_dir),
        config_file=str(config_file),
        mode=config.mode,
        stages=stages,
        total_steps=total,
        checkpoint_dir=str(ckpt_dir),
        checkpoints=checkpoints,
        best=_best(epath.Path((run_dir / "best").absolute())),
        set_aside=_set_aside(ckpt_dir),
        last_logged=_last_logged(run_dir / METRICS_FILE),
        next=_next_run(config, checkpoints, differences, total, command),
        notes=notes,
    )
