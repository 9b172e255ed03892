"""Benchmark of inference (docs/infer.md): query rows/s of many-shot label scoring.

Scores `--queries` test rows of a `--features`-feature table against a `--shots`-shot
prompt prefix, in chunks of `--chunk-size` rows, `--batch-size` chunks per model call:

- ours: the prefix prefilled once, its KV cache shared by every chunk (no copy), the
  answer scored slot by slot with an incremental cache;
- reference (the peer): transformers' PyTorch Qwen2ForCausalLM on the same weights
  (our random model exported with `save_hf`, loaded with `from_pretrained`, float32,
  sdpa attention), with its own prefix KV-cache reuse: the prefix runs once with
  `use_cache=True`, every chunk continues from a `copy.deepcopy` of its `DynamicCache`,
  and the answer is teacher-forced slot by slot the same way (the label-token logits at
  each slot, the argmax written into it, the fixed tokens up to the next slot appended
  in one call, `logits_to_keep=1`). Timed on all chunks, prefix included, like ours.
  Its class probabilities must equal ours within `--tolerance` (else the run fails);
- no_reuse (an ablation, not a peer): our scoring with the whole prompt (prefix
  included) encoded again for every chunk, as a server without prefix caching runs the
  reference's prompts. Every chunk is then an independent call of the same shape and
  cost, so its rate is measured on the first `--reference-chunks` chunks (default 1 of
  4: the full 200 rows take ~5x ours);
- generate: free greedy generation of the JSON answer with the prefix reused (the JSON
  mode), the full answer length (a random model never stops early, so its budget is set
  to the length of a complete answer, what a trained model writes);
- generate_no_reuse (with --generate-no-reuse): generation with the whole prompt per
  chunk, the reference's own evaluation (vLLM generation, no prefix caching); timed on
  the reference's chunks.

On CPU the default is one chunk per model call (`--batch-size 1`): XLA:CPU runs the
shared-prefix attention of a batch of B > 1 rows about 2x slower per key than batch 1
(see docs/infer.md); on a GPU use `--batch-size 4`.

Every mode is first called on one chunk (compiling the programs every chunk uses), then
timed (best of `--repeats`, default 1); the label probabilities of ours, transformers'
and the no-reuse ablation are checked to agree on the rows each scored, in the same run.
JAX uses all the cores; torch is timed at each of `--threads` (default 1 and the CPU
count) and the peer is reported at its fastest: on a loaded machine torch's second
thread mostly waits for a core, and one thread can be several times faster.

    .venv/bin/python tools/bench_infer.py                       # CPU, tiny model
    python tools/bench_infer.py --preset qwen2.5-7b --dtype bfloat16 --attention-backend xla \\
        --attention-query-chunk 128 --batch-size 4 --no-transformers   # GPU, 7B-shaped

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import pandas as pd

from mllm_jax.infer import RunSettings, answer_frame, build_chunked_prompt, from_model
from mllm_jax.infer.runner import decode_prompt, score_prompt
from mllm_jax.model import init_model, preset


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, CPU seconds of that run, output). CPU time (all threads of
    this process) is the steadier measure on a shared machine."""
    out, best, best_cpu = None, float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out) if not isinstance(out, np.ndarray) else out)
        wall = time.perf_counter() - start
        if wall < best:
            best, best_cpu = wall, time.process_time() - start_cpu
    return best, best_cpu, out


def load_transformers(model, threads: int, dtype: str):
    """Our model's weights in transformers' Qwen2ForCausalLM (`dtype`, sdpa attention):
    exported with `save_hf` into a temporary directory, loaded with `from_pretrained`."""
    import tempfile

    import torch
    from transformers import Qwen2ForCausalLM

    from mllm_jax.model import save_hf

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, f"{tmp}/model", dtype=dtype)
        hf = Qwen2ForCausalLM.from_pretrained(
            f"{tmp}/model", dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
    return hf.eval()


def transformers_scoring(hf, prompt, frame, label_ids: np.ndarray, n_classes: int) -> np.ndarray:
    """The peer: label log-probabilities f32[rows, n_classes] of every test row with
    transformers' own prefix KV-cache reuse.

    The prefix runs once into a `DynamicCache`; each chunk continues from a deep copy of
    it (the prefix's keys and values are never recomputed). At slot k the label tokens'
    logits give row k's distribution; its argmax (the model's greedy label, as ours) is
    written into the slot and the fixed tokens up to slot k + 1 follow in one call.
    """
    import copy
    import inspect

    import torch
    from transformers import DynamicCache

    # transformers 5.x renames `past_key_values` to `cache` (the old name is deprecated).
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    labels = torch.as_tensor(label_ids[:n_classes], dtype=torch.long)

    def call(ids, cache) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(ids, np.int64)[None])
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache})
        return torch.log_softmax(out.logits[0, -1, labels].float(), dim=-1)

    out = np.zeros((prompt.rows[-1].stop, n_classes), np.float32)
    with torch.inference_mode():
        prefix = DynamicCache(config=hf.config)
        call(prompt.prefix, prefix)
        for c, rows in enumerate(prompt.rows):
            cache = copy.deepcopy(prefix)
            log_probs = call(prompt.queries[c], cache)
            for k in range(len(rows)):
                out[rows.start + k] = log_probs.numpy()
                if k + 1 < len(rows):
                    step = frame.ids[frame.slots[k] : frame.slots[k + 1]].copy()
                    step[0] = label_ids[int(torch.argmax(log_probs))]
                    log_probs = call(step, cache)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-backend", default="xla")
    parser.add_argument("--attention-query-chunk", type=int, default=128)
    parser.add_argument("--shots", type=int, default=512)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--reference-chunks",
        type=int,
        default=1,
        help="Chunks the no-reuse ablation is timed on (0: all).",
    )
    parser.add_argument(
        "--no-transformers",
        action="store_true",
        help="Skip the transformers peer (e.g. a 7B-shaped model: torch here is CPU-only).",
    )
    parser.add_argument(
        "--threads",
        default=f"1,{os.cpu_count() or 1}",
        help="torch thread counts the peer is timed with (comma list); it is reported at "
        "its fastest (on a loaded machine 1 thread can beat 2: idle threads wait for cores).",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="Largest |p_ours - p_transformers| accepted (float32: ~1e-6 is typical).",
    )
    parser.add_argument("--no-generate", action="store_true", help="Skip the generation modes.")
    parser.add_argument(
        "--generate-no-reuse", action="store_true", help="Also time generation without reuse."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    threads = sorted({int(n) for n in str(args.threads).split(",")})

    overrides = dict(
        param_dtype=args.dtype,
        compute_dtype=args.dtype,
        attention_backend=args.attention_backend,
        attention_query_chunk=args.attention_query_chunk,
        max_position_embeddings=131072,
    )
    if args.preset == "tiny":  # the real Qwen2.5 vocabulary, tied: prompts are real prompts
        overrides.update(vocab_size=151936, tie_word_embeddings=True, initializer_range=0.2)
    config = preset(args.preset, **overrides)
    start = time.perf_counter()
    model = init_model(config, args.seed)
    loaded = from_model(model)
    log(
        f"model {args.preset}: {config.num_parameters() / 1e6:.1f}M parameters "
        f"({time.perf_counter() - start:.1f} s)"
    )

    rng = np.random.default_rng(args.seed)
    shots = pd.DataFrame(rng.normal(size=(args.shots, args.features)))
    y = rng.integers(0, args.classes, args.shots)
    test = pd.DataFrame(rng.normal(size=(args.queries, args.features)))
    start = time.perf_counter()
    prompt = build_chunked_prompt(
        loaded.prompt_tokenizer, shots, y, test, chunk_size=args.chunk_size
    )
    build_s = time.perf_counter() - start
    query_tokens = [len(q) for q in prompt.queries]
    log(
        f"prompt: prefix {len(prompt.prefix)} tokens, {len(prompt.queries)} chunks of "
        f"~{int(np.mean(query_tokens))} query tokens (built in {build_s:.3f} s)"
    )

    reuse = RunSettings(args.batch_size, args.prefill_chunk, reuse_prefix=True)
    again = RunSettings(args.batch_size, args.prefill_chunk, reuse_prefix=False)
    results: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}

    def first(p, n: int):
        """`p` cut to its first `n` chunks (a prompt of its own; same shapes)."""
        return dataclasses.replace(p, queries=p.queries[:n], rows=p.rows[:n])

    def run(name, fn, timed, warm=None):
        """Times `fn(timed)` after a first call on one chunk (or `warm`), which compiles
        the same programs (every chunk has the shapes of the first) at a fraction of the
        cost."""
        start = time.perf_counter()
        fn(first(timed, 1) if warm is None else warm)
        compile_s = time.perf_counter() - start
        seconds, cpu, out = best_time(lambda: fn(timed), args.repeats)
        rows = timed.rows[-1].stop
        results[name] = rows / seconds
        cpu_seconds[name] = cpu * args.queries / rows  # CPU seconds per all queries
        log(
            f"{name}: {rows} rows, {seconds:.2f} s wall, {cpu:.2f} s CPU, "
            f"{results[name]:.2f} rows/s (first call, one chunk: {compile_s:.1f} s)"
        )
        return out

    ours = run("reuse", lambda p: score_prompt(loaded, p, args.classes, reuse), prompt)
    n_ref = len(prompt.queries) if args.reference_chunks < 1 else args.reference_chunks
    ref_prompt = first(prompt, n_ref)
    ref = run("no_reuse", lambda p: score_prompt(loaded, p, args.classes, again), ref_prompt)
    ref_rows = ref_prompt.rows[-1].stop
    max_diff = float(np.abs(np.exp(ours[:ref_rows]) - np.exp(ref)).max())
    log(f"max |p_reuse - p_no_reuse| = {max_diff:.2e}")

    answer_tokens = len(answer_frame(loaded.prompt_tokenizer, args.chunk_size).ids) + 3
    frame = answer_frame(loaded.prompt_tokenizer, args.chunk_size)
    peer: dict = {}

    def rate(name: str) -> float | None:  # JSON has no NaN: modes not run are null
        return round(results[name], 3) if name in results else None

    if not args.no_transformers:
        import torch
        import transformers

        start = time.perf_counter()
        hf = load_transformers(model, threads[0], args.dtype)
        log(f"transformers model loaded ({time.perf_counter() - start:.1f} s)")
        label_ids = np.asarray(loaded.prompt_tokenizer.digit_ids)
        warm = dataclasses.replace(first(prompt, 1), prefix=prompt.prefix[:256])
        gaps, same = [], []
        for n in threads:  # the peer is its best thread count
            torch.set_num_threads(n)
            theirs = run(
                f"transformers_{n}_threads",
                lambda p: transformers_scoring(hf, p, frame, label_ids, args.classes),
                prompt,
                warm,
            )
            gaps.append(float(np.abs(np.exp(ours) - np.exp(theirs)).max()))
            same.append(float(np.mean(ours.argmax(-1) == theirs.argmax(-1))))
        best = max(threads, key=lambda n: results[f"transformers_{n}_threads"])
        results["transformers"] = results[f"transformers_{best}_threads"]
        cpu_seconds["transformers"] = cpu_seconds[f"transformers_{best}_threads"]
        peer = {
            "max_prob_diff": max(gaps),
            "same_predictions": min(same),
            "impl": f"transformers {transformers.__version__} torch {torch.__version__} "
            f"attn={hf.config._attn_implementation}, DynamicCache copied per chunk, "
            f"{best} threads (best of {threads})",
            "by_threads": {n: rate(f"transformers_{n}_threads") for n in threads},
        }
        log(f"max |p_reuse - p_transformers| = {peer['max_prob_diff']:.2e}")
        if not peer["max_prob_diff"] <= args.tolerance:
            raise SystemExit(
                f"ours and transformers disagree: max probability difference "
                f"{peer['max_prob_diff']:.3g} > --tolerance {args.tolerance:g}"
            )
    answer_total = len(query_tokens) * int(frame.slots[-1] - frame.slots[0])
    if not args.no_generate:
        run(
            "generate",
            lambda p: decode_prompt(loaded, p, args.classes, answer_tokens, reuse),
            prompt,
        )
    if not args.no_generate and args.generate_no_reuse:
        run(
            "generate_no_reuse",
            lambda p: decode_prompt(loaded, p, args.classes, answer_tokens, again),
            ref_prompt,
        )

    load_end = os.getloadavg()[0]
    record = {
        "name": "infer_label_scoring",
        "ours": rate("reuse"),
        "reference": rate("transformers"),
        "unit": "query rows/s",
        "ratio": (
            round(results["reuse"] / results["transformers"], 3)
            if "transformers" in results
            else None
        ),
        # CPU seconds per mode for all the queries (the ablation's scaled from the rows it
        # was timed on); ratio_cpu = the peer's / ours
        "cpu_seconds": {k: round(v, 2) for k, v in cpu_seconds.items()},
        "ratio_cpu": (
            round(cpu_seconds["transformers"] / cpu_seconds["reuse"], 3)
            if "transformers" in cpu_seconds
            else None
        ),
        "max_prob_diff": peer.get("max_prob_diff"),
        "same_predictions": peer.get("same_predictions"),
        "reference_impl": peer.get("impl"),
        "reference_by_threads": peer.get("by_threads"),
        # Ablation (not a peer): our scoring re-encoding the whole prompt per chunk.
        "ablation_no_reuse": {
            "rate": rate("no_reuse"),
            "ratio": round(results["reuse"] / results["no_reuse"], 3),
            "ratio_cpu": round(cpu_seconds["no_reuse"] / cpu_seconds["reuse"], 3),
            "max_prob_diff": max_diff,
            "rows_timed": ref_rows,
        },
        "generate": rate("generate"),
        "ratio_vs_generate": (
            round(results["reuse"] / results["generate"], 3) if "generate" in results else None
        ),
        "generate_no_reuse": rate("generate_no_reuse"),
        # Tokens through the model per mode (answers included): the ratio a model whose
        # cost is linear in tokens would show; attention makes long prompts cost more.
        "tokens_reuse": len(prompt.prefix) + sum(query_tokens) + answer_total,
        "tokens_no_reuse": len(prompt.prefix) * len(query_tokens)
        + sum(query_tokens)
        + answer_total,
        "prefix_tokens": len(prompt.prefix),
        "query_tokens_mean": float(np.mean(query_tokens)),
        "answer_tokens": answer_tokens,
        "prompt_build_s": round(build_s, 4),
        "preset": args.preset,
        "dtype": args.dtype,
        "shots": args.shots,
        "features": args.features,
        "queries": args.queries,
        "chunk_size": args.chunk_size,
        "batch_size": args.batch_size,
        "prefill_chunk": args.prefill_chunk,
        "attention_query_chunk": args.attention_query_chunk,
        "repeats": args.repeats,
        "threads": threads,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "host": platform.node(),
        # 1-minute load average at the start and the end (a shared machine inflates the
        # wall times; the CPU-second ratio is the steadier comparison)
        "loadavg_1m": [round(load_start, 2), round(load_end, 2)],
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
