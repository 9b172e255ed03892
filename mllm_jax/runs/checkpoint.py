"""Orbax checkpoints of a training run, and the identity of its base model.

A checkpoint (one orbax step directory, named by the global optimizer step) holds:

    trainable   the trainable parameters (fp32), restored straight into their shardings
    opt_state   the optimizer state of the current stage
    meta        JSON: step, stage, the config fingerprint, base path + sha256, the PRNG
                key, the data iterator's state, the best validation so far

Base weights are not saved: they are re-read from `base.path` on restore, and `base.sha256`
(over the checkpoint's files) proves they are the same bytes. `restore` refuses a
checkpoint whose fingerprint or base differs from the current run, naming the keys.
Saves are asynchronous; `close()` waits for the last one (a killed process leaves at
most an unfinished temporary directory, which orbax ignores). A step that cannot be read
back (a truncated array file, a deleted item or metadata) is moved by `set_aside` into
`<checkpoints>.unreadable/`, never deleted, and the trainer resumes from an older step.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mllm_jax.foundation import distributed
from mllm_jax.runs.config import fingerprint_differences

_HASHED_SUFFIXES = (".safetensors", ".json")
_CHUNK = 1 << 24


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another config or another base model."""


class CheckpointReadError(RuntimeError):
    """No checkpoint of a run can be read back."""


def silence_closed_loop_callbacks() -> None:
    """Drops the "Event loop is closed" tracebacks of a failed restore's stragglers.

    When one array of a step cannot be read, orbax raises and closes its event loop while
    tensorstore still completes the step's other reads; each completion then calls
    `loop.call_soon_threadsafe` on the closed loop from C and reports the RuntimeError as
    unraisable (`sys.unraisablehook`): dozens of bare tracebacks around the one-line
    warning. Installed before a resume's restores; every other report goes to the
    previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(report: Any) -> None:
        if _is_closed_loop_straggler(report.exc_type, report.exc_value, report.exc_traceback):
            return
        previous(report)

    hook._drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _is_closed_loop_straggler(kind: type, error: BaseException | None, tb: Any) -> bool:
    if kind is not RuntimeError or str(error) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(tb)
    return bool(frames) and all("asyncio" in frame.filename for frame in frames)


def failure_line(error: BaseException) -> str:
    """The first line of an error, at most 200 characters (tensorstore's run to 170 lines)."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}"


def hash_checkpoint(directory: str | Path) -> str:
    """sha256 over the names and bytes of the weight and config files of an HF checkpoint
    directory (generation_config.json excluded: it does not change the model)."""
    directory = Path(directory)
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix in _HASHED_SUFFIXES and p.name != "generation_config.json"
    )
    if not files:
        raise FileNotFoundError(f"{directory}: no safetensors/json files to identify the base")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def base_identity(directory: str | Path) -> str:
    """`hash_checkpoint(directory)` computed by process 0 and shared with every process,
    so that all processes take the same resume decision (and only one reads every
    byte of the base)."""
    return distributed.broadcast_json(
        hash_checkpoint(directory) if distributed.is_main() else None, "base sha256"
    )


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays carrying `shardings` (orbax restore targets)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (orbax stores plain arrays only)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _wrap_like(data: jax.Array, like: Any) -> jax.Array:
    if not _is_key(like):
        return data
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))


def _array_item_handler() -> ocp.PyTreeCheckpointHandler:
    """Pytree handler for the arrays. On CPU, without orbax's replica-parallel writes:
    they slice every replicated array with a freshly compiled program (seconds at the
    first save) for a gain that exists only with many hosts writing."""
    from orbax.checkpoint import type_handlers

    if jax.default_backend() != "cpu":
        return ocp.PyTreeCheckpointHandler()
    registry = type_handlers.create_type_handler_registry(
        (jax.Array, type_handlers.ArrayHandler(use_replica_parallel=False)),
        (np.ndarray, type_handlers.NumpyHandler()),
        (np.number, type_handlers.ScalarHandler()),
        (int, type_handlers.ScalarHandler()),
        (float, type_handlers.ScalarHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _save_args(**items: Any) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{
            name: ocp.args.JsonSave(value) if name == "meta" else ocp.args.PyTreeSave(value)
            for name, value in items.items()
        }
    )


class Checkpointer:
    """The run's orbax `CheckpointManager` (newest `keep` steps) plus a second manager for
    the best validation checkpoint (trainable parameters and meta only)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int,
        async_save: bool = True,
        best_directory: str | None = None,
    ):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        handlers = {
            "trainable": _array_item_handler(),
            "opt_state": _array_item_handler(),
            "rngs": _array_item_handler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        self.best = None
        if best_directory is not None:
            best_options = ocp.CheckpointManagerOptions(
                max_to_keep=1, enable_async_checkpointing=async_save, create=True
            )
            self.best = ocp.CheckpointManager(
                best_directory,
                options=best_options,
                item_handlers={
                    "trainable": _array_item_handler(),
                    "rngs": _array_item_handler(),
                    "meta": handlers["meta"],
                },
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, trainable: Any, opt_state: Any, rngs: Any, meta: dict[str, Any]
    ) -> None:
        items = {"trainable": trainable, "opt_state": opt_state, "meta": meta}
        if jax.tree.leaves(rngs):
            items["rngs"] = _keys_to_data(rngs)
        self.manager.save(step, args=_save_args(**items), force=True)

    def save_best(self, step: int, trainable: Any, rngs: Any, meta: dict[str, Any]) -> None:
        """Saves `step` as the best model. A run killed after a best save and before the
        periodic checkpoint of that step resumes from an earlier step and reaches `step`
        again: the saved best of that step is then replaced, not refused."""
        if self.best is None:
            return
        if step in self.best.all_steps():
            self.best.wait_until_finished()
            self.best.delete(step)
        items = {"trainable": trainable, "meta": meta}
        if jax.tree.leaves(rngs):
            items["rngs"] = _keys_to_data(rngs)
        self.best.save(step, args=_save_args(**items), force=True)

    def set_aside(self, step: int) -> Path:
        """Moves step `step` out of the manager's sight, into `<directory>.unreadable/`
        (named `<step>-<unix time>`), and returns where it went."""
        source = Path(self.directory) / str(step)
        aside = Path(f"{self.directory}.unreadable")
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / f"{step}-{int(time.time())}"
        shutil.move(str(source), str(target))
        self.manager.reload()
        return target

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, item: str, target: Any) -> Any:
        """Item "trainable" or "opt_state" of `step`, placed as the abstract `target` says."""
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(**{item: restore}))
        return restored[item]

    def restore_rngs(self, step: int, like: Any, shardings: Any) -> Any:
        """The rng state of `step` (typed PRNG keys rebuilt), shaped and placed as `like`."""
        if not jax.tree.leaves(like):
            return like
        data = jax.eval_shape(_keys_to_data, like)
        restored = self.restore(step, "rngs", abstract_like(data, shardings))
        return jax.tree.map(_wrap_like, restored, like)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
        if self.best is not None:
            self.best.close()


def check_compatible(
    meta: dict[str, Any],
    *,
    fingerprint: dict[str, Any],
    base_sha256: str,
    where: str,
) -> None:
    """Raises CheckpointMismatchError if `meta` was written by another config or base."""
    problems = fingerprint_differences(meta.get("fingerprint"), fingerprint)
    if problems:
        shown = "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
        raise CheckpointMismatchError(
            f"{where} was written by a different training config ({shown}); use another "
            "run_dir / checkpoint.directory, or the config it was written with"
        )
    saved = meta.get("base", {})
    if saved.get("sha256") != base_sha256:
        raise CheckpointMismatchError(
            f"{where} was trained from another base model: checkpoint base "
            f"{saved.get('path')!r} sha256 {str(saved.get('sha256'))[:12]}..., this run's base "
            f"sha256 {base_sha256[:12]}...; the base checkpoint changed or is not the same model"
        )
