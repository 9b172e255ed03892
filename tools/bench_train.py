"""Train-step throughput: our jitted LoRA step vs transformers + peft (torch) on one shape.

Both sides train the same Qwen2 shape (default: vocab 151936, hidden 256, 4 layers, seq
2048, batch 1) with a rank-8 / alpha-16 LoRA on q,k,v,o,gate,up,down and AdamW, on one
sequence whose last ~10% tokens are the answer (labels -100 elsewhere on the torch side;
our loss mask). One step = forward + backward + optimizer update. Ours evaluates the LM
head only at the answer positions; transformers computes [seq, vocab] logits.

The measurement alternates rounds (ours, then torch) so that background load hits both
alike; the median step time of each side gives tokens/s. Prints JSON lines, the
comparison last:

    .venv/bin/python tools/bench_train.py                     # CPU, float32, LoRA
    .venv/bin/python tools/bench_train.py --mode full         # full fine-tuning both sides
    .venv/bin/python tools/bench_train.py --shape qwen2.5-0.5b --seq 1024 --split-head \
        --rounds 2 --steps 1                                  # a user's shape (CPU: minutes)
    .venv/bin/python tools/bench_train.py --ours-only --preset qwen2.5-0.5b --seq 8192 \\
        --dtype bfloat16 --attention cudnn                    # GPU: tokens/s and MFU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

BENCH_SHAPE = dict(
    vocab_size=151936,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_batch(
    vocab: int,
    seq: int,
    batch: int,
    answer_fraction: float,
    seed: int,
    answer_tokens: int | None = None,
):
    """One packed-format batch: a single sequence per row, the last tokens the answer
    (`answer_tokens` of them, default `answer_fraction` of the sequence)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    answer = answer_tokens if answer_tokens is not None else max(1, round(answer_fraction * seq))
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq - 1 - answer : seq - 1] = True
    return {
        "input_ids": ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
    }


# ------------------------------------------------------------------------------ ours


class Ours:
    """Our train step (mllm_jax.train.step) on a mesh of every local device.

    `config`: the model's architecture (its runtime fields are set from `args`); default
    the preset `args.preset` or the bench shape.
    """

    def __init__(self, args: argparse.Namespace, batch: dict[str, np.ndarray], config=None):
        import jax
        import jax.numpy as jnp

        from mllm_jax.foundation.mesh import make_mesh
        from mllm_jax.model import init_model, preset
        from mllm_jax.model.config import Qwen2Config
        from mllm_jax.model.lora import LoRAConfig, apply_lora
        from mllm_jax.model.sharding import ShardingRules
        from mllm_jax.runs.config import OptimizerConfig
        from mllm_jax.runs.state import init_optimizer, optimizer_shardings, split_model
        from mllm_jax.train import flops
        from mllm_jax.train.batches import check_batch, to_device
        from mllm_jax.train.optim import make_optimizer
        from mllm_jax.train.step import make_train_step

        self.jax = jax
        runtime = dict(
            param_dtype=args.dtype if args.mode == "lora" else "float32",
            compute_dtype=args.dtype,
            attention_backend=args.attention,
            attention_query_chunk=args.query_chunk,
        )
        if config is not None:
            config = config.replace(**runtime)
        elif args.preset:
            config = preset(args.preset, **runtime)
        else:
            config = Qwen2Config(**BENCH_SHAPE, **runtime)
        self.config = config
        mesh = make_mesh(data=1, fsdp=-1, tensor=1)
        rules = ShardingRules.default()
        model = init_model(config, 0, mesh=mesh, rules=rules)
        if args.mode == "lora":
            apply_lora(
                model, LoRAConfig(rank=8, alpha=16, targets=TARGETS), 0, mesh=mesh, rules=rules
            )
        self.split = split_model(
            model, args.mode, mesh, rules, master_dtype=jnp.float32, frozen_dtype=args.dtype
        )
        del model
        tx = make_optimizer(OptimizerConfig())
        shardings = optimizer_shardings(
            tx, self.split.trainable, self.split.trainable_shardings, mesh
        )
        self.opt_state = init_optimizer(tx, self.split.trainable, shardings)
        budget = int(batch["loss_mask"].sum(axis=1).max())
        self.step_fn = make_train_step(
            self.split, tx, shardings, mesh, budget=budget, remat=args.remat
        )
        _, stats = check_batch(
            batch, where="bench", vocab_size=config.vocab_size, max_answer_tokens=budget
        )
        self.stats = stats
        self.flops = flops.step_flops(config, stats, args.mode)
        self.batch = to_device({k: v[None] for k, v in batch.items()}, mesh)
        self.lr = np.float32(1e-4)
        self.devices = mesh.devices.size
        self.peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)

    def step(self) -> tuple[float, float]:
        """One step -> (wall seconds, CPU seconds of this process)."""
        s = self.split
        t0, c0 = time.perf_counter(), time.process_time()
        s.trainable, self.opt_state, s.rngs, metrics = self.step_fn(
            s.trainable, self.opt_state, s.rngs, s.frozen, self.batch, self.lr
        )
        loss = float(metrics["loss"])
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        if not np.isfinite(loss):
            raise RuntimeError(f"our step gave loss {loss}")
        return elapsed


# ---------------------------------------------------------------------------- torch


class Torch:
    """transformers Qwen2ForCausalLM (+ peft LoRA), torch AdamW, labels -100 off-answer.

    `shape`: transformers Qwen2Config fields (default the bench shape); `device`: where
    the model is built and trained; `answer_logits_only`: transformers' `logits_to_keep`
    limits the LM head to the answer tail (the last answer + 1 positions, where
    `make_batch` puts the answer), as ours evaluates it only at the answer tokens.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        batch: dict[str, np.ndarray],
        shape: dict[str, Any] | None = None,
        device: str = "cpu",
        answer_logits_only: bool = False,
    ):
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        self.torch = torch
        self.device = device
        torch.manual_seed(0)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        config = Qwen2Config(**(BENCH_SHAPE if shape is None else shape))
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype)
        if args.mode == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS))
            model = get_peft_model(model, lora)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # fp32 adapters, as ours
        if args.remat != "none":
            model.gradient_checkpointing_enable()
            if args.mode == "lora":
                model.enable_input_require_grads()
        model.train()
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        self.ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
        labels = np.where(batch["loss_mask"], batch["targets"], -100)
        # HF shifts labels itself: label[t] is the target of position t - 1.
        shifted = np.full_like(labels, -100)
        shifted[:, 1:] = labels[:, :-1]
        self.keep: dict[str, int] = {}
        if answer_logits_only:
            # The answer ends one token before the end (make_batch): its positions and
            # the last one (whose label, after HF's shift, is padding) are the tail.
            first = int(np.argmax(batch["loss_mask"].any(axis=0)))
            tail = batch["input_ids"].shape[1] - first
            shifted = shifted[:, -tail:]
            self.keep = {"logits_to_keep": tail}
        self.labels = torch.as_tensor(shifted, dtype=torch.long, device=device)

    def step(self) -> tuple[float, float]:
        """One step -> (wall seconds, CPU seconds of this process)."""
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.model(input_ids=self.ids, labels=self.labels, **self.keep).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        if not np.isfinite(value):
            raise RuntimeError(f"torch step gave loss {value}")
        return elapsed


# ----------------------------------------------------------------------------- main


def _settings(args: argparse.Namespace, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    import jax

    return {
        "mode": args.mode,
        "dtype": args.dtype,
        "seq": args.seq,
        "batch": args.batch,
        "answer_tokens": int(batch["loss_mask"].sum()),
        "shape": args.preset or "bench (vocab 151936, hidden 256, 4 layers, mlp 1024, 4/2 heads)",
        "lora": "r=8 alpha=16 q,k,v,o,gate,up,down" if args.mode == "lora" else None,
        "remat": args.remat,
        "attention": args.attention,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--answer-fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and side")
    parser.add_argument(
        "--remat",
        nargs="?",
        const="full",
        default="none",
        help="our per-layer remat policy (none | full | dots_saveable | "
        "dots_with_no_batch_dims_saveable; bare --remat = full); torch: gradient checkpointing",
    )
    parser.add_argument("--attention", default="xla", help="our backend: xla | cudnn | splash")
    parser.add_argument("--query-chunk", type=int, default=512)
    parser.add_argument(
        "--preset",
        "--shape",
        dest="preset",
        default=None,
        help="a model preset (e.g. qwen2.5-0.5b) instead of the bench shape, on both sides",
    )
    parser.add_argument(
        "--split-head",
        action="store_true",
        help="also time transformers with its LM head limited to the answer tail "
        "(logits_to_keep), so the answer-only head's share of the gain is reported apart",
    )
    parser.add_argument("--ours-only", action="store_true", help="skip torch (GPU/TPU runs)")
    args = parser.parse_args()

    from mllm_jax.model import preset

    vocab = preset(args.preset).vocab_size if args.preset else BENCH_SHAPE["vocab_size"]
    batch = make_batch(vocab, args.seq, args.batch, args.answer_fraction, 0)
    ours = Ours(args, batch)
    t0 = time.perf_counter()
    ours.step()  # compile
    compile_s = time.perf_counter() - t0
    ours.step()  # first compiled call (buffer donation, allocator)
    # The torch side trains the very architecture ours does (the preset's HF config).
    shape = ours.config.to_hf_dict() if args.preset else None
    reference = None if args.ours_only else Torch(args, batch, shape=shape)
    head_peer = (
        Torch(args, batch, shape=shape, answer_logits_only=True)
        if args.split_head and not args.ours_only
        else None
    )
    for side in (reference, head_peer):
        if side is not None:
            side.step()  # warm-up (allocator, kernels)
    ours_times, ref_times, head_times = [], [], []
    for _ in range(args.rounds):
        ours_times += [ours.step() for _ in range(args.steps)]
        if reference is not None:
            ref_times += [reference.step() for _ in range(args.steps)]
        if head_peer is not None:
            head_times += [head_peer.step() for _ in range(args.steps)]
    tokens = args.seq * args.batch
    ours_cpu = statistics.median(c for _, c in ours_times)
    ref_cpu = statistics.median(c for _, c in ref_times) if ref_times else None
    ours_times = [w for w, _ in ours_times]
    ref_times = [w for w, _ in ref_times]
    ours_tps = tokens / statistics.median(ours_times)
    settings = _settings(args, batch)
    mfu = (
        ours.flops / statistics.median(ours_times) / (ours.peak * ours.devices)
        if ours.peak
        else None
    )
    detail = {
        "name": "train_step_detail",
        "ours_step_s": [round(t, 4) for t in ours_times],
        "ours_step_cpu_s": round(ours_cpu, 4),
        "reference_step_cpu_s": None if ref_cpu is None else round(ref_cpu, 4),
        "reference_step_s": [round(t, 4) for t in ref_times],
        "ours_compile_s": round(compile_s, 2),
        "ours_model_flops_per_step": ours.flops,
        "ours_mfu": mfu,
        "reference_answer_head_step_s": [round(t, 4) for t, _ in head_times],
    }
    print(json.dumps(detail), flush=True)
    ref_tps = tokens / statistics.median(ref_times) if ref_times else None
    head = {}
    if head_times:
        # ours / torch = (ours / torch with an answer-only head) x (that / torch): the
        # first factor is what is left of the gain once the head does the same work.
        head_tps = tokens / statistics.median(t for t, _ in head_times)
        head_cpu = statistics.median(c for _, c in head_times)
        head = {
            "reference_answer_head": round(head_tps, 2),
            "ratio_vs_answer_head": round(ours_tps / head_tps, 3),
            "ratio_cpu_vs_answer_head": round(head_cpu / ours_cpu, 3),
            "answer_head_gain_of_reference": round(head_tps / ref_tps, 3),
        }
    record = {
        "name": f"train_step_{args.mode}",
        "ours": round(ours_tps, 2),
        "reference": None if ref_tps is None else round(ref_tps, 2),
        "unit": "tokens/s",
        "ratio": None if ref_tps is None else round(ours_tps / ref_tps, 3),
        # CPU seconds per step (all threads of the process): steadier than wall time on
        # a shared machine, where other jobs take the cores from either side.
        "ratio_cpu": None if ref_cpu is None else round(ref_cpu / ours_cpu, 3),
        "reference_impl": None
        if ref_tps is None
        else f"transformers{'+peft' if args.mode == 'lora' else ''} (torch, sdpa)",
        **head,
        **settings,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
