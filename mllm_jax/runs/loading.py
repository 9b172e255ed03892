"""A trained run as a model: its base checkpoint, the model built on it, and the trained
parameters of one of its checkpoints.

    prepare_base(config, run_dir)      the base HF checkpoint (made once for random init)
    build_model(config, base, ...)     the base model in its training dtype (+ adapters)
    load_trained(run_dir, step)        the model with the trained parameters of a run
    host_params(state)                 {dotted path: numpy array} of a state

`train` builds its model with the same calls it resumes from; `export` and `infer` load
trained runs through `load_trained`. None of it knows the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.foundation import distributed
from mllm_jax.foundation.config import load_config, to_dict
from mllm_jax.foundation.files import atomic_write_json
from mllm_jax.foundation.mesh import make_mesh
from mllm_jax.model import Qwen2ForCausalLM, init_model, load_hf, preset, save_hf
from mllm_jax.model.config import Qwen2Config
from mllm_jax.model.lora import LoRAError, apply_lora
from mllm_jax.model.peft import load_peft_adapter, read_adapter_config
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
from mllm_jax.runs.config import TrainConfig, resume_fingerprint
from mllm_jax.runs.layout import (
    BASE_DIR,
    BASE_RECORD,
    CONFIG_FILE,
    best_dir,
    checkpoints_dir,
)
from mllm_jax.runs.state import split_model


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
    base = run_dir / BASE_DIR
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
    base, record = run_dir / BASE_DIR, run_dir / BASE_RECORD
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
    atomic_write_json(record, wanted)  # the base is complete once its record exists
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
        apply_lora(model, config.lora, jax.random.key(config.seed), mesh=mesh, rules=rules)
    return model


def _load_adapter(model, config: TrainConfig, mesh, rules) -> None:
    """Attaches the PEFT adapter `model.adapter`, refusing one whose rank, alpha or
    dropout differ from the config's `lora` (the run would not train what it says)."""
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
    directory = best_dir(run_dir) if step == "best" else checkpoints_dir(config, run_dir)
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
