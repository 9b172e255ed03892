"""LoRA written for our Qwen2: adapters on `Linear` layers, merge/unmerge, trainable filter.

An adapter adds a low-rank update to one projection (PEFT's formula and initialisation):

    y = x @ W + b + (dropout(x) @ A @ B) * alpha / r        A: f32[in, r], B: f32[r, out]

A is drawn uniform(-1/sqrt(in), 1/sqrt(in)) (what PEFT's default kaiming_uniform(a=sqrt(5))
gives), B starts at zero, so a fresh adapter leaves the model's output unchanged. A and B
are `LoRAParam` variables in float32 (the trainable master weights) whatever the base
dtype; the update is computed in the model's compute dtype with float32 accumulation.

`LoRAParam` is deliberately NOT an `nnx.Param` subclass (Flax's own `nnx.LoRAParam` is):
`nnx.Param` then selects exactly the base weights and `LoRAParam` exactly the adapters, so
a trainer differentiating `nnx.DiffState(0, LoRAParam)` never materialises base-weight
gradients, and code that reads `nnx.Param` (HF export, full fine-tuning) never sees an
adapter by accident.

Dropout (off by default: the reference uses 0) is an `nnx.Dropout` with its own RNG
stream per adapter (an `nnx.RngKey` seeded from apply_lora's key and the adapter's path,
and an `nnx.RngCount` that every training forward advances by one). It is created
inactive: `model.train()` turns it on, `model.eval()` off, so inference never drops by
accident. A functional train step carries the `nnx.RngState` through the step (returns
the advanced state) and checkpoints it; then a resumed run replays the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.model.qwen2 import Linear
from mllm_jax.model.sharding import AXIS_UNITS, LOGICAL_AXES, ShardingRules, logical_to_spec

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Logical name of the rank dim of A and B; the default sharding rules replicate it.
LORA_RANK_AXIS = "lora_rank"


class LoRAError(ValueError):
    """A LoRA config or adapter that does not fit the model it is applied to."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which linears get adapters, and their rank, scale and dropout.

    rank: r, the inner dim of A [in, r] and B [r, out]. alpha: the update is scaled by
    alpha / rank. dropout: rate applied to the adapter's input while training.
    targets: regular expressions; a linear gets an adapter when one of them fully matches
    its own name (e.g. "q_proj") or its whole path in the model (e.g.
    r"layers\\.(0|1)\\.self_attn\\.q_proj"). The untied LM head is a linear too ("lm_head").
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoRAError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            raise LoRAError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise LoRAError("LoRA targets are empty; give at least one name pattern")
        for pattern in targets:
            if not isinstance(pattern, str) or not pattern:
                raise LoRAError(f"LoRA target {pattern!r} is not a non-empty string")
            try:
                re.compile(pattern)
            except re.error as err:
                raise LoRAError(f"LoRA target {pattern!r} is not a valid regex ({err})") from None
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAParam(nnx.Variable):
    """A LoRA adapter weight (A or B). Not an `nnx.Param`: see the module docstring."""


class LoRA(nnx.Module):
    """The adapter of one Linear: adds (dropout(x) @ A @ B) * alpha / rank to its output.

    a: f32[in, r], b: f32[r, out] (LoRAParam, logical axes of the kernel's dims with the
    rank dim named LORA_RANK_AXIS). `merged` is True while the update is folded into the
    base kernel (`merge_lora`); the adapter then adds nothing. With dropout > 0,
    `dropout` is an inactive `nnx.Dropout` with its own RNG stream (see module docstring).
    """

    def __init__(
        self,
        a: LoRAParam,
        b: LoRAParam,
        *,
        alpha: float,
        compute_dtype: jnp.dtype,
        dropout: float = 0.0,
        dropout_key: jax.Array | None = None,
    ):
        if a.shape[1] != b.shape[0]:
            raise LoRAError(f"LoRA A {a.shape} and B {b.shape} disagree on the rank")
        self.a = a
        self.b = b
        self.rank = int(a.shape[1])
        self.alpha = float(alpha)
        self.compute_dtype = compute_dtype
        self.merged = False
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if dropout > 0 and dropout_key is None:
            raise LoRAError(f"LoRA dropout {dropout} needs a dropout_key")
        # Inactive until model.train(): inference never drops by accident.
        self.dropout = nnx.data(
            nnx.Dropout(dropout, deterministic=True, rngs=nnx.Rngs(dropout=dropout_key))
            if dropout > 0
            else None
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def dropout_rate(self) -> float:
        return 0.0 if self.dropout is None else float(self.dropout.rate)

    def delta(self) -> jax.Array:
        """f32[in, out]: the update A @ B * alpha / rank, in full float32 precision."""
        ab = jnp.matmul(
            self.a[...].astype(jnp.float32),
            self.b[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return ab * jnp.float32(self.scale)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x: [..., in] (the Linear's input), y: f32[..., out] (its output so far) ->
        f32[..., out] with the update added (y itself while merged)."""
        if self.merged:
            return y
        dtype = self.compute_dtype
        h = x.astype(dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        low = jnp.matmul(h, self.a[...].astype(dtype), preferred_element_type=jnp.float32)
        update = jnp.matmul(
            low.astype(dtype), self.b[...].astype(dtype), preferred_element_type=jnp.float32
        )
        return y + update * jnp.float32(self.scale)


# --------------------------------------------------------------------------- lookup


def _path_str(path: Iterable[object]) -> str:
    return ".".join(str(p) for p in path)


def linear_layers(model: nnx.Module) -> dict[str, Linear]:
    """Every `Linear` of `model` by dotted path ("layers.0.self_attn.q_proj"), in order."""
    return {
        _path_str(path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Linear)
    }


def lora_layers(model: nnx.Module) -> dict[str, Linear]:
    """The Linears of `model` that carry an adapter, by dotted path."""
    return {p: lin for p, lin in linear_layers(model).items() if lin.lora is not None}


def target_matches(pattern: str, path: str) -> bool:
    """Whether a LoRAConfig target `pattern` selects the linear at dotted `path`."""
    name = path.rsplit(".", 1)[-1]
    return re.fullmatch(pattern, name) is not None or re.fullmatch(pattern, path) is not None


def match_targets(model: nnx.Module, targets: Iterable[str]) -> list[str]:
    """Paths of the linears that `targets` select. Raises LoRAError naming every pattern
    that selects nothing (a typo would otherwise silently drop a target)."""
    targets = tuple(targets)
    paths = list(linear_layers(model))
    unmatched = [t for t in targets if not any(target_matches(t, p) for p in paths)]
    if unmatched:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise LoRAError(
            f"LoRA target patterns {unmatched} match no linear layer of the model "
            f"(linear names: {names}; paths look like {paths[0] if paths else None!r})"
        )
    return [p for p in paths if any(target_matches(t, p) for t in targets)]


# --------------------------------------------------------------------------- attach


def _lora_param(value: jax.Array, axes: tuple, units: tuple) -> LoRAParam:
    return LoRAParam(value, **{LOGICAL_AXES: tuple(axes), AXIS_UNITS: tuple(units)})


def adapter_axes(linear: Linear) -> tuple[tuple[tuple, tuple], tuple[tuple, tuple]]:
    """((A axes, A units), (B axes, B units)) from the kernel's logical-axis metadata."""
    meta = linear.kernel.get_metadata()
    axes = meta.get(LOGICAL_AXES, (None, None))
    units = meta.get(AXIS_UNITS, (1, 1))
    return ((axes[0], LORA_RANK_AXIS), (units[0], 1)), ((LORA_RANK_AXIS, axes[1]), (1, units[1]))


def attach_adapter(
    linear: Linear,
    a: jax.Array,
    b: jax.Array,
    *,
    alpha: float,
    dropout: float = 0.0,
    dropout_key: jax.Array | None = None,
    path: str = "linear",
) -> LoRA:
    """Attaches an adapter with the given A: [in, r] and B: [r, out] (stored float32)."""
    if linear.lora is not None:
        raise LoRAError(f"{path} already has a LoRA adapter (adapters do not stack)")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != linear.in_features:
        raise LoRAError(f"{path}: LoRA A has shape {a.shape}, expected [{linear.in_features}, r]")
    if b.shape != (a.shape[1], linear.out_features):
        raise LoRAError(
            f"{path}: LoRA B has shape {b.shape}, expected [{a.shape[1]}, {linear.out_features}]"
        )
    (a_axes, a_units), (b_axes, b_units) = adapter_axes(linear)
    adapter = LoRA(
        _lora_param(a.astype(jnp.float32), a_axes, a_units),
        _lora_param(b.astype(jnp.float32), b_axes, b_units),
        alpha=alpha,
        compute_dtype=linear.compute_dtype,
        dropout=dropout,
        dropout_key=dropout_key,
    )
    linear.lora = adapter
    return adapter


@functools.lru_cache(maxsize=16)
def _adapter_drawer(shapes: tuple, rank: int, shardings: tuple | None):
    """A jitted key -> ((A, B), ...) per (in, out) in `shapes`: A uniform(+-1/sqrt(in)), B
    zeros, all in one call placed straight into `shardings`; cached per layout so
    repeated apply_lora calls compile once."""

    def draw(key):
        out = []
        for i, (fan_in, fan_out) in enumerate(shapes):
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(
                jax.random.fold_in(key, i), (fan_in, rank), jnp.float32, -bound, bound
            )
            out.append((a, jnp.zeros((rank, fan_out), jnp.float32)))
        return tuple(out)

    return jax.jit(draw, out_shardings=shardings)


def apply_lora(
    model: nnx.Module,
    config: LoRAConfig,
    key: jax.Array | int,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> list[str]:
    """Attaches a fresh adapter, in place, to every Linear that `config.targets` selects.

    key: PRNG key (or int seed) for the A init and the dropout streams; adapter i (in
    path order) draws A from fold_in(init key, i), its dropout stream starts from a key
    folded with a hash of its path.
    mesh/rules: place A and B straight into their shardings (`mllm_jax.model.sharding`);
    without a mesh they are left on the default device.
    Returns the dotted paths of the adapted linears. Raises LoRAError if a pattern
    matches nothing or a selected linear already has an adapter.
    """
    key = jax.random.key(key) if isinstance(key, int) else key
    paths = match_targets(model, config.targets)
    linears = linear_layers(model)
    taken = [p for p in paths if linears[p].lora is not None]
    if taken:
        raise LoRAError(f"linears already carry a LoRA adapter: {taken}")
    init_key, dropout_key = jax.random.split(key)
    shapes = [(linears[p].in_features, linears[p].out_features) for p in paths]
    shardings = None
    if mesh is not None:
        rules = rules or ShardingRules.default()

        def sharding(axes, units, shape):
            spec = logical_to_spec(axes, shape, mesh, rules, units=units)
            return jax.sharding.NamedSharding(mesh, spec)

        shardings = []
        for p, (fan_in, fan_out) in zip(paths, shapes, strict=True):
            (a_axes, a_units), (b_axes, b_units) = adapter_axes(linears[p])
            shardings.append(
                (
                    sharding(a_axes, a_units, (fan_in, config.rank)),
                    sharding(b_axes, b_units, (config.rank, fan_out)),
                )
            )
    shardings = None if shardings is None else tuple(shardings)
    weights = _adapter_drawer(tuple(shapes), config.rank, shardings)(init_key)
    for p, (a, b) in zip(paths, weights, strict=True):
        attach_adapter(
            linears[p],
            a,
            b,
            alpha=config.alpha,
            dropout=config.dropout,
            dropout_key=(_path_key(dropout_key, p) if config.dropout > 0 else None),
            path=p,
        )
    return paths


def _path_key(key: jax.Array, path: str) -> jax.Array:
    # A stable hash of the adapter's path: its stream does not depend on which other
    # linears are targeted.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def copy_adapters(source: nnx.Module, target: nnx.Module, key: jax.Array | int = 0) -> list[str]:
    """Attaches to `target` the adapters of `source` (same A/B values, alpha and dropout
    rate; fresh dropout streams from `key`), e.g. to merge trained adapters into the
    base as stored on disk rather than into a bf16 training copy of it. Returns the paths.
    Raises LoRAError if a path is missing in `target` or has other shapes."""
    key = jax.random.key(key) if isinstance(key, int) else key
    adapted = lora_layers(source)
    if not adapted:
        raise LoRAError("the source model has no LoRA adapters (was apply_lora called?)")
    linears = linear_layers(target)
    missing = [p for p in adapted if p not in linears]
    if missing:
        raise LoRAError(f"the target model has no linear layers {missing}")
    taken = [p for p in adapted if linears[p].lora is not None]
    if taken:
        raise LoRAError(f"linears of the target already carry a LoRA adapter: {taken}")
    for p, linear in adapted.items():
        if (linear.in_features, linear.out_features) != (
            linears[p].in_features,
            linears[p].out_features,
        ):
            raise LoRAError(
                f"{p}: source linear is [{linear.in_features}, {linear.out_features}], target "
                f"[{linears[p].in_features}, {linears[p].out_features}]"
            )
    for p, linear in adapted.items():
        attach_adapter(
            linears[p],
            linear.lora.a.get_value(),
            linear.lora.b.get_value(),
            alpha=linear.lora.alpha,
            dropout=linear.lora.dropout_rate,
            dropout_key=_path_key(key, p) if linear.lora.dropout_rate > 0 else None,
            path=p,
        )
    return list(adapted)


def remove_lora(model: nnx.Module) -> list[str]:
    """Detaches every adapter (without merging it); returns the paths it was on."""
    layers = lora_layers(model)
    for linear in layers.values():
        linear.lora = None
    return list(layers)


# --------------------------------------------------------------------------- merge


@jax.jit
def _add_delta(kernel: jax.Array, delta: jax.Array, sign: float) -> jax.Array:
    """(kernel + sign * delta) computed in float32, cast back to the kernel's dtype."""
    return (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)


def _fold(linear: Linear, sign: float) -> None:
    old = linear.kernel.get_value()
    new = _add_delta(old, linear.lora.delta(), sign)
    if getattr(old, "sharding", None) is not None and new.sharding != old.sharding:
        new = jax.device_put(new, old.sharding)
    linear.kernel.set_value(new)


def _iter_adapted(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters (was apply_lora called?)")
    yield from layers.items()


def merge_lora(model: nnx.Module) -> list[str]:
    """Folds every unmerged adapter into its kernel, in place: W <- W + A @ B * alpha / r
    in float32, cast to W's dtype. Adapters stay attached (marked merged, adding nothing)
    so `unmerge_lora` can undo it. Returns the paths merged now."""
    done = []
    for path, linear in _iter_adapted(model):
        if not linear.lora.merged:
            _fold(linear, 1.0)
            linear.lora.merged = True
            done.append(path)
    return done


def unmerge_lora(model: nnx.Module) -> list[str]:
    """Undoes `merge_lora`: W <- W - A @ B * alpha / r (float32, cast back). Exact up to
    one rounding to W's dtype per merge and unmerge (bf16 kernels: about 2^-8 relative).
    Returns the paths unmerged now."""
    done = []
    for path, linear in _iter_adapted(model):
        if linear.lora.merged:
            _fold(linear, -1.0)
            linear.lora.merged = False
            done.append(path)
    return done


def merged_copy(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its kernel and no adapters left
    (a plain Qwen2 for export or inference); `model` itself is not changed.

    Arrays the merge does not touch are shared with `model` (jax arrays are immutable), so
    the extra memory is one copy of the adapted kernels.
    """
    copy = nnx.clone(model)
    for _, linear in _iter_adapted(copy):
        if not linear.lora.merged:
            _fold(linear, 1.0)
        linear.lora = None
    return copy


def lora_param_count(model: nnx.Module) -> int:
    """Number of adapter weights (A and B entries) in `model`."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
