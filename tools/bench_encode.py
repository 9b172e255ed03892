"""Benchmark of the encoding stage (docs/encoding.md).

1. Tokens/s of the fast prompt -> ids path (``PromptTokenizer.encode``) vs the Hugging
   Face fast tokenizer (``tokenizer(texts)``, Rust, its default threads) on the same
   training prompts; the ids are checked to be identical in the same run.
2. End-to-end pipeline tokens/s per CPU core: task shards -> grain pipeline (decode,
   sample, encode numbers, prompt, ids, pack, batch) in one process.

Tasks are synthetic tables shaped like the prior's (1024 rows, 5-50 features, 2-10
classes, 80/20 split); encoding speed depends on shapes and value widths only.

    .venv/bin/python tools/bench_encode.py --prompts 48 --pipeline-tasks 96

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from mllm_jax.data.pipeline import PipelineConfig, build_pipeline
from mllm_jax.encoding.pack import packing_efficiency
from mllm_jax.encoding.sampling import SamplingConfig, select_rows
from mllm_jax.encoding.sequence import TaskSequenceEncoder, task_prompt
from mllm_jax.encoding.tokens import PromptTokenizer, load_tokenizer, render_chat
from mllm_jax.foundation.tasks import Task, encode_task


def synthetic_task(rng: np.random.Generator, index: int) -> Task:
    rows, n_features = 1024, int(rng.integers(5, 51))
    n_classes = int(rng.integers(2, 11))
    X = rng.normal(size=(rows, n_features)) * rng.lognormal(size=n_features)
    y = np.argmax(X @ rng.normal(size=(n_features, n_classes)), axis=1)
    categorical = np.zeros(n_features, dtype=bool)
    return Task(
        X.astype(np.float32), y.astype(np.int32), n_classes, 820, categorical, "mlp", 0, index
    )


def bench_tokens(args: argparse.Namespace, tokenizer, fast: PromptTokenizer) -> dict:
    rng = np.random.default_rng(args.seed)
    config = SamplingConfig(token_budget=args.token_budget)
    encoder = TaskSequenceEncoder(fast, config)
    prompts = []
    for i in range(args.prompts):
        task = synthetic_task(rng, i)
        shots, queries = select_rows(task, rng, config)
        _, n_shots, _ = encoder.fit_to_budget(task, shots, queries)
        prompts.append(task_prompt(task, shots[:n_shots], queries, config))
    texts = [render_chat(p.messages()) for p in prompts]

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    ours_s, ours = timed(lambda: [fast.encode(p).ids for p in prompts])
    hf_s, hf = timed(lambda: tokenizer(texts)["input_ids"])
    identical = all(a.tolist() == b for a, b in zip(ours, hf, strict=True))
    if not identical:
        raise SystemExit("fast path ids differ from the tokenizer's: benchmark invalid")
    tokens = sum(len(ids) for ids in ours)
    return {
        "ours": tokens / ours_s,
        "reference": tokens / hf_s,
        "prompts": len(prompts),
        "tokens": tokens,
        "mean_tokens_per_prompt": tokens / len(prompts),
        "identical": identical,
    }


def bench_pipeline(args: argparse.Namespace, fast: PromptTokenizer) -> dict:
    rng = np.random.default_rng(args.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.array_record"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for i in range(args.pipeline_tasks):
            writer.write(encode_task(synthetic_task(rng, i)))
        writer.close()
        config = PipelineConfig(
            SamplingConfig(token_budget=args.token_budget),
            seq_len=args.seq_len,
            batch_size=1,
            packing_bins=args.packing_bins,
            num_epochs=1,
        )
        dataset = build_pipeline(
            [path], config, seed=args.seed, process_index=0, process_count=1, tokenizer=fast
        )
        start_cpu, start = time.process_time(), time.perf_counter()
        tokens, efficiency, batches = 0, [], 0
        for batch in dataset:
            tokens += int((batch["segment_ids"] > 0).sum())
            efficiency.append(packing_efficiency(batch))
            batches += 1
        wall = time.perf_counter() - start
        cpu = time.process_time() - start_cpu
    return {
        "pipeline_tokens_per_s": tokens / wall,
        "pipeline_tokens_per_cpu_s": tokens / cpu,
        "pipeline_cpu_cores_used": cpu / wall,
        "pipeline_tasks": args.pipeline_tasks,
        "pipeline_rows": batches,
        "pipeline_tokens": tokens,
        "packing_efficiency": float(np.mean(efficiency)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-tasks", type=int, default=96)
    parser.add_argument("--token-budget", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--packing-bins", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    fast = PromptTokenizer(tokenizer)
    result = bench_tokens(args, tokenizer, fast)
    print(
        f"fast path {result['ours'] / 1e6:.2f} M tokens/s, HF tokenizer "
        f"{result['reference'] / 1e6:.2f} M tokens/s on {result['prompts']} prompts "
        f"({result['mean_tokens_per_prompt']:.0f} tokens each), identical ids"
    )
    pipeline = bench_pipeline(args, fast)
    print(
        f"pipeline {pipeline['pipeline_tokens_per_s']:.0f} tokens/s on "
        f"{pipeline['pipeline_cpu_cores_used']:.2f} cores = "
        f"{pipeline['pipeline_tokens_per_cpu_s']:.0f} tokens per CPU-second, packing "
        f"efficiency {pipeline['packing_efficiency']:.3f}"
    )
    line = {
        "name": "encode_tokens",
        "ours": round(result["ours"]),
        "reference": round(result["reference"]),
        "unit": "tokens/s",
        "ratio": round(result["ours"] / result["reference"], 2),
        **{k: v for k, v in result.items() if k not in ("ours", "reference")},
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in pipeline.items()},
        "token_budget": args.token_budget,
        "seq_len": args.seq_len,
        "packing_bins": args.packing_bins,
        "seed": args.seed,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    line["mean_tokens_per_prompt"] = round(line["mean_tokens_per_prompt"], 1)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
