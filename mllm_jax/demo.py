"""`mllm-jax demo`: a small real job until the end-to-end pipeline demo exists.

Builds a random tiny Qwen2 model, exports it as an HF checkpoint into the run directory,
loads it back, checks the round trip (identical parameters and logits), and greedily
generates from a few token-id prompts (twice: with and without compilation). Prints timings and appends them as JSON lines to
<out>/metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console

PROMPTS = ([5, 17, 42, 99, 7], [300, 301], [11, 12, 13, 14, 15, 16, 17, 18])


def run_demo(out: Path, *, seed: int = 0, max_new_tokens: int = 12) -> dict[str, float]:
    """Runs the demo into `out` and returns its metrics."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mllm_jax.model import generate_greedy, init_model, load_hf, preset, save_hf

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        metrics[f"{name}_s"] = round(time.perf_counter() - start, 3)
        console.print(f"[green]✓[/] {name:<10} {metrics[f'{name}_s']:7.3f} s")
        return result

    config = preset("tiny")
    console.print(
        f"tiny Qwen2: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, {config.num_parameters():,} parameters; jax {jax.__version__} "
        f"on {jax.default_backend()}"
    )
    model = timed("init", lambda: init_model(config, key=seed))
    checkpoint = timed("save_hf", lambda: save_hf(model, out / "tiny-qwen2", overwrite=True))
    loaded = timed("load_hf", lambda: load_hf(checkpoint))

    def check() -> float:
        ours = dict(nnx.to_flat_state(nnx.state(model)))
        for path, var in nnx.to_flat_state(nnx.state(loaded)):
            if not np.array_equal(np.asarray(var.get_value()), np.asarray(ours[path].get_value())):
                raise RuntimeError(f"round trip changed parameter {'.'.join(map(str, path))}")
        ids = jnp.asarray(np.array([PROMPTS[0] * 4], np.int32))
        forward = nnx.jit(lambda m, x: m(x))
        diff = float(jnp.abs(forward(model, ids) - forward(loaded, ids)).max())
        if diff != 0.0:
            raise RuntimeError(f"round trip changed the logits (max |diff| {diff})")
        return diff

    metrics["roundtrip_max_abs_diff"] = timed("roundtrip", check)
    result = timed(
        "generate", lambda: generate_greedy(loaded, PROMPTS, max_new_tokens=max_new_tokens)
    )
    again = timed(
        "generate_compiled",
        lambda: generate_greedy(loaded, PROMPTS, max_new_tokens=max_new_tokens),
    )
    if again.as_lists() != result.as_lists():
        raise RuntimeError("greedy generation is not deterministic")
    for prompt, tokens in zip(PROMPTS, result.as_lists(), strict=True):
        console.print(f"  {prompt} -> {tokens}")
    metrics["generated_tokens"] = int(result.lengths.sum())
    metrics["generate_tokens_per_s"] = round(
        metrics["generated_tokens"] / max(metrics["generate_compiled_s"], 1e-9), 1
    )
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "demo", **metrics}) + "\n")
    console.print(f"checkpoint: {checkpoint}")
    return metrics
