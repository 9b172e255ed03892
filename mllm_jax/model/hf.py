"""Hugging Face checkpoints in and out: `load_hf` and `save_hf`.

The name mapping between HF tensors and our parameters is the one table `NAME_TABLE`.
Loading builds the model abstractly (`nnx.eval_shape`, no memory), then places each
tensor straight into its target sharding, reading from the (memory-mapped) safetensors
only the slices this process's devices hold: on a multi-host mesh each host reads its
share of a sharded weight, and the full model never sits on one device. Saving writes
into a temporary directory next to the target and renames it at the end: an interrupted
export leaves nothing that looks like a checkpoint. In a multi-host job every process
calls `save_hf` (gathering a sharded weight is collective) and process 0 alone writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mllm_jax.foundation.directories import atomic_directory, check_output_directory
from mllm_jax.foundation.distributed import barrier
from mllm_jax.model.config import Qwen2Config
from mllm_jax.model.qwen2 import Qwen2ForCausalLM
from mllm_jax.model.sharding import AXIS_UNITS, LOGICAL_AXES, ShardingRules, logical_to_spec

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_PROJ = "(q_proj|k_proj|v_proj|o_proj)"
_MLP = "(gate_proj|up_proj|down_proj)"
_NORM = "(input_layernorm|post_attention_layernorm)"

# (HF tensor name, our parameter path, HF stores the transpose). `{L}` is the layer
# index; `(a|b)` a group copied verbatim between the two names.
NAME_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    (f"model.layers.{{L}}.self_attn.{_PROJ}.weight", f"layers.{{L}}.self_attn.{_PROJ}.kernel", True),
    ("model.layers.{L}.self_attn.(q_proj|k_proj|v_proj).bias", "layers.{L}.self_attn.(q_proj|k_proj|v_proj).bias", False),
    (f"model.layers.{{L}}.mlp.{_MLP}.weight", f"layers.{{L}}.mlp.{_MLP}.kernel", True),
    (f"model.layers.{{L}}.{_NORM}.weight", f"layers.{{L}}.{_NORM}.scale", False),
    ("model.norm.weight", "norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
)  # fmt: skip

# Tensors some checkpoints carry that hold nothing we need.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as the expected Qwen2 model."""


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    # re.escape escapes the group syntax; restore groups and the layer placeholder.
    pattern = pattern.replace(r"\{L\}", r"(?P<L>\d+)")
    pattern = re.sub(
        r"\\\((.*?)\\\)", lambda m: "(" + m.group(1).replace("\\|", "|") + ")", pattern
    )
    return re.compile(pattern + "$")


def _fill(template: str, match: re.Match[str]) -> str:
    groups = [g for i, g in enumerate(match.groups(), start=1) if i != match.re.groupindex.get("L")]
    out = template.replace("{L}", match.group("L")) if "{L}" in template else template
    for g in groups:
        out = re.sub(r"\([^)]*\)", g, out, count=1)
    return out


_HF_TO_OURS = [(_template_regex(hf), ours, t) for hf, ours, t in NAME_TABLE]
_OURS_TO_HF = [(_template_regex(ours), hf, t) for hf, ours, t in NAME_TABLE]


def hf_to_ours(name: str) -> tuple[str, bool] | None:
    """(our parameter path, transpose) for an HF tensor name, or None if unknown."""
    for regex, template, transpose in _HF_TO_OURS:
        m = regex.match(name)
        if m:
            return _fill(template, m), transpose
    return None


def ours_to_hf(path: str) -> tuple[str, bool]:
    """(HF tensor name, transpose) for our parameter path."""
    for regex, template, transpose in _OURS_TO_HF:
        m = regex.match(path)
        if m:
            return _fill(template, m), transpose
    raise KeyError(f"parameter {path!r} has no HF name in NAME_TABLE")


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _flat_params(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield _path_str(path), var


# ------------------------------------------------------------------------------ load


def _tensor_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file, from the index or the single file."""
    index = directory / SAFETENSORS_INDEX
    single = directory / SAFETENSORS_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        files = {name: directory / fname for name, fname in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"{index} lists files that do not exist: {missing}")
        return files
    if single.exists():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{directory}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: cannot read safetensors ({err})") from None


class _SliceReader:
    """`make_array_from_callback` callback: the block `index` of one stored tensor in our
    layout and dtype, read from the file alone (a device's shard, not the whole tensor).
    Blocks asked for again (replicas on several local devices) are read once."""

    def __init__(self, stored: Any, transpose: bool, dtype: Any, what: str):
        self.stored = stored
        self.transpose = transpose
        self.dtype = dtype
        self.what = what
        self.blocks: dict[tuple, np.ndarray] = {}

    def __call__(self, index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in self.blocks:
            wanted = tuple(reversed(index)) if self.transpose else tuple(index)
            try:
                block = self.stored[wanted] if wanted else self.stored[:]
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{self.what}: cannot read ({err})") from None
            block = block.T if self.transpose else block
            self.blocks[key] = np.ascontiguousarray(block.astype(self.dtype))
        return self.blocks[key]


def _target_sharding(var: nnx.Variable, mesh, rules, notes: list[str]) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = logical_to_spec(
        var.get_metadata(LOGICAL_AXES),
        var.shape,
        mesh,
        rules,
        units=var.get_metadata(AXIS_UNITS),
        notes=notes,
    )
    return jax.sharding.NamedSharding(mesh, spec)


def load_hf(
    path: str | os.PathLike,
    dtype: Any | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any | None = None,
    **runtime: Any,
) -> Qwen2ForCausalLM:
    """Reads an HF Qwen2 directory (config.json + model.safetensors or a sharded index).

    dtype: parameter storage dtype (default: the checkpoint's). mesh/rules: place each
    parameter by its logical axes (`mllm_jax.model.sharding.ShardingRules`, default rules if
    None); without a mesh everything goes to the first device. `runtime`: other runtime
    config fields (compute_dtype, attention_backend, attention_query_chunk, remat).
    Raises CheckpointError / ConfigError naming the file and tensor on bad input.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if dtype is not None:
        runtime["param_dtype"] = dtype
    config = Qwen2Config.from_json_file(directory / "config.json", **runtime)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    targets = dict(_flat_params(abstract))
    if mesh is not None and rules is None:
        rules = ShardingRules.default()

    files = _tensor_files(directory)
    loaded: dict[str, jax.Array] = {}
    notes: list[str] = []
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                mapped = hf_to_ours(name)
                if mapped is None:
                    if _IGNORED_HF.match(name):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        log.info("%s: lm_head.weight ignored (tie_word_embeddings)", file)
                        continue
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} for a Qwen2 model")
                ours, transpose = mapped
                if ours not in targets:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    raise CheckpointError(
                        f"{file}: tensor {name!r} does not fit this config (no parameter {ours})"
                    )
                try:
                    stored = f.get_slice(name)
                    shape = tuple(stored.get_shape())
                except (SafetensorError, OSError) as err:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from None
                var = targets[ours]
                ours_shape = tuple(reversed(shape)) if transpose else shape
                if ours_shape != var.shape:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has shape {shape}, config expects "
                        f"{tuple(reversed(var.shape)) if transpose else var.shape}"
                    )
                sharding = _target_sharding(var, mesh, rules, notes)
                read = _SliceReader(stored, transpose, var.dtype, f"{file}: tensor {name!r}")
                loaded[ours] = jax.make_array_from_callback(var.shape, sharding, read)
    missing = sorted(set(targets) - set(loaded))
    if missing:
        names = [ours_to_hf(p)[0] for p in missing]
        raise CheckpointError(f"{directory}: checkpoint lacks tensors {names}")
    for note in sorted(set(notes)):
        log.info("load_hf: %s", note)
    for path_, var in nnx.to_flat_state(state):
        var.set_value(loaded[_path_str(path_)])
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ save


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _plan_shards(
    entries: list[tuple[str, str, bool, tuple[int, ...]]], itemsize: int, max_bytes: int
) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (*_, shape) in enumerate(entries):
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def save_hf(
    model: Qwen2ForCausalLM,
    path: str | os.PathLike,
    dtype: Any | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Writes `model` as an HF Qwen2 checkpoint directory transformers can load.

    safetensors in `dtype` (default: the parameters' dtype), split into
    model-0000i-of-0000n.safetensors + model.safetensors.index.json above
    `max_shard_bytes`; config.json (key `dtype`, architectures Qwen2ForCausalLM) and
    generation_config.json. Written to a temporary sibling directory and renamed into
    place. An existing `path` is replaced only with overwrite=True (else FileExistsError).
    A `path` that cannot be written or replaced raises OutputDirectoryError
    (`mllm_jax.foundation.directories`) and leaves nothing behind.

    Multi-host: process 0 writes. A model sharded over several processes is gathered
    tensor by tensor, so every process must call `save_hf`, and none returns before the
    checkpoint is in place. A model every process holds whole is saved by process 0
    alone (the others return at once).
    """
    target = Path(path)
    variables = dict(_flat_params(model))
    collective = any(not var.get_value().is_fully_addressable for var in variables.values())
    is_writer = jax.process_index() == 0
    if not (is_writer or collective):
        return target
    # Checked before the gathers by every process of a collective save, so that all of
    # them raise and none waits for the others.
    check_output_directory(target, overwrite=overwrite)
    config: Qwen2Config = model.config
    out_dtype = jnp.dtype(dtype if dtype is not None else config.param_dtype)
    entries = []
    for ours, var in _flat_params(model):
        name, transpose = ours_to_hf(ours)
        shape = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
        entries.append((name, ours, transpose, shape))
    shards = _plan_shards(entries, out_dtype.itemsize, max_shard_bytes)

    # Process 0 writes into a temporary sibling renamed into place at the end; the others
    # only take part in the gathers.
    with atomic_directory(target) if is_writer else contextlib.nullcontext() as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for k, shard in enumerate(shards, start=1):
            fname = (
                SAFETENSORS_FILE
                if len(shards) == 1
                else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            )
            tensors = {}
            for i in shard:
                name, ours, transpose, _ = entries[i]
                host = _to_host(variables[ours].get_value()).astype(out_dtype)
                tensors[name] = np.ascontiguousarray(host.T if transpose else host)
                weight_map[name] = fname
                total += tensors[name].nbytes
            if tmp is not None:
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        if tmp is not None:
            if len(shards) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (tmp / "config.json").write_text(
                json.dumps(config.to_hf_dict(out_dtype), indent=2) + "\n"
            )
            (tmp / "generation_config.json").write_text(
                json.dumps(_generation_config(config), indent=2) + "\n"
            )
    if collective:
        barrier(f"save_hf {target}")
    return target


def _generation_config(config: Qwen2Config) -> dict[str, Any]:
    out: dict[str, Any] = {"do_sample": False}
    if config.bos_token_id is not None:
        out["bos_token_id"] = config.bos_token_id
    if config.eos_token_id is not None:
        out["eos_token_id"] = (
            list(config.eos_token_id)
            if isinstance(config.eos_token_id, tuple)
            else config.eos_token_id
        )
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out
