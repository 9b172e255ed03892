"""TPU dry run on a CPU: build the recipe's mesh and shardings for a TPU slice's shape and
compile the LoRA train step for it, without a TPU and without running a step.

Each topology gets a child process whose CPU backend has as many simulated devices as
the slice has chips (`--xla_force_host_platform_device_count`). In it the model is only
abstract (`nnx.eval_shape`: shapes, dtypes and shardings, no weights), split as training
splits it (trainable LoRA in float32, the frozen base in bfloat16), and the jitted train
step of `mllm_jax.train.step` is lowered and compiled for the recipe's mesh
(`mesh: {data: 1, fsdp: -1, tensor: 1}`, one sequence per chip, `grad_accum` micro
batches, per-layer remat). XLA's memory analysis of the compiled step gives the bytes
per device: arguments (the sharded state and batch), outputs and temporaries.

What it shows and what not: that the sharding rules, the mesh and the step build and
partition for 8 and 32 chips (errors a TPU run would otherwise meet first), and a
per-chip memory estimate. The compiler is XLA:CPU, not XLA:TPU: fusion, layouts and
scheduling differ, so temporaries are an estimate; arguments and outputs (the sharded
state) are exact. Compiling all 28 layers of the 7B shape takes long on a small CPU, so
by default it compiles 2 and 4 layers and extrapolates linearly in the layer count
(every decoder layer has the same shapes); `--layers 28` compiles the whole model.

Slice names: v5e-N has N chips (16 GiB HBM each); v5p-N counts TensorCores, two per
chip, so v5p-64 is 32 chips (95 GiB HBM each).

    .venv/bin/python tools/tpu_dry_run.py                          # v5e-8 and v5p-64, 7B
    .venv/bin/python tools/tpu_dry_run.py --topology v5e-8 --layers 28
    .venv/bin/python tools/tpu_dry_run.py --shape tiny --seq 256 --topology v5e-8  # smoke

Prints one JSON line per compiled (topology, layers) and one per topology with the
extrapolation to the shape's full depth, the last line a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

GIB = 1024**3
TOPOLOGIES: dict[str, dict[str, Any]] = {
    "v5e-8": {"chips": 8, "hbm_gib": 16.0},
    "v5p-64": {"chips": 32, "hbm_gib": 95.0},
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def compile_step(
    shape: str, layers: int, seq: int, grad_accum: int, answer: int, remat: str = "full"
) -> dict:
    """Compiles the recipe's LoRA step for every local (simulated) device; the memory
    analysis per device. Runs in the child, after XLA_FLAGS is set."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mllm_jax.foundation.mesh import make_mesh
    from mllm_jax.model import preset
    from mllm_jax.model.lora import LoRAConfig, apply_lora
    from mllm_jax.model.qwen2 import Qwen2ForCausalLM
    from mllm_jax.model.sharding import ShardingRules
    from mllm_jax.runs.config import OptimizerConfig
    from mllm_jax.runs.state import abstract_split, optimizer_shardings
    from mllm_jax.train.batches import batch_sharding
    from mllm_jax.train.optim import make_optimizer
    from mllm_jax.train.step import make_train_step

    config = preset(
        shape,
        num_hidden_layers=layers,
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        attention_backend="xla",
    )
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    rules = ShardingRules.default()

    def build() -> Qwen2ForCausalLM:
        model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
        apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=TARGETS), 0)
        return model

    abstract = nnx.eval_shape(build)
    split = abstract_split(abstract, "lora", mesh, rules)  # LoRA f32, the base bf16
    trainable, rngs, frozen = split.trainable, split.rngs, split.frozen
    tx = make_optimizer(OptimizerConfig())
    opt_shardings = optimizer_shardings(tx, trainable, split.trainable_shardings, mesh)
    opt_state = jax.eval_shape(tx.init, trainable)
    step = make_train_step(split, tx, opt_shardings, mesh, budget=answer, remat=remat, rules=rules)
    batch_size = mesh.devices.size  # one sequence per chip, as the recipe
    ints = jax.ShapeDtypeStruct((grad_accum, batch_size, seq), jnp.int32)
    batch = {
        "input_ids": ints,
        "targets": ints,
        "positions": ints,
        "segment_ids": ints,
        "loss_mask": jax.ShapeDtypeStruct((grad_accum, batch_size, seq), jnp.bool_),
    }
    started = time.monotonic()
    lowered = step.lower(
        trainable, opt_state, rngs, frozen, batch, jax.ShapeDtypeStruct((), jnp.float32)
    )
    compiled = lowered.compile()
    seconds = time.monotonic() - started
    memory = compiled.memory_analysis()
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))
    return {
        "layers": layers,
        "remat": remat,
        "devices": int(mesh.devices.size),
        "mesh": dict(mesh.shape),
        "batch_sharding": str(batch_sharding(mesh).spec),
        "compile_s": round(seconds, 1),
        "argument_gib": round(memory.argument_size_in_bytes / GIB, 6),
        "output_gib": round(memory.output_size_in_bytes / GIB, 6),
        "temp_gib": round(memory.temp_size_in_bytes / GIB, 6),
        "alias_gib": round(memory.alias_size_in_bytes / GIB, 6),
        "frozen_base_gib_total": round(frozen_bytes / GIB, 3),
    }


def per_device_gib(record: dict) -> float:
    """Live bytes per device: arguments + temporaries + outputs not aliased to (donated)
    arguments."""
    return record["argument_gib"] + record["temp_gib"] + record["output_gib"] - record["alias_gib"]


def child(args: argparse.Namespace) -> int:
    record = compile_step(
        args.shape, args.child_layers, args.seq, args.grad_accum, args.answer, args.remat
    )
    print(json.dumps(record), flush=True)
    return 0


def run_child(topology: str, layers: int, args: argparse.Namespace) -> dict:
    chips = TOPOLOGIES[topology]["chips"]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={chips}",
    }
    command = [
        sys.executable,
        __file__,
        "--child-layers",
        str(layers),
        "--shape",
        args.shape,
        "--seq",
        str(args.seq),
        "--grad-accum",
        str(args.grad_accum),
        "--answer",
        str(args.answer),
        "--remat",
        args.remat,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{topology}, {layers} layers: the compile failed: " + " | ".join(tail))
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "topology": topology,
        "shape": args.shape,
        "seq": args.seq,
        "remat": args.remat,
        **record,
    }


def extrapolate(records: list[dict], full_layers: int, hbm_gib: float) -> dict:
    """Per-device GiB as a + b * layers through the two smallest compiled depths, at the
    shape's full depth (exact when one of them is the full depth)."""
    by_layers = {r["layers"]: per_device_gib(r) for r in records}
    if full_layers in by_layers:
        estimate, method = by_layers[full_layers], "compiled"
    else:
        (l1, m1), (l2, m2) = sorted(by_layers.items())[:2]
        slope = (m2 - m1) / (l2 - l1)
        estimate, method = m1 + slope * (full_layers - l1), f"linear in layers from {l1}, {l2}"
    return {
        "full_layers": full_layers,
        "per_device_gib_est": round(estimate, 4),
        "method": method,
        "hbm_gib": hbm_gib,
        "fits": estimate <= hbm_gib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--shape", default="qwen2.5-7b", help="a model preset")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq", type=int, default=32768, help="the recipe's sequence length")
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--answer", type=int, default=768, help="max_answer_tokens")
    parser.add_argument("--remat", default="full", help="per-layer remat policy (the recipe's)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    parser.add_argument("--child-layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_layers is not None:
        return child(args)
    from mllm_jax.model import preset

    full_layers = preset(args.shape).num_hidden_layers
    if len(set(args.layers)) < 2 and full_layers not in args.layers:
        parser.error("--layers: give two depths to extrapolate from, or the full depth")
    summary = {}
    for topology in args.topology:
        records = []
        for layers in sorted(set(args.layers)):
            record = run_child(topology, layers, args)
            print(json.dumps(record), flush=True)
            records.append(record)
        estimate = extrapolate(records, full_layers, TOPOLOGIES[topology]["hbm_gib"])
        line = {"topology": topology, "shape": args.shape, "seq": args.seq, **estimate}
        print(json.dumps(line), flush=True)
        summary[topology] = estimate["per_device_gib_est"]
    print(json.dumps({"name": "tpu_dry_run", "shape": args.shape, "per_device_gib": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
