"""Loading a model for inference: weights, tokenizer, context limit, a small reuse cache.

`load_model` reads
- a Hugging Face Qwen2 directory (the primary input: our `save_hf` export, the merged
  MachineLearningLM-7B-v1 release, a plain Qwen2.5),
- the same plus a PEFT LoRA adapter directory (`adapter=`; merged into the weights in
  float32, then cast to the parameter dtype),
- or a training run directory of `mllm-jax train` (its `config.yaml` + orbax
  checkpoints; `step=` picks one, default the newest, "best" the best validation step),
and pairs it with a tokenizer: the (base) checkpoint directory's own `tokenizer.json`
when it has one, else the packaged offline Qwen2.5 tokenizer. YaRN can be switched on at
load time (`yarn_factor`), as the reference's vLLM runner did for MachineLearningLM-7B-v1
(factor 4 over 32,768 positions).

Loading a 7B checkpoint takes a while and every `MLLMClassifier` the evaluation harness
creates (one per fit) names the same directory, so loaded models are kept in a cache of
`CACHE_SIZE` entries keyed by everything that changes the result (path and file times,
dtype, runtime options). The cached objects are never mutated.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from mllm_jax.encoding.tokens import ENDOFTEXT, IM_END, PromptTokenizer, load_backend_tokenizer
from mllm_jax.model import Qwen2Config, Qwen2ForCausalLM, YarnScaling, load_hf
from mllm_jax.model.lora import LoRAError, lora_layers, merged_copy
from mllm_jax.model.peft import load_peft_adapter
from mllm_jax.runs.checkpoint import CheckpointReadError
from mllm_jax.runs.loading import load_trained, prepare_base

CACHE_SIZE = 1
"""Loaded models kept for reuse (a 7B model in bfloat16 is 15 GB of accelerator memory)."""


class ModelLoadError(ValueError):
    """A model directory (or adapter) that cannot be used for inference; names the path."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready for inference.

    Attributes:
        model: the Flax NNX model (parameters on device).
        graphdef, state: `nnx.split(model)`, what the jitted inference functions take.
        tokenizer: the bare `tokenizers.Tokenizer` (decoding generated answers).
        prompt_tokenizer: the fast prompt -> ids path (`PromptTokenizer`).
        eos_ids: i32[n] tokens that end a generated answer.
        context_limit: the most positions the model may use (see `context_limit`).
        source: a description of where the weights came from.
    """

    model: Qwen2ForCausalLM
    graphdef: Any
    state: Any
    tokenizer: Any
    prompt_tokenizer: PromptTokenizer
    eos_ids: np.ndarray
    context_limit: int
    source: str

    @property
    def config(self) -> Qwen2Config:
        return self.model.config


def context_limit(config: Qwen2Config) -> int:
    """Positions the model was trained (or YaRN-extended) for: original positions x the
    YaRN factor when rope scaling is configured, else `max_position_embeddings`."""
    scaling = config.rope_scaling
    if scaling is not None:
        return int(scaling.original_max_position_embeddings * scaling.factor)
    return int(config.max_position_embeddings)


def _with_yarn(config: Qwen2Config, factor: float | None) -> YarnScaling | None:
    """The rope scaling to use: the config's, or YaRN with `factor` over its positions."""
    if factor is None:
        return config.rope_scaling
    if factor < 1:
        raise ModelLoadError(f"yarn_factor must be >= 1, got {factor}")
    if config.rope_scaling is not None:
        return dataclasses.replace(config.rope_scaling, factor=float(factor))
    return YarnScaling(
        factor=float(factor), original_max_position_embeddings=config.max_position_embeddings
    )


def _stamp(directory: Path | None) -> tuple:
    """File names, sizes and modification times: a changed checkpoint is a new cache key."""
    if directory is None:
        return ()
    return tuple(
        sorted(
            (str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*")
            if p.is_file()
        )
    )


TRAIN_RUN_CONFIG = "config.yaml"
"""A directory with this file and no config.json is a `mllm-jax train` run."""


def is_train_run(directory: Path) -> bool:
    return (directory / TRAIN_RUN_CONFIG).is_file() and not (directory / "config.json").is_file()


_CACHE: OrderedDict[tuple, LoadedModel] = OrderedDict()


def load_model(
    path: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    step: int | str | None = None,
    dtype: str | None = None,
    yarn_factor: float | None = None,
    attention_backend: str | None = None,
    attention_query_chunk: int | None = None,
    use_cache: bool = True,
) -> LoadedModel:
    """Loads a model for inference (see the module docstring for what `path` may be).

    Args:
        path: HF checkpoint directory (config.json + safetensors, optionally
            tokenizer.json) or a `mllm-jax train` run directory.
        adapter: a PEFT LoRA adapter directory to apply to the HF checkpoint.
        step: which checkpoint of a training run (None newest, "best", or a step).
        dtype: parameter and compute dtype ("float32", "bfloat16"); None keeps the
            checkpoint's dtype.
        yarn_factor: switch YaRN rope scaling on with this factor (over the config's
            `max_position_embeddings`), or change the factor of a configured one.
        attention_backend: "xla" | "cudnn" | "splash" (default: the config's, "xla").
        attention_query_chunk: queries per attention block (bounds score memory).
        use_cache: reuse a model loaded before with the same arguments.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: model directory not found")
    train_run = is_train_run(directory)
    if not train_run and not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{directory}: no config.json; expected a Hugging Face Qwen2 checkpoint directory "
            f"(or a training run with {TRAIN_RUN_CONFIG})"
        )
    if train_run and adapter is not None:
        raise ModelLoadError(f"{directory}: a training run takes no separate adapter")
    if step is not None and not train_run:
        raise ModelLoadError(f"{directory}: step= applies to training runs only")
    adapter_dir = None if adapter is None else Path(adapter)
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise ModelLoadError(f"{adapter_dir}: adapter directory not found")
    key = (
        str(directory.resolve()),
        _stamp(directory),
        None if adapter_dir is None else str(adapter_dir.resolve()),
        _stamp(adapter_dir),
        step,
        dtype,
        yarn_factor,
        attention_backend,
        attention_query_chunk,
    )
    if use_cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]

    def runtime_for(config: Qwen2Config) -> dict[str, Any]:
        runtime: dict[str, Any] = {"rope_scaling": _with_yarn(config, yarn_factor)}
        if dtype is not None:
            runtime["compute_dtype"] = dtype
        elif config.param_dtype != "float32":
            runtime["compute_dtype"] = config.param_dtype
        if attention_backend is not None:
            runtime["attention_backend"] = attention_backend
        if attention_query_chunk is not None:
            runtime["attention_query_chunk"] = attention_query_chunk
        return runtime

    if train_run:
        model, tokenizer_dir = _load_train_run(directory, step)
        changes = runtime_for(model.config)
        if dtype is not None:
            changes["param_dtype"] = dtype
        model = _rebuilt(model, **changes)
        source = f"{directory} (training run, step {step or 'newest'})"
    else:
        config = Qwen2Config.from_json_file(directory / "config.json")
        model = load_hf(directory, dtype, **runtime_for(config))
        tokenizer_dir, source = directory, str(directory)
        if adapter_dir is not None:
            model = _with_adapter(model, adapter_dir)
            source = f"{directory} + adapter {adapter_dir}"
    loaded = _assemble(model, tokenizer_dir, source=source)
    if use_cache:
        _CACHE[key] = loaded
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


def _with_adapter(model: Qwen2ForCausalLM, adapter_dir: Path) -> Qwen2ForCausalLM:
    """The model with a PEFT LoRA adapter folded into its kernels (no adapter left)."""
    try:
        load_peft_adapter(model, adapter_dir)
    except LoRAError as error:
        raise ModelLoadError(str(error)) from error
    return merged_copy(model)


def _load_train_run(directory: Path, step: int | str | None) -> tuple[Qwen2ForCausalLM, Path]:
    """(the trained model with any LoRA merged in, the directory of its base checkpoint)."""
    try:
        model, config = load_trained(directory, step)
    except CheckpointReadError as error:  # a damaged checkpoint: the user's to fix
        raise ModelLoadError(str(error)) from None
    if lora_layers(model):
        model = merged_copy(model)
    return model, prepare_base(config, directory)


def _rebuilt(model: Qwen2ForCausalLM, **changes: Any) -> Qwen2ForCausalLM:
    """The same weights in a model built from `model.config.replace(**changes)` (runtime
    fields: dtypes, rope scaling, attention options), parameters cast to its dtype."""
    config = model.config.replace(**changes)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    values = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in nnx.to_flat_state(state):
        var.set_value(values[path].get_value().astype(var.dtype))
    return nnx.merge(graphdef, state)


def from_model(
    model: Qwen2ForCausalLM, tokenizer_dir: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """Wraps a model already in memory (e.g. straight from training) for inference."""
    return _assemble(model, None if tokenizer_dir is None else Path(tokenizer_dir), "in memory")


def clear_cache() -> None:
    """Drops the loaded models kept for reuse."""
    _CACHE.clear()


def _assemble(model: Qwen2ForCausalLM, directory: Path | None, source: str) -> LoadedModel:
    has_tokenizer = directory is not None and (directory / "tokenizer.json").is_file()
    tokenizer = load_backend_tokenizer(directory if has_tokenizer else None)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise ModelLoadError(
            f"{source}: the model's vocab_size {model.config.vocab_size} is smaller than the "
            f"tokenizer's {vocab} tokens ({'its own' if has_tokenizer else 'packaged Qwen2.5'} "
            "tokenizer); a Qwen2.5 model has 151,936 or 152,064 rows"
        )
    prompt_tokenizer = PromptTokenizer(tokenizer)
    eos = [prompt_tokenizer.im_end_id, prompt_tokenizer.pad_id]
    assert tokenizer.token_to_id(IM_END) == eos[0] and tokenizer.token_to_id(ENDOFTEXT) == eos[1]
    graphdef, state = nnx.split(model)
    return LoadedModel(
        model=model,
        graphdef=graphdef,
        state=state,
        tokenizer=tokenizer,
        prompt_tokenizer=prompt_tokenizer,
        eos_ids=np.array(eos, dtype=np.int32),
        context_limit=context_limit(model.config),
        source=source,
    )
