"""Forward-pass throughput: our jitted Flax Qwen2 vs transformers' PyTorch Qwen2.

CPU mode (default): the same random tiny-but-wide float32 model (saved by transformers,
loaded by `load_hf`), the same batch of token ids, the same number of threads; both
warmed up; tokens/s from the best of several timed rounds (rounds alternate between
the two so machine load hits both alike). Also checks that the logits agree.

GPU mode (--gpu-7b, needs a CUDA jax; not run in our CPU-only CI): a Qwen2.5-7B-shaped
model with random bf16 weights; tokens/s and model FLOPs utilisation (MFU) against the
card's peak bf16 rate. There the "reference" is the peak rate, so ratio = MFU.

Compile mode (--compile-7b): trace and compile time of the unrolled 28-layer loop for a
7B-shaped model, abstractly (no weights), on whatever backend jax has.

The last line printed is one JSON object:
{"name", "ours", "reference", "unit", "ratio", ...settings}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CPU_CONFIG = dict(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    tie_word_embeddings=False,
)

# Dense bf16 peak, TFLOP/s, by device kind substring.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0}


def _time_rounds(fn, rounds: int, iters: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds per call, one entry per round; CPU seconds of this process per call
    (all threads) are appended to `cpu` when given."""
    out = []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - start) / iters)
        if cpu is not None:
            cpu.append((time.process_time() - start_cpu) / iters)
    return out


def bench_cpu(batch: int, seq: int, rounds: int, iters: int, threads: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from mllm_jax.model import load_hf

    # The tests' random transformers checkpoints: the same tiny-model code as the parity tests.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_checkpoints import hf_logits, make_hf_model

    torch.set_num_threads(threads)
    torch_model = make_hf_model(seed=0, **CPU_CONFIG, initializer_range=0.02)
    ids = (
        np.random.default_rng(0)
        .integers(0, CPU_CONFIG["vocab_size"], (batch, seq))
        .astype(np.int32)
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model = load_hf(tmp)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids_jax = jnp.asarray(ids)
    ids_torch = torch.as_tensor(ids, dtype=torch.long)
    ours_logits = np.asarray(forward(state, ids_jax))
    diff = float(np.abs(ours_logits - hf_logits(torch_model, ids)).max())

    def ours():
        forward(state, ids_jax).block_until_ready()

    def reference():
        with torch.inference_mode():
            torch_model(ids_torch)

    for fn in (ours, reference):  # warm-up
        fn()
        fn()
    ours_t, ref_t, ours_cpu, ref_cpu = [], [], [], []
    for _ in range(rounds):  # alternate, so background load affects both
        ours_t += _time_rounds(ours, 1, iters, ours_cpu)
        ref_t += _time_rounds(reference, 1, iters, ref_cpu)
    tokens = batch * seq
    ours_tps, ref_tps = tokens / min(ours_t), tokens / min(ref_t)
    return {
        "name": "forward_tokens_per_s_cpu_f32",
        "ours": round(ours_tps, 1),
        "reference": round(ref_tps, 1),
        "unit": "tokens/s",
        "ratio": round(ours_tps / ref_tps, 3),
        # Median CPU seconds per call (all threads): steadier than wall time when other
        # jobs share the cores.
        "ratio_cpu": round(statistics.median(ref_cpu) / statistics.median(ours_cpu), 3),
        "ours_cpu_s": round(statistics.median(ours_cpu), 4),
        "reference_cpu_s": round(statistics.median(ref_cpu), 4),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "ours_median": round(tokens / statistics.median(ours_t), 1),
        "reference_median": round(tokens / statistics.median(ref_t), 1),
        "max_abs_logit_diff": diff,
        "batch": batch,
        "seq": seq,
        "threads": threads,
        "reference_impl": f"transformers {__import__('transformers').__version__} "
        f"torch {torch.__version__} attn={torch_model.config._attn_implementation}",
        "config": CPU_CONFIG,
        "device": "cpu",
    }


def forward_flops_per_token(config, seq: int) -> float:
    """Model FLOPs of one forward token: 2 x matmul parameters (LM head included, the
    embedding gather excluded) + causal attention (QK^T and PV over seq/2 keys on average)."""
    e, layers = config.hidden_size, config.num_hidden_layers
    matmul_params = config.num_parameters() - config.vocab_size * e
    if config.tie_word_embeddings:
        matmul_params += config.vocab_size * e
    attention = 2 * 2 * layers * config.num_attention_heads * config.head_dim * (seq / 2)
    return 2 * matmul_params + attention


def bench_gpu_7b(
    batch: int, seq: int, rounds: int, iters: int, backend: str, peak: float | None
) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mllm_jax.model import init_model, preset

    device = jax.devices()[0]
    if device.platform != "gpu":
        raise SystemExit(f"--gpu-7b needs a GPU; jax's first device is {device.platform}")
    if peak is None:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device.device_kind), None)
        if peak is None:
            raise SystemExit(f"unknown peak for {device.device_kind!r}; pass --peak-tflops")
    config = preset("qwen2.5-7b", attention_backend=backend, attention_query_chunk=seq)
    model = init_model(config, key=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids, return_hidden=True)

    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size, jnp.int32)
    compile_start = time.perf_counter()
    forward(state, ids).block_until_ready()
    compile_s = time.perf_counter() - compile_start

    def ours():
        forward(state, ids).block_until_ready()

    times = _time_rounds(ours, rounds, iters)
    # The LM head is left out of the timed call (training applies it at answer
    # positions only); leave it out of the FLOPs as well.
    flops_token = forward_flops_per_token(config, seq) - 2 * config.hidden_size * config.vocab_size
    tps = batch * seq / min(times)
    peak_tps = peak * 1e12 / flops_token
    return {
        "name": "forward_7b_gpu_bf16",
        "ours": round(tps, 1),
        "reference": round(peak_tps, 1),
        "unit": "tokens/s (reference = peak bf16 rate, so ratio = MFU)",
        "ratio": round(tps / peak_tps, 4),
        "mfu": round(tps / peak_tps, 4),
        "batch": batch,
        "seq": seq,
        "attention_backend": backend,
        "compile_s": round(compile_s, 1),
        "peak_tflops": peak,
        "device": device.device_kind,
    }


def bench_compile_7b(seq: int, layers: int) -> dict:
    """Trace + compile time of the unrolled layer loop for a Qwen2.5-7B-shaped model,
    abstractly (no weights allocated): forward, and gradient with per-layer remat."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mllm_jax.model import Qwen2ForCausalLM, preset

    config = preset("qwen2.5-7b", num_hidden_layers=layers, attention_query_chunk=seq)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids, return_hidden=True)

    def loss(state, ids):
        hidden = nnx.merge(graphdef, state)(ids, return_hidden=True, remat=True)
        return hidden.astype(jnp.float32).mean()

    result: dict = {}
    for name, fn in (("forward", forward), ("grad_remat", jax.grad(loss))):
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(state, ids)
        result[f"{name}_lower_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        lowered.compile()
        result[f"{name}_compile_s"] = round(time.perf_counter() - start, 2)
    return {
        "name": "compile_time_7b_unrolled",
        "ours": round(result["grad_remat_lower_s"] + result["grad_remat_compile_s"], 2),
        "reference": None,
        "unit": "s (trace + compile of the remat gradient; no reference implementation)",
        "ratio": None,
        **result,
        "layers": layers,
        "seq": seq,
        "backend": jax.default_backend(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--gpu-7b", action="store_true", help="Qwen2.5-7B-shaped bf16 forward on a GPU"
    )
    parser.add_argument(
        "--compile-7b", action="store_true", help="trace/compile time of a 7B-shaped model"
    )
    parser.add_argument("--layers", type=int, default=28, help="layers for --compile-7b")
    parser.add_argument("--attention-backend", default="cudnn", choices=["xla", "cudnn"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args(argv)
    if args.compile_7b:
        result = bench_compile_7b(args.seq or 4096, args.layers)
    elif args.gpu_7b:
        result = bench_gpu_7b(
            args.batch or 1,
            args.seq or 4096,
            args.rounds,
            args.iters,
            args.attention_backend,
            args.peak_tflops,
        )
    else:
        result = bench_cpu(args.batch or 4, args.seq or 256, args.rounds, args.iters, args.threads)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
