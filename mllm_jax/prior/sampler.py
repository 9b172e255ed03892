"""Batch generation: keys -> hyperparameters -> compiled chunks -> TaskBatch.

Task ``i`` of seed ``s`` is a function of ``fold_in(key(s), i)`` alone: its
hyperparameters come from ``fold_in(k, 0)``, attempt ``j`` from stream ``j`` of
``fold_in(k, 1)``, and it is the first valid of ``config.attempts`` attempts.

Tasks are grouped by kind (tree, or MLP of a padded width) and cut into chunks of
``chunk_size`` tasks per device; each device runs the same compiled program over its
chunk, one task after another (``lax.map``), so every branch (SCM family, activation
kind, sampling mode, categorical columns, split repair) is a real conditional and every
depth a dynamic loop: no work is spent on branches a task does not take. A task's bytes
therefore depend only on its key and the config, not on the batch it came in, its place
in a chunk, or the number of devices (``shard_map`` over fixed per-device chunks).

On accelerators, ``config.task_block`` > 1 runs blocks of a chunk's tasks side by side
(``vmap``): every conditional then evaluates both sides and a block runs as long as its
slowest task, but the device is filled (docs/prior.md, Speed: on a GPU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mllm_jax.prior import rng
from mllm_jax.prior.batch import FAMILY_NAMES, TaskBatch
from mllm_jax.prior.config import PriorConfig, PriorConfigError
from mllm_jax.prior.hparams import FAMILY_TREE, HParams, sample_hparams
from mllm_jax.prior.mlp import mlp_scm
from mllm_jax.prior.reg2cls import Classified, to_classification
from mllm_jax.prior.trees import tree_scm

_SAMPLING_NAMES = np.array(["normal", "mixed", "uniform"])
_TREE = "tree"
_HPARAM_BLOCK = 64  # tasks per call of the hyperparameter program


@functools.partial(jax.jit, static_argnames=("config",))
def _hparams_and_streams(seed: jax.Array, indices: jax.Array, config: PriorConfig):
    """(HParams[n], u32[n, 2] attempt streams) of tasks ``indices`` (u32[n]) of ``seed``."""
    base = jax.random.key(seed)

    def one(i):
        k = jax.random.fold_in(base, i)
        return sample_hparams(jax.random.fold_in(k, 0), config), rng.from_key(
            jax.random.fold_in(k, 1)
        )

    return jax.vmap(one)(indices)


def _generate_one(stream, hp: HParams, budget, *, kind: str, width: int, config: PriorConfig):
    """The first valid of ``budget`` (i32, 0 for a padding slot) draws of one task.

    The budget is an argument rather than ``config.attempts`` so that one compiled
    program serves every J.
    """
    c = config

    def attempt(j):
        s = rng.fold(stream, j)
        if kind == _TREE:
            X, y, ok = tree_scm(
                rng.fold(s, 0), hp, n_slots=c.max_features, rows=c.rows,
                candidates=c.tree_candidates, tail_candidates=c.tree_tail_candidates,
            )  # fmt: skip
        else:
            X, y, ok = mlp_scm(
                rng.fold(s, 0), hp, width=width, n_slots=c.max_features, rows=c.rows,
                sine_terms=c.sine_terms,
                sine_table=c.sine_table,
            )  # fmt: skip
        return to_classification(
            rng.fold(s, 1), X, y, ok, hp, cat_prob=c.cat_prob, max_classes=c.max_classes
        )

    empty = Classified(
        X=jnp.zeros((c.rows, c.max_features), jnp.float32),
        y=jnp.zeros((c.rows,), jnp.int32),
        n_features=jnp.int32(0),
        n_classes=jnp.int32(0),
        categorical=jnp.zeros((c.max_features,), bool),
        valid=jnp.bool_(False),
    )

    def more(state):
        j, out = state
        return (j < budget) & ~out.valid

    def step(state):
        j, _ = state
        return j + 1, attempt(j)

    j, out = jax.lax.while_loop(more, step, (jnp.int32(0), empty))
    # An invalid task holds zeros, never a half-usable draw.
    out = jax.tree.map(lambda a, e: jnp.where(out.valid, a, e), out, empty)
    return out, j


def _chunk_program(kind: str, width: int, config: PriorConfig, devices: tuple):
    """The compiled chunk program; configs that differ only in the attempts or the
    width buckets share one.

    It takes host (numpy) arguments: jit puts them on the devices in its C++ dispatch,
    while ``jax.device_put`` of the ~20 argument arrays cost ~0.7 ms per call, about
    as much as running a call of 8 empty slots."""
    return _compiled_chunk_program(
        kind, width, config.replace(attempts=1, widths=(config.max_hidden,)), devices
    )


@functools.lru_cache(maxsize=64)
def _compiled_chunk_program(kind: str, width: int, config: PriorConfig, devices: tuple):
    mesh = Mesh(np.array(devices), ("d",))
    one = functools.partial(_generate_one, kind=kind, width=width, config=config)

    block = config.task_block if config.task_block > 1 else None

    def per_device(streams, hp, budget):
        return jax.lax.map(lambda a: one(*a), (streams, hp, budget), batch_size=block)

    return jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False),
        in_shardings=NamedSharding(mesh, P("d")),
        compiler_options=_compiler_options(devices[0].platform),
    )


def _compiler_options(platform: str) -> dict[str, int]:
    """XLA options of the chunk programs.

    On CPUs with AVX-512, XLA:CPU still vectorises for 256-bit registers by default; the
    prior's element-wise integer hashing and polynomials run ~30% faster at 512 bits
    (MLP tasks; docs/prior.md). Task bytes then differ from a 256-bit build.
    """
    if platform == "cpu" and _has_avx512():
        return {"xla_cpu_prefer_vector_width": 512}
    return {}


@functools.cache
def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def _kind_of(family: np.ndarray, width: np.ndarray, config: PriorConfig) -> list[tuple[str, int]]:
    widths = np.asarray(config.widths)
    bucket = widths[np.searchsorted(widths, width)]
    return [
        (_TREE, 0) if f == FAMILY_TREE else ("mlp", int(w))
        for f, w in zip(family, bucket, strict=True)
    ]


def _hparams_settings(config: PriorConfig) -> PriorConfig:
    """``config`` with the fields hyperparameter sampling does not read set to defaults,
    so configs that differ only there share one compiled hyperparameter program."""
    return config.replace(
        cat_prob=0.0,
        attempts=1,
        sine_terms=1,
        sine_table=0,
        tree_candidates=1,
        tree_tail_candidates=0,
        chunk_size=1,
        task_block=1,
        widths=(config.max_hidden,),
    )


def _plan(seed: int, start: int, count: int, config: PriorConfig):
    """Hyperparameters (name -> array[count]), streams u32[count, 2] and kinds of tasks
    ``start .. start + count - 1``, computed in fixed blocks so any count reuses one
    compiled program."""
    padded = max(1, -(-count // _HPARAM_BLOCK)) * _HPARAM_BLOCK
    indices = (start + np.arange(padded, dtype=np.int64)).astype(np.uint32)  # pad may wrap
    settings = _hparams_settings(config)
    blocks = [
        _hparams_and_streams(np.uint32(seed), indices[lo : lo + _HPARAM_BLOCK], settings)
        for lo in range(0, padded, _HPARAM_BLOCK)
    ]
    hp = {
        name: np.concatenate([np.asarray(getattr(h, name)) for h, _ in blocks])[:count]
        for name in HParams._fields
    }
    streams = np.concatenate([np.asarray(s) for _, s in blocks])[:count]
    return hp, streams, _kind_of(hp["family"], hp["width"], config)


def needed_kinds(
    seed: int, start: int, count: int, config: PriorConfig | None = None
) -> list[tuple[str, int]]:
    """The kinds of program (family, padded width) tasks ``start .. start + count - 1`` need."""
    config = config or PriorConfig()
    _check_range(seed, start, count)
    return sorted(set(_plan(seed, start, count, config)[2]))


def compile_kinds(
    kinds: Sequence[tuple[str, int]],
    config: PriorConfig | None = None,
    *,
    devices: Sequence | None = None,
) -> None:
    """Compiles (and caches) the chunk programs of ``kinds``, side by side on the cores."""
    config = config or PriorConfig()
    devs = _devices(devices)
    per_call = config.chunk_size * len(devs)
    hp, streams, _ = _plan(0, 0, 1, config)

    def compile_one(kind: tuple[str, int]) -> None:
        program = _chunk_program(kind[0], kind[1], config, devs)
        # No attempts: compiles, computes nothing.
        args = chunk_args(hp, streams, np.zeros(1, np.int64), per_call, attempts=0)
        jax.block_until_ready(program(*args))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # XLA compiles a program on one core; independent programs compile side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(len(kinds), cores or 1))) as pool:
        list(pool.map(compile_one, [tuple(k) for k in kinds]))


def compile_programs(
    seed: int,
    start: int,
    count: int,
    config: PriorConfig | None = None,
    *,
    devices: Sequence | None = None,
) -> list[tuple[str, int]]:
    """Compiles (and caches) every program the given index range needs; returns the kinds.

    Generation compiles on first use anyway; this lets callers time compilation apart
    from steady-state generation.
    """
    kinds = needed_kinds(seed, start, count, config)
    compile_kinds(kinds, config, devices=devices)
    return kinds


def chunk_args(
    hp: dict[str, np.ndarray],
    streams: np.ndarray,
    positions: np.ndarray,
    per_call: int,
    attempts: int,
) -> tuple[np.ndarray, HParams, np.ndarray]:
    """(streams, HParams, i32 attempt budgets) of one chunk call, ``per_call`` slots.

    Slot i < len(positions) holds task ``positions[i]`` (1 <= len <= per_call) of a plan
    (``hp``: name -> array[n], ``streams``: u32[n, 2]) with ``attempts`` attempts; the
    padding slots repeat the first task with a budget of 0, so they compute nothing.
    """
    take = np.concatenate([positions, np.full(per_call - len(positions), positions[0])])
    budget = np.where(np.arange(per_call) < len(positions), attempts, 0).astype(np.int32)
    return streams[take], HParams(**{n: v[take] for n, v in hp.items()}), budget


@dataclass
class _Pending:
    """Dispatched (not yet fetched) work of one batch."""

    seed: int
    start: int
    count: int
    hp: dict[str, np.ndarray]
    parts: list[tuple[np.ndarray, object]]  # (positions, device outputs)


def _dispatch(seed: int, start: int, count: int, config: PriorConfig, devices: tuple) -> _Pending:
    hp, streams, kinds = _plan(seed, start, count, config)
    parts = []
    for kind in sorted(set(kinds)):
        positions = np.array([i for i, k in enumerate(kinds) if k == kind])
        parts += dispatch_kind(kind, positions, hp, streams, config, devices)
    return _Pending(seed, start, count, hp, parts)


def dispatch_kind(
    kind: tuple[str, int],
    positions: np.ndarray,
    hp: dict[str, np.ndarray],
    streams: np.ndarray,
    config: PriorConfig,
    devices: tuple,
) -> list[tuple[np.ndarray, object]]:
    """Starts the chunk calls of tasks ``positions`` of a plan, all of one ``kind``;
    returns (positions, device outputs) of each call."""
    program = _chunk_program(kind[0], kind[1], config, devices)
    per_call = config.chunk_size * len(devices)
    parts = []
    for lo in range(0, len(positions), per_call):
        pos = positions[lo : lo + per_call]
        parts.append((pos, program(*chunk_args(hp, streams, pos, per_call, config.attempts))))
    return parts


def _collect(p: _Pending, config: PriorConfig, out: tuple | None = None) -> TaskBatch:
    n, rows, slots = p.count, config.rows, config.max_features
    # Every position is written below, once: the parts partition the batch by kind.
    if out is None:
        out = np.empty((n, rows, slots), np.float32), np.empty((n, rows), np.int32)
    X, y = out
    n_features = np.zeros(n, np.int32)
    n_classes = np.zeros(n, np.int32)
    categorical = np.zeros((n, slots), bool)
    valid = np.zeros(n, bool)
    attempts = np.zeros(n, np.int32)
    for pos, (out, tries) in p.parts:
        k = len(pos)
        X[pos] = np.asarray(out.X)[:k]
        y[pos] = np.asarray(out.y)[:k]
        n_features[pos] = np.asarray(out.n_features)[:k]
        n_classes[pos] = np.asarray(out.n_classes)[:k]
        categorical[pos] = np.asarray(out.categorical)[:k]
        valid[pos] = np.asarray(out.valid)[:k]
        attempts[pos] = np.asarray(tries)[:k]
    hp = p.hp
    extra = {
        "attempts": attempts,
        "n_classes_drawn": hp["n_classes"],
        "noise_std": hp["noise_std"],
        "sampling": _SAMPLING_NAMES[hp["sampling"]],
        "class_thresholds": np.where(hp["rank_classes"], "rank", "value"),
        # MLP architecture (a tree task draws its own; Task.extra omits these for trees)
        "is_causal": hp["is_causal"],
        "num_layers": hp["num_layers"],
        "hidden": hp["hidden"],
        "init_std": hp["init_std"],
    }
    return TaskBatch(
        X=X,
        y=y,
        n_features=n_features,
        n_classes=n_classes,
        n_train=hp["n_train"].astype(np.int32),
        categorical=categorical,
        family=np.asarray(FAMILY_NAMES)[hp["family"]],
        valid=valid,
        seed=p.seed,
        start=p.start,
        extra=extra,
    )


def _check_range(seed: int, start: int, count: int) -> None:
    if not 0 <= seed < 2**32:
        raise PriorConfigError(f"seed={seed} must be in [0, 2^32)")
    if start < 0 or count < 0 or start + count > 2**32:
        raise PriorConfigError(f"task indices [{start}, {start + count}) must lie in [0, 2^32)")


def _devices(devices: Sequence | None) -> tuple:
    return tuple(devices) if devices is not None else tuple(jax.devices())


def sample_tasks(
    seed: int,
    start: int,
    count: int,
    config: PriorConfig | None = None,
    *,
    devices: Sequence | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> TaskBatch:
    """Tasks ``start .. start + count - 1`` of corpus ``seed``.

    Always returns ``count`` tasks; ``valid[i]`` is False where all attempts failed.
    ``devices`` defaults to all of ``jax.devices()``; the result does not depend on it.
    ``out``: arrays (X f32[count, rows, max_features], y i32[count, rows]) the tasks'
    X and y are written into, e.g. shared memory, instead of new ones; the batch holds
    them.
    """
    config = config or PriorConfig()
    _check_range(seed, start, count)
    if out is not None:
        _check_out(out, count, config)
    return _collect(_dispatch(seed, start, count, config, _devices(devices)), config, out)


def _check_out(out: tuple, count: int, config: PriorConfig) -> None:
    expected = (
        ((count, config.rows, config.max_features), np.dtype(np.float32)),
        ((count, config.rows), np.dtype(np.int32)),
    )
    if len(out) != 2:
        raise ValueError(f"out must be (X, y), got {len(out)} arrays")
    for name, array, (shape, dtype) in zip("Xy", out, expected, strict=True):
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
            got = (
                f"{array.dtype}{list(array.shape)}"
                if isinstance(array, np.ndarray)
                else type(array).__name__
            )
            raise ValueError(f"out {name} must be a numpy {dtype}{list(shape)} array, got {got}")
        if not array.flags.writeable:
            raise ValueError(f"out {name} is read-only")


def iter_task_batches(
    seed: int,
    start: int,
    count: int,
    config: PriorConfig | None = None,
    batch_size: int = 256,
    *,
    devices: Sequence | None = None,
) -> Iterator[TaskBatch]:
    """Tasks ``start .. start + count - 1`` of ``seed`` as consecutive batches.

    Batch k+1 is dispatched to the devices before batch k is handed out, so generation
    overlaps with whatever the caller does with batch k.
    """
    config = config or PriorConfig()
    bounds = batch_bounds(seed, start, count, batch_size)
    devs = _devices(devices)
    pending = _dispatch(seed, *_span(bounds[0]), config, devs) if bounds else None
    for k in range(len(bounds)):
        nxt = _dispatch(seed, *_span(bounds[k + 1]), config, devs) if k + 1 < len(bounds) else None
        yield _collect(pending, config)
        pending = nxt


def batch_bounds(seed: int, start: int, count: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of consecutive batches of tasks ``start .. start + count - 1``
    (the last one may be shorter); raises PriorConfigError for a bad range or size."""
    _check_range(seed, start, count)
    if batch_size < 1:
        raise PriorConfigError(f"batch_size={batch_size} must be >= 1")
    end = start + count
    return [(lo, min(lo + batch_size, end)) for lo in range(start, end, batch_size)]


def _span(bound: tuple[int, int]) -> tuple[int, int]:
    lo, hi = bound
    return lo, hi - lo
