"""LoRA adapters in PEFT's on-disk format: `save_peft_adapter` and `load_peft_adapter`.

A PEFT LoRA adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
with, per adapted module, `base_model.model.<HF module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] (torch layout: our A [in, r] and B [r, out] transposed). HF
module names come from `mllm_jax.model.hf` (our "layers.0.self_attn.q_proj" is HF's
"model.layers.0.self_attn.q_proj"). `peft.PeftModel.from_pretrained(base, directory)`
loads what we write; we load what peft writes, for the plain LoRA it computes
(y += B(A(dropout(x))) * lora_alpha / r) and refuse every option that changes that math.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mllm_jax.foundation.directories import atomic_directory, check_output_directory
from mllm_jax.model.hf import hf_to_ours, ours_to_hf
from mllm_jax.model.lora import (
    LoRAError,
    adapter_axes,
    attach_adapter,
    linear_layers,
    lora_layers,
)
from mllm_jax.model.sharding import ShardingRules, logical_to_spec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_TENSOR_KEY = re.compile(
    re.escape(PEFT_PREFIX) + r"(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight"
)

# adapter_config.json options that change the computation away from plain LoRA, with the
# value under which they are harmless.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "use_rslora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "use_qalora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
}


# --------------------------------------------------------------------------- names


def hf_module_name(path: str) -> str:
    """HF module name of our Linear at dotted `path` ("layers.0.mlp.up_proj" ->
    "model.layers.0.mlp.up_proj")."""
    name, _ = ours_to_hf(path + ".kernel")
    return name.removesuffix(".weight")


def our_linear_path(module: str) -> str | None:
    """Our Linear path for an HF module name, or None if it is not one of our linears."""
    mapped = hf_to_ours(module + ".weight")
    if mapped is None or not mapped[0].endswith(".kernel"):
        return None
    return mapped[0].removesuffix(".kernel")


def _layer_index(module: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m.group("idx")) if m else None


def peft_selects(config: dict[str, Any], module: str, all_linears: Iterable[str]) -> bool:
    """Whether a PEFT LoRA `config` targets the HF `module` (PEFT's matching rules:
    a string is a full-match regex, "all-linear" every linear but the LM head, a list
    matches names equal to or ending in ".<entry>", optionally limited to
    `layers_to_transform`; `exclude_modules` wins)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith("." + e) for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets == "all-linear":
        return module in set(all_linears) and module != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    targets = list(targets or [])
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def target_modules_for(adapted: list[str], all_linears: list[str]) -> list[str] | str:
    """PEFT `target_modules` selecting exactly the HF modules `adapted`: the list of
    their short names when that selects nothing else (the usual case), else a regex."""
    names = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    as_list = {"target_modules": names}
    if {m for m in all_linears if peft_selects(as_list, m, all_linears)} == set(adapted):
        return names
    return "(" + "|".join(re.escape(m) for m in adapted) + ")"


# --------------------------------------------------------------------------- save


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _write_atomically(target: Path, overwrite: bool, write) -> Path:
    """Runs write(tmp_dir) in a temporary sibling of `target`, then renames it into place.
    Multi-host: only process 0 writes; the others run `write` into a scratch directory
    (gathering sharded weights is collective) and leave `target` alone."""
    if jax.process_index() != 0:
        with tempfile.TemporaryDirectory() as scratch:
            write(Path(scratch))
        return target
    check_output_directory(target, overwrite=overwrite)
    with atomic_directory(target) as tmp:
        write(tmp)
    return target


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype: Any = jnp.float32,
    overwrite: bool = False,
) -> Path:
    """Writes the adapters of `model` as a PEFT LoRA adapter directory.

    base_model_name_or_path: recorded in adapter_config.json (the HF checkpoint the
    adapter belongs to; PEFT only uses it when no base model is passed). dtype: of the
    saved tensors (default float32, the master weights). All adapters must share rank,
    alpha and dropout (as `apply_lora` makes them). Written to a temporary sibling
    directory and renamed into place; an existing non-empty `path` needs overwrite=True.
    A `path` that cannot be written or replaced raises OutputDirectoryError and leaves
    nothing behind.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters to export (was apply_lora called?)")
    settings = {(lin.lora.rank, lin.lora.alpha, lin.lora.dropout_rate) for lin in layers.values()}
    if len(settings) != 1:
        raise LoRAError(
            f"adapters differ in (rank, alpha, dropout) {sorted(settings)}; "
            "PEFT export needs one setting"
        )
    ((rank, alpha, dropout),) = settings
    all_linears = [hf_module_name(p) for p in linear_layers(model)]
    adapted = [hf_module_name(p) for p in layers]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": dropout,
        "target_modules": target_modules_for(adapted, all_linears),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dtype = jnp.dtype(dtype)
    is_writer = jax.process_index() == 0

    def write(tmp: Path) -> None:
        tensors = {}
        for path_, linear in layers.items():
            module = hf_module_name(path_)
            for which, var in (("A", linear.lora.a), ("B", linear.lora.b)):
                host = _to_host(var.get_value()).astype(out_dtype)
                tensors[f"{PEFT_PREFIX}{module}.lora_{which}.weight"] = np.ascontiguousarray(host.T)
        if is_writer:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return _write_atomically(Path(path), overwrite, write)


# --------------------------------------------------------------------------- load


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA directory, checked for what we support."""
    file = directory / ADAPTER_CONFIG
    if not file.exists():
        raise LoRAError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise LoRAError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{file}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{file}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise LoRAError(f"{file}: task_type {config['task_type']!r} is not 'CAUSAL_LM'")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"{file}: r must be an integer >= 1, got {rank!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise LoRAError(f"{file}: lora_alpha must be a number > 0, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise LoRAError(f"{file}: lora_dropout must be in [0, 1), got {dropout!r}")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{file}: bias {config['bias']!r} is not supported (only 'none')")
    for key, harmless in _UNSUPPORTED.items():
        value = config.get(key, harmless)
        if value not in (harmless, None, False, {}, []):
            raise LoRAError(f"{file}: {key}={value!r} is not supported by our LoRA")
    if not config.get("target_modules"):
        raise LoRAError(f"{file}: target_modules is missing or empty")
    return config


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    file = directory / ADAPTER_WEIGHTS
    if not file.exists():
        other = directory / "adapter_model.bin"
        hint = f" ({other.name} found: only safetensors are read)" if other.exists() else ""
        raise LoRAError(f"{directory}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        with safe_open(str(file), framework="numpy") as f:
            names = f.keys()
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as err:
        raise LoRAError(f"{file}: cannot read safetensors ({err})") from None


def load_peft_adapter(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    key: jax.Array | int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> list[str]:
    """Attaches the PEFT LoRA adapter in directory `path` to `model` (in place, float32
    A/B), e.g. to continue training someone's adapter or to serve it unmerged.

    key: seeds the dropout streams when lora_dropout > 0. mesh/rules: place A and B into
    their shardings. Returns our paths of the adapted linears. Raises LoRAError naming
    the file and tensor when the directory is not a plain PEFT LoRA adapter for this
    model: missing files, unsupported options, target module names that are no linear
    of ours, tensors for modules the config does not target (or vice versa), shapes of
    another base model.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise LoRAError(f"{directory}: adapter directory not found")
    config = read_adapter_config(directory)
    tensors = _read_tensors(directory)
    weights_file = directory / ADAPTER_WEIGHTS
    linears = linear_layers(model)
    by_module = {hf_module_name(p): p for p in linears}
    all_linears = list(by_module)

    targets = config["target_modules"]
    if isinstance(targets, list):
        unknown = [
            t for t in targets if not any(m == t or m.endswith("." + t) for m in all_linears)
        ]
        if unknown:
            names = sorted({m.rsplit(".", 1)[-1] for m in all_linears})
            raise LoRAError(
                f"{directory / ADAPTER_CONFIG}: target_modules {unknown} name no linear layer "
                f"of this Qwen2 (linear names: {names})"
            )
    selected = [m for m in all_linears if peft_selects(config, m, all_linears)]
    if not selected:
        raise LoRAError(
            f"{directory / ADAPTER_CONFIG}: target_modules {targets!r} select no linear layer "
            f"of this Qwen2 (HF module names look like {all_linears[0]!r})"
        )

    pairs: dict[str, dict[str, np.ndarray]] = {}
    adapter_names = set()
    for name, value in tensors.items():
        m = _TENSOR_KEY.fullmatch(name)
        if m is None:
            raise LoRAError(f"{weights_file}: unexpected tensor {name!r} for a plain LoRA adapter")
        module = m.group("module")
        if module not in by_module:
            raise LoRAError(
                f"{weights_file}: tensor {name!r} is for module {module!r}, which is not a "
                "linear layer of this model"
            )
        adapter_names.add(m.group("adapter"))
        pairs.setdefault(module, {})[m.group("which")] = value
    if len(adapter_names) > 1:
        raise LoRAError(
            f"{weights_file}: tensors of several adapters {sorted(map(str, adapter_names))}"
        )
    incomplete = sorted(m for m, p in pairs.items() if set(p) != {"A", "B"})
    if incomplete:
        raise LoRAError(f"{weights_file}: modules lacking lora_A or lora_B: {incomplete}")
    if set(pairs) != set(selected):
        missing = [m for m in selected if m not in pairs]
        extra = [m for m in pairs if m not in selected]
        raise LoRAError(
            f"{directory}: adapter tensors and target_modules disagree; targeted without "
            f"tensors: {missing}, tensors not targeted: {extra}"
        )

    rank = config["r"]
    staged = []
    for module in selected:
        path_ = by_module[module]
        linear = linears[path_]
        if linear.lora is not None:
            raise LoRAError(f"{path_} already has a LoRA adapter (adapters do not stack)")
        a, b = pairs[module]["A"].T, pairs[module]["B"].T
        for which, value, expected in (
            ("A", a, (linear.in_features, rank)),
            ("B", b, (rank, linear.out_features)),
        ):
            if value.shape != expected:
                raise LoRAError(
                    f"{weights_file}: {PEFT_PREFIX}{module}.lora_{which}.weight has shape "
                    f"{tuple(reversed(value.shape))}, this model with r={rank} needs "
                    f"{tuple(reversed(expected))} (an adapter for another base model?)"
                )
        staged.append((path_, linear, a, b))

    key = jax.random.key(key) if isinstance(key, int) else key
    dropout = float(config.get("lora_dropout", 0.0))
    for i, (path_, linear, a, b) in enumerate(staged):
        a = jnp.asarray(a, jnp.float32)
        b = jnp.asarray(b, jnp.float32)
        if mesh is not None:
            a, b = _place(linear, a, b, mesh, rules)
        attach_adapter(
            linear,
            a,
            b,
            alpha=float(config["lora_alpha"]),
            dropout=dropout,
            dropout_key=jax.random.fold_in(key, i) if dropout > 0 else None,
            path=path_,
        )
    return [path_ for path_, *_ in staged]


def _place(linear, a, b, mesh, rules):
    rules = rules or ShardingRules.default()
    out = []
    for value, (axes, units) in zip((a, b), adapter_axes(linear), strict=True):
        spec = logical_to_spec(axes, value.shape, mesh, rules, units=units)
        out.append(jax.device_put(value, jax.sharding.NamedSharding(mesh, spec)))
    return out
