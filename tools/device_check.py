"""Accelerator readiness: one prepared run of every GPU check, in at most 8 minutes.

    python tools/device_check.py --out gpu.jsonl     # on a GPU machine (H100 / H200)
    python tools/device_check.py --cpu-smoke         # every check at tiny shapes on CPU

Prints one JSON line per check ("check", "status": ok | fail | error | "skipped:
<reason>", "summary", numbers), then a markdown table of all of them; `--out FILE` writes
the JSON lines to FILE as well, each as soon as its check ends. `--only NAME` runs the
checks whose name starts with NAME (`--only attention`, `--only train_lora --train-shapes
7b`); `--list` names them. Every shape and size is a flag (`--help`).

Checks, in order (shapes: Qwen2.5 presets with random weights, fewer layers where said):

  attention:xla     bf16 XLA attention against a float32 (highest matmul precision)
                    run of the same weights: the size of bf16 noise the others are held to
  attention:cudnn   `attention_backend="cudnn"` against "xla" (same bf16 weights): hidden
  attention:splash  states and every parameter gradient of a 1.5B-shaped 2-layer stack at
                    4k and 32k tokens, causal (no segment ids) and packed (8 segments + a
                    padding tail, zero cotangent on the padding as the loss mask makes it);
                    pass rule and its justification: `child_attention`
  train_lora:1.5b   our LoRA train step (tools/bench_train.py `Ours`: make_train_step, r=8
  train_lora:7b     on all seven linears, remat "full" as configs/qwen2.5-7b-lora.yaml,
                    bf16, batch 1, 768 answer tokens, 4 of 28 layers) per attention backend
                    at the recipe's 32k tokens, or the longest of 16k / 8k that fits:
                    tokens/s, MFU (mllm_jax.train.flops, of the layers run), and tokens/s of
                    all 28 layers at that MFU
  torch_lora:1.5b   the same step in transformers + peft (tools/bench_train.py `Torch`,
  torch_lora:7b     sdpa, gradient checkpointing, no torch.compile, LM head on the answer
                    tail only): tokens/s, and ours/torch at the same sequence length
  prior             tasks/s of `mllm_jax.prior.sample_tasks` with chunk_size = task_block
                    = 512 (docs/prior.md); its programs compile in the background from the
                    start, beside the other checks, and only the sampling is timed alone
  infer             many-shot label scoring with the prefix KV cache reused (`score_prompt`)
                    against transformers reusing its own cache of the same prefix (deep copy
                    per chunk, greedy label per slot as ours): label probabilities and rows/s

Every check runs in its own process (a crash, an out-of-memory abort or a hung kernel
costs that check only; all shapes of one side share a process, each reporting on its
own), started while the check before it runs so that its imports overlap that run; it
touches the device only when its turn comes. A check that raises prints status "error"
with the message; one still running at 1.5x its budget, or at `--time-limit`, is stopped
and reported as an error, and checks that no longer fit are skipped, so the table always
comes out. Compiled programs go to a persistent cache (`--compile-cache`): a second run
on the same machine skips most compilation (its compile_s then say so).

Time estimate on one H100 (989e12 bf16 FLOP/s dense peak, the work assumed to run at
~40% of it; model FLOPs from mllm_jax.train.flops, remat adds one forward; compile times
extrapolated from the CPU's, docs/model.md, not measured on a GPU):
  attention  2 layers, 4 cases x (xla, cudnn, f32): a 32k fwd+bwd with remat ~ 46 TFLOP
             -> 0.12 s bf16, ~1 s f32 (67 TFLOP/s without tensor cores); 4k ~ 3.4
             TFLOP; 12 programs compiled side by side ~ 40 s                     ~ 60 s
  train 1.5b 4 layers, 32k: 65 TFLOP/step (90 executed) -> 0.16 s; 5 steps + ~25 s
             compile per backend, 2 backends                                     ~ 60 s
  train 7b   4 layers, 32k: 216 TFLOP/step (308 executed) -> 0.55 s; xla may need
             16k (86 TFLOP; its dense backward keeps a layer's [T, S] softmax), one
             more compile                                                        ~ 90 s
  torch      the same steps, no compile, model built on the GPU          ~ 25 s + 35 s
  prior      16,384 + 4,096 warm-up tasks at ~1,900 tasks/s (an H200, docs/prior.md);
             its ~110 s compile overlaps the checks above                        ~ 20 s
  infer      4 layers, 512 shots (~15k-token prefix), 200 rows in 4 chunks: compile
             ~20 s, scoring ~5 s; transformers ~10 s (a 50-call loop per chunk)  ~ 50 s
  processes  6 CUDA contexts x ~3 s (imports overlap the check before)            ~ 20 s
  total                                                                        ~ 360 s
Each check's budget (`checks`) is its estimate; `--time-limit` (480 s) caps the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(ROOT))

RESULT = "@@RESULT "
READY = "@@READY"
H100_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM and H200 alike (mllm_jax.train.flops)

# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass
class Settings:
    """Shapes and sizes of every check (GPU defaults; SMOKE overrides them on CPU).
    Every field is a flag: `--attn-seqs 4096,32768`, `--train-layers 8`, ..."""

    # attention
    attn_shape: str = "1.5b"
    attn_layers: int = 2
    attn_seqs: tuple[int, ...] = (4096, 32768)
    attn_masks: tuple[str, ...] = ("causal", "packed")
    attn_segments: int = 8
    attn_query_chunk: int = 512
    attn_tol: float = 2.0**-4
    attn_factor: float = 2.0
    attn_reference: bool = True
    # train (ours) and torch
    train_shapes: tuple[str, ...] = ("1.5b", "7b")
    train_layers: int = 4
    train_seqs: tuple[int, ...] = (32768, 16384, 8192)
    train_attention: tuple[str, ...] = ("cudnn", "xla")
    train_answer: int = 768
    train_dtype: str = "bfloat16"
    train_torch_dtype: str = "bfloat16"
    train_remat: str = "full"
    train_query_chunk: int = 512
    train_steps: int = 3
    # prior
    prior_tasks: int = 16384
    prior_warmup: int = 4096
    prior_chunk: int = 512
    prior_task_block: int = 512
    prior_config: str = "{}"
    # inference
    infer_shape: str = "1.5b"
    infer_layers: int = 4
    infer_dtype: str = "bfloat16"
    infer_init_std: float = 0.02
    infer_shots: int = 512
    infer_features: int = 10
    infer_classes: int = 3
    infer_queries: int = 200
    infer_chunk: int = 50
    infer_batch: int = 1
    infer_prefill_chunk: int = 2048
    infer_tol: float = 0.02
    # run
    time_limit: float = 480.0
    compile_cache: str = "/tmp/mllm_jax_device_check_cache"


SMOKE: dict[str, Any] = dict(
    attn_seqs=(256,),
    attn_layers=1,
    attn_segments=3,
    attn_query_chunk=64,
    train_layers=1,
    train_seqs=(256, 128),
    train_answer=16,
    train_dtype="float32",
    train_torch_dtype="float32",
    train_query_chunk=64,
    train_steps=2,
    prior_tasks=8,
    prior_warmup=4,
    prior_chunk=4,
    prior_task_block=4,
    prior_config=json.dumps(
        {
            "rows": 96,
            "max_features": 8,
            "max_hidden": 32,
            "widths": [32],
            "tree_prob": 0.0,
            "cat_prob": 0.0,
        }
    ),
    infer_layers=2,
    infer_dtype="float32",
    infer_init_std=0.2,
    infer_shots=32,
    infer_features=4,
    infer_queries=10,
    infer_chunk=5,
    infer_prefill_chunk=512,
    infer_tol=1e-3,
    time_limit=600.0,
    compile_cache="",
)

SMOKE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

# Tiny stand-ins of the presets for --cpu-smoke (GQA, tied vs untied as the real ones).
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "1.5b": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        vocab_size=640,
        hidden_size=96,
        intermediate_size=160,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}
PRESETS = {"1.5b": "qwen2.5-1.5b", "7b": "qwen2.5-7b"}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    budget: float  # seconds on one H100 (see the module docstring)
    phases: tuple[str, ...]  # child functions, one process each
    smoke_budget: float  # seconds of --cpu-smoke
    needs: str | None = None  # an earlier check whose record the first phase reads
    records: tuple[str, ...] = ()  # the names one phase reports (default: the check's)


def checks(s: Settings) -> list[Check]:
    """The checks in running order. Budgets: seconds on one H100 (the module docstring's
    estimates) and, for --cpu-smoke, about twice what 2 shared cores took at load 5."""
    # One process for all shapes of a side (each shape reports on its own and fails on
    # its own): a process costs ~5 s (JAX) or ~10 s (torch) of imports on a small CPU.
    train_budget = {"1.5b": 60, "7b": 90}
    torch_budget = {"1.5b": 25, "7b": 35}
    shapes = s.train_shapes
    return [
        Check(
            "attention",
            60,
            ("attention",),
            100,
            records=("attention:xla", "attention:cudnn", "attention:splash"),
        ),
        Check(
            "train_lora",
            5 + sum(train_budget.get(x, 90) for x in shapes),
            ("train",),
            30 + 30 * len(shapes),
            records=tuple(f"train_lora:{x}" for x in shapes),
        ),
        Check(
            "torch_lora",
            10 + sum(torch_budget.get(x, 35) for x in shapes),
            ("torch_train",),
            30 + 15 * len(shapes),
            needs="train_lora",
            records=tuple(f"torch_lora:{x}" for x in shapes),
        ),
        Check("prior", 20, ("prior",), 60),
        Check("infer", 50, ("infer", "infer_torch"), 80),
    ]


def _parse_field(field: dataclasses.Field, text: str) -> Any:
    kind = str(field.type)
    if kind.startswith("tuple"):
        item = int if "int" in kind else str
        return tuple(item(x) for x in text.split(",") if x)
    if kind == "bool":
        return text.lower() in ("1", "true", "yes", "on")
    return {"int": int, "float": float}.get(kind, str)(text)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Shapes and sizes: every field of Settings is a flag (defaults: GPU; "
        "--cpu-smoke replaces them with tiny ones, flags given still win).",
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--only", default=None, help="run the checks whose name starts so")
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check-name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prev", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--wait-go", action="store_true", help=argparse.SUPPRESS)
    for field in dataclasses.fields(Settings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=None,
            metavar="V" if not str(field.type).startswith("tuple") else "A,B",
            help=f"default {field.default!r}",
        )
    args = parser.parse_args(argv)
    values = {f.name: f.default for f in dataclasses.fields(Settings)}
    if args.cpu_smoke:
        values.update(SMOKE)
    for field in dataclasses.fields(Settings):
        given = getattr(args, field.name)
        if given is not None:
            values[field.name] = _parse_field(field, given)
    return args, Settings(**values)


# ------------------------------------------------------------------------------ parent


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gpus() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Child:
    """One phase of a check in its own process; its stdout lines go to a queue.

    The process starts ahead of its turn: it imports what it needs (the prior also
    compiles), prints READY and waits for "go" on stdin before touching the device."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: a stop ends its workers too
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next stdout line; None at the end of output; TimeoutError at `deadline`."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            return self.lines.get(timeout=left)
        except queue.Empty:
            raise TimeoutError from None

    def go(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class Runner:
    """Runs the checks' phases one after another and prints their records."""

    def __init__(self, args: argparse.Namespace, settings: Settings, argv: list[str]):
        self.args = args
        self.settings = settings
        self.argv = argv
        self.start = time.monotonic()
        self.end = self.start + settings.time_limit
        self.records: list[dict[str, Any]] = []
        self.by_name: dict[str, dict[str, Any]] = {}
        self.by_check: dict[str, dict[str, dict[str, Any]]] = {}
        self.out = open(args.out, "w") if args.out else None  # noqa: SIM115
        self.workdir = Path(tempfile.mkdtemp(prefix="device_check_"))
        self.plan: list[tuple[Check, str]] = []  # every phase to run, in order
        self.children: dict[tuple[str, str], Child] = {}  # started, not yet run
        self.current: Child | None = None  # the phase running now

    # -- output

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.by_name[record["check"]] = record
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()

    def table(self) -> str:
        rows = ["| check | status | result | time (budget) |", "|---|---|---|---|"]
        for r in self.records:
            status = str(r["status"]).replace("|", "/")
            summary = str(r.get("summary", "")).replace("|", "/")
            spent = r.get("elapsed_s")
            budget = r.get("budget_s")
            timing = "" if spent is None else f"{spent:.0f} s"
            if budget is not None:
                timing += f" ({budget:.0f} s)"
            rows.append(f"| {r['check']} | {status} | {summary} | {timing} |")
        total = time.monotonic() - self.start
        return "\n".join(rows) + f"\n\nTotal {total:.0f} s (limit {self.settings.time_limit:.0f} s)"

    # -- children

    def prev_file(self, check: Check, phase: str) -> Path:
        return self.workdir / f"{check.name}.{phase}.prev.json"

    def child_argv(self, phase: str, check: Check) -> list[str]:
        argv = [sys.executable, str(Path(__file__).resolve()), *self.argv]
        argv += ["--child", phase, "--check-name", check.name, "--workdir", str(self.workdir)]
        return [*argv, "--prev", str(self.prev_file(check, phase)), "--wait-go"]

    def child_env(self, phase: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        # Several processes share the GPU (the prior compiling beside the others; JAX and
        # torch): none may grab 75% of its memory up front.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.args.cpu_smoke:
            env["JAX_PLATFORMS"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
            # A smoke test runs each program a few times: XLA:CPU's lowest optimisation
            # level halves compile time (the prior's program: 25 s instead of 49).
            env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *SMOKE_XLA_FLAGS]).strip()
        if phase in TORCH_PHASES:
            env["JAX_PLATFORMS"] = "cpu"  # torch phases import our config code only
        if self.settings.compile_cache:
            env.setdefault("JAX_COMPILATION_CACHE_DIR", self.settings.compile_cache)
        return env

    def spawn(self, check: Check, phase: str) -> None:
        key = (check.name, phase)
        if key not in self.children:
            self.children[key] = Child(self.child_argv(phase, check), self.child_env(phase))

    def spawn_next(self, check: Check, phase: str) -> None:
        """Starts the phase after this one, so that its imports overlap this one's run."""
        keys = [(c.name, p) for c, p in self.plan]
        i = keys.index((check.name, phase))
        if i + 1 < len(self.plan):
            self.spawn(*self.plan[i + 1])

    def drop(self, check: Check) -> None:
        for phase in check.phases:
            child = self.children.pop((check.name, phase), None)
            if child is not None:
                child.stop()

    def run_phase(
        self, check: Check, phase: str, deadline: float
    ) -> tuple[list[dict[str, Any]], str | None]:
        """(records the phase printed, error text or None)."""
        self.spawn(check, phase)
        child = self.current = self.children.pop((check.name, phase))
        self.spawn_next(check, phase)
        found: list[dict[str, Any]] = []
        ready = False
        try:
            while (line := child.next_line(deadline)) is not None:
                if line == READY:
                    ready = True
                    child.go()
                elif line.startswith(RESULT):
                    found.append(json.loads(line[len(RESULT) :]))
        except TimeoutError:
            child.stop()
            if not ready:
                return found, f"not ready (still importing or compiling) at {_age(self)}"
            return found, f"stopped at its deadline ({_age(self)} into the run)"
        child.proc.wait()
        if child.proc.returncode != 0 and not found:
            return found, f"process exited with code {child.proc.returncode} (see stderr)"
        return found, None

    def run(self) -> int:
        self.emit(self.env_record())
        selected = [
            c
            for c in checks(self.settings)
            if self.args.only is None
            or c.name.startswith(self.args.only)
            or any(r.startswith(self.args.only) for r in c.records)
        ]
        if not selected:
            print(f"no check matches --only {self.args.only!r}", file=sys.stderr)
            return 2
        self.plan = [(c, p) for c in selected for p in c.phases]
        for check in selected:
            if check.name == "prior":  # compiles from the start, beside the others
                self.spawn(check, "prior")
        try:
            for check in selected:
                self.run_check(check)
        finally:
            for child in [*self.children.values(), self.current]:
                if child is not None:
                    child.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
        print()
        print(self.table(), flush=True)
        if self.out is not None:
            self.out.close()
        return 0

    def env_record(self) -> dict[str, Any]:
        gpus, versions = _gpus(), _versions()
        return {
            "check": "env",
            "status": "ok",
            "summary": f"{gpus or 'no nvidia-smi'}; jax {versions['jax']}, "
            f"torch {versions['torch']}",
            "versions": versions,
            "gpus": gpus,
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "mode": "cpu-smoke" if self.args.cpu_smoke else "full",
            "settings": dataclasses.asdict(self.settings),
        }

    def run_check(self, check: Check) -> None:
        budget = check.smoke_budget if self.args.cpu_smoke else check.budget
        names = check.records or (check.name,)
        now = time.monotonic()
        left = self.end - now
        if left < 0.5 * budget:
            self.drop(check)
            for name in names:
                self.emit(
                    {
                        "check": name,
                        "status": f"skipped: time limit ({left:.0f} s left of "
                        f"{self.settings.time_limit:.0f}, budget {budget:.0f} s)",
                        "budget_s": budget,
                    }
                )
            return
        deadline = min(now + 1.5 * budget, self.end)
        cpu_before = _children_cpu()
        if check.needs is not None and check.needs in self.by_check:
            self.prev_file(check, check.phases[0]).write_text(
                json.dumps(self.by_check[check.needs])
            )
        found: list[dict[str, Any]] = []
        error = None
        for i, phase in enumerate(check.phases):
            found, error = self.run_phase(check, phase, deadline)
            bad = [r for r in found if r.get("status") != "ok"]
            if error is not None or not found or bad:
                self.drop(check)  # a later phase has nothing to compare against
                break
            if i + 1 < len(check.phases):
                self.prev_file(check, check.phases[i + 1]).write_text(
                    json.dumps({r["check"]: r for r in found})
                )
        elapsed = time.monotonic() - now
        got = {r["check"]: r for r in found}
        self.by_check[check.name] = {}
        for name in names:
            record = got.get(name)
            if record is None:
                record = {
                    "check": name,
                    "status": "error",
                    "summary": error or "the check printed no result",
                    "error": error or "the check printed no result",
                }
            elif error is not None:
                record.setdefault("note", error)
            record["elapsed_s"] = round(elapsed, 1)
            # CPU seconds of this check's processes (its imports, which ran while the check
            # before it did, included; the prior's background compile too)
            record["cpu_s"] = round(_children_cpu() - cpu_before, 1)
            record["budget_s"] = budget
            if name.startswith("torch_lora:"):
                _compare_with_ours(record, self.by_name.get(name.replace("torch_", "train_")))
            self.by_check[check.name][name] = record
            self.emit(record)


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _age(runner: Runner) -> str:
    return f"{time.monotonic() - runner.start:.0f} s"


def _compare_with_ours(record: dict[str, Any], ours: dict[str, Any] | None) -> None:
    """Adds ours/torch at the same sequence length (ours: its fastest backend there)."""
    if record.get("status") != "ok" or not ours or ours.get("status") != "ok":
        return
    seq = record.get("seq")
    same = [
        r
        for r in (ours.get("backends") or {}).values()
        if isinstance(r, dict) and r.get("seq") == seq and r.get("tokens_per_s")
    ]
    if not same:
        record["ratio"] = None
        record["summary"] += f"; no run of ours at seq {seq} to compare"
        return
    best = max(same, key=lambda r: r["tokens_per_s"])
    record["ours_tokens_per_s"] = best["tokens_per_s"]
    record["ours_attention"] = best["attention"]
    record["ratio"] = round(best["tokens_per_s"] / record["tokens_per_s"], 3)
    if best.get("flops_per_step") and best.get("peak_flops"):
        record["mfu"] = round(best["flops_per_step"] / record["step_s"] / best["peak_flops"], 4)
    record["summary"] += f"; ours/torch {record['ratio']}x (ours {best['attention']})"


# ------------------------------------------------------------------------------- child


TORCH_PHASES = ("torch_train", "infer_torch")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(record: dict[str, Any]) -> None:
    print(RESULT + json.dumps(record, default=_json_default), flush=True)


def _json_default(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) < 600 else text[:600] + " ..."


def _error_record(name: str, err: BaseException) -> dict[str, Any]:
    """The JSON line of check `name` that raised `err`."""
    return {
        "check": name,
        "status": "error",
        "summary": _error_text(err)[:200],
        "error": _error_text(err),
    }


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return any(
        key in text
        for key in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemoryError")
    )


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def run_child(args: argparse.Namespace, s: Settings) -> int:
    check = {c.name: c for c in checks(s)}[args.check_name]
    names = check.records or (check.name,)
    fn = CHILDREN[args.child]

    def gate() -> dict[str, Any] | None:
        """Waits for the parent's "go" (imports done, the device untouched); returns
        the records of the check or phase this one builds on."""
        if args.wait_go:
            print(READY, flush=True)
            if not sys.stdin.readline():
                raise SystemExit(0)  # the run ended before this check's turn
        if args.prev and Path(args.prev).exists():
            return json.loads(Path(args.prev).read_text())
        return None

    try:
        fn(args, s, gate)
    except BaseException as err:
        log(traceback.format_exc())
        for name in names:
            report(_error_record(name, err))
        return 1
    return 0


def _import_train_modules() -> None:
    """What our train step imports (before the gate: no device is touched)."""
    import bench_train  # noqa: F401
    import flax.nnx  # noqa: F401

    import mllm_jax.foundation.mesh
    import mllm_jax.model
    import mllm_jax.model.sharding
    import mllm_jax.runs.state
    import mllm_jax.train.batches
    import mllm_jax.train.flops
    import mllm_jax.train.optim
    import mllm_jax.train.step  # noqa: F401


def _jax_setup(smoke: bool):
    import jax

    if not smoke and jax.default_backend() == "cpu":
        raise RuntimeError("no accelerator found by jax (backend cpu); use --cpu-smoke on a CPU")
    return jax


def _device_facts(jax) -> dict[str, Any]:
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind}


def _peak_memory_gb(jax) -> float | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 1e9, 2)


def model_config(shape: str, smoke: bool, layers: int, **runtime: Any):
    """Our Qwen2Config of a shape name ("1.5b", "7b") with `layers` layers."""
    from mllm_jax.model import preset
    from mllm_jax.model.config import Qwen2Config

    if smoke:
        base = dict(SMOKE_SHAPES[shape], rope_theta=1_000_000.0, max_position_embeddings=32768)
        return Qwen2Config(**{**base, "num_hidden_layers": layers, **runtime})
    return preset(PRESETS[shape], num_hidden_layers=layers, **runtime)


def full_config(shape: str, smoke: bool, **runtime: Any):
    from mllm_jax.model import preset

    if smoke:
        return model_config(shape, True, 2, **runtime)
    return preset(PRESETS[shape], **runtime)


def backend_unavailable(jax, backend: str) -> str | None:
    """Why an attention backend cannot run here (None: it can)."""
    platform = jax.default_backend()
    if backend == "cudnn" and platform != "gpu":
        return f"cudnn attention needs an NVIDIA GPU (jax backend: {platform})"
    if backend == "splash" and platform != "tpu":
        return f"splash attention is a TPU (Pallas Mosaic) kernel (jax backend: {platform})"
    return None


# --------------------------------------------------------------------------- attention


def packed_segments(seq: int, segments: int, seed: int):
    """i32[1, seq]: `segments` packed sequences of random lengths, then a padding tail
    (segment 0) of seq/16 tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pad = seq // 16
    cuts = np.sort(rng.choice(np.arange(1, seq - pad), segments - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [seq - pad]]))
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
    return ids.astype(np.int32)[None]


def child_attention(args, s: Settings, gate) -> None:
    """Forward + gradients of each backend against "xla" (see the module docstring).

    Measures, per case, max |a - b| of the hidden states (non-padding rows) and of each
    parameter gradient, also relative to the largest magnitude of b there.

    Pass rule for a backend B (cudnn, splash), given the float32 run F of the same
    weights: for the hidden states and every gradient leaf,
        max |B - F| <= attn_factor * max |X - F| + 2^-9 * max |F|     (X: bf16 xla)
    i.e. B is at most twice as far from float32 as XLA's bf16 is, plus half an ulp of
    bf16 at the largest value. bf16 keeps 8 significant bits (one rounding: up to 2^-9
    relative); two correct bf16 implementations differ in where they round (P cast to
    bf16, the order of f32 sums, online vs two-pass softmax), which is noise of the same
    size as XLA's own, not a multiple of it; a wrong mask (a token that sees another
    segment or a later token) moves hidden states by O(1) of their scale. The bound is
    measured, not guessed: on CPU at the 1.5B shape (2 layers, 1k tokens), bf16 XLA is
    0.011 (hidden) and 0.028 (worst gradient leaf, a norm scale: a sum over tokens that
    cancels) of the float32 scale away from float32; gradients sit further off than
    hidden states, and a fixed bound tight enough for the one is loose for the other.
    When the float32 run does not fit (or --attn-reference false), the fallback is
    max |B - X| <= attn_tol * max |X| (2^-4: about twice the worst bf16-vs-f32 gap
    measured). attention:xla itself passes when max |X - F| <= attn_tol * max |F|.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mllm_jax.model import init_model
    from mllm_jax.model.qwen2 import Qwen2ForCausalLM

    gate()
    jax = _jax_setup(args.cpu_smoke)
    facts = _device_facts(jax)
    t_start = time.monotonic()
    runtime = dict(
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        attention_query_chunk=s.attn_query_chunk,
        max_position_embeddings=max(32768, max(s.attn_seqs)),
    )
    base = model_config(s.attn_shape, args.cpu_smoke, s.attn_layers, **runtime)
    model = init_model(base, 0)
    params = nnx.split(model, nnx.Param)[1]
    del model
    f32 = jnp.float32

    def graph_of(config):
        abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
        return nnx.split(abstract, nnx.Param)[0]

    skipped = {b: backend_unavailable(jax, b) for b in ("cudnn", "splash")}
    compared = [b for b in ("cudnn", "splash") if skipped[b] is None]
    variants = {"xla": (graph_of(base), params)}
    for b in compared:
        variants[b] = (graph_of(base.replace(attention_backend=b)), params)
    if s.attn_reference:
        ref_config = base.replace(param_dtype="float32", compute_dtype="float32")
        variants["f32"] = (graph_of(ref_config), jax.tree.map(lambda x: x.astype(f32), params))

    def make_fn(gdef, packed: bool):
        def fn(p, ids, seg, cot):
            def loss(p):
                m = nnx.merge(gdef, p, copy=True)
                h = m(ids, None, seg if packed else None, return_hidden=True, remat=s.train_remat)
                return jnp.sum(h.astype(f32) * cot), h

            (_, h), g = jax.value_and_grad(loss, has_aux=True)(p)
            return h, g

        return jax.jit(fn)

    @jax.jit
    def leaf_stats(a, b):
        """Per leaf: (max |a - b|, max |b|) as f32 (NaN propagates)."""
        return jax.tree.map(
            lambda x, y: jnp.stack(
                [jnp.max(jnp.abs(x.astype(f32) - y.astype(f32))), jnp.max(jnp.abs(y.astype(f32)))]
            ),
            a,
            b,
        )

    def compare(out, ref, valid) -> dict[str, tuple[float, float]]:
        """{"hidden" or a gradient leaf's path: (max |a - b|, max |b|)} (valid rows)."""
        h, g = out
        hr, gr = ref
        keep = valid[..., None]
        stats = {"hidden": leaf_stats(jnp.where(keep, h, 0), jnp.where(keep, hr, 0))}
        flat, _ = jax.tree_util.tree_flatten_with_path(leaf_stats(g, gr))
        stats.update({jax.tree_util.keystr(path): pair for path, pair in flat})
        return {k: tuple(float(v) for v in np.asarray(pair)) for k, pair in stats.items()}

    # Compile every program first, side by side (XLA compiles one program per thread).
    cases = [(seq, mask) for seq in s.attn_seqs for mask in s.attn_masks]
    inputs, programs = {}, {}
    rng = np.random.default_rng(0)
    for seq, mask in cases:
        ids = jnp.asarray(rng.integers(0, base.vocab_size, (1, seq)), jnp.int32)
        seg_np = (
            packed_segments(seq, s.attn_segments, seq)
            if mask == "packed"
            else np.ones((1, seq), np.int32)
        )
        seg = jnp.asarray(seg_np)
        valid = seg > 0
        cot = jax.random.normal(jax.random.key(seq), (1, seq, base.hidden_size), f32)
        cot = jnp.where(valid[..., None], cot, 0.0)
        inputs[seq, mask] = (ids, seg, cot, valid)
        for name, (gdef, p) in variants.items():
            precision = (
                jax.default_matmul_precision("highest")
                if name == "f32"
                else contextlib.nullcontext()
            )
            with precision:
                lowered = make_fn(gdef, mask == "packed").lower(p, ids, seg, cot)
            programs[seq, mask, name] = lowered
    t0 = time.monotonic()
    compiled, compile_errors = {}, {}

    def compile_one(key):
        try:
            compiled[key] = programs[key].compile()
        except Exception as err:
            compile_errors[key] = err

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(len(programs), (os.cpu_count() or 2) - 1, 8))) as pool:
        list(pool.map(compile_one, list(programs)))
    compile_s = time.monotonic() - t0
    log(f"attention: {len(compiled)} programs compiled in {compile_s:.1f} s")
    temp_gb = {}  # XLA's scratch memory per program: what 32k tokens cost
    for key, program in compiled.items():
        with contextlib.suppress(Exception):
            temp_gb[key] = round(program.memory_analysis().temp_size_in_bytes / 1e9, 2)

    results: dict[str, list[dict[str, Any]]] = {b: [] for b in ("xla", *compared)}
    for seq, mask in cases:
        ids, seg, cot, valid = inputs[seq, mask]

        def run(name, key=(seq, mask), data=(ids, seg, cot)):
            key = (*key, name)
            if key in compile_errors:
                raise compile_errors[key]
            t = time.monotonic()
            out = compiled[key](variants[name][1], *data)
            jax.block_until_ready(out)
            return out, time.monotonic() - t

        case = {"seq": seq, "mask": mask}
        temps = {n: temp_gb.get((seq, mask, n)) for n in variants}
        try:
            xla, xla_s = run("xla")
        except Exception as err:
            message = ("OOM: " if is_oom(err) else "") + _error_text(err)
            for b in results:
                results[b].append({**case, "error": "xla: " + message})
            continue
        ref = xla_vs_ref = None
        if "f32" in variants:
            try:
                ref, ref_s = run("f32")
                xla_vs_ref = compare(xla, ref, valid)
                results["xla"].append(
                    {
                        **case,
                        **_fixed_verdict(xla_vs_ref, s.attn_tol),
                        "s": round(xla_s, 3),
                        "f32_s": round(ref_s, 3),
                        "temp_gb": temps["xla"],
                        "f32_temp_gb": temps["f32"],
                    }
                )
            except Exception as err:
                message = ("OOM: " if is_oom(err) else "") + _error_text(err)
                results["xla"].append({**case, "error": "f32 reference: " + message})
        for b in compared:
            try:
                out, secs = run(b)
                vs_xla = compare(out, xla, valid)
                if xla_vs_ref is not None:
                    verdict = _relative_verdict(
                        compare(out, ref, valid), xla_vs_ref, s.attn_factor, vs_xla
                    )
                else:
                    verdict = _fixed_verdict(vs_xla, s.attn_tol)
                results[b].append(
                    {
                        **case,
                        **verdict,
                        "s": round(secs, 3),
                        "xla_s": round(xla_s, 3),
                        "temp_gb": temps[b],
                        "xla_temp_gb": temps["xla"],
                    }
                )
                del out
            except Exception as err:
                message = ("OOM: " if is_oom(err) else "") + _error_text(err)
                results[b].append({**case, "error": message})
        del xla, ref
        gc.collect()

    common = {
        **facts,
        "shape": s.attn_shape,
        "layers": s.attn_layers,
        "dtype": "bfloat16",
        "remat": s.train_remat,
        "query_chunk": s.attn_query_chunk,
        "segments": s.attn_segments,
        "attn_tol": s.attn_tol,
        "attn_factor": s.attn_factor,
        "compile_s": round(compile_s, 1),
        "child_s": round(time.monotonic() - t_start, 1),
        "process_peak_memory_gb": _peak_memory_gb(jax),
    }
    for b in ("xla", "cudnn", "splash"):
        name = f"attention:{b}"
        if b != "xla" and skipped[b] is not None:
            report({"check": name, "status": f"skipped: {skipped[b]}", **facts})
            continue
        if b == "xla" and not s.attn_reference:
            report({"check": name, "status": "skipped: --attn-reference false", **facts})
            continue
        report({"check": name, **_attention_record(results[b], b), **common})


def _max_diffs(stats: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The reported numbers of one comparison: max abs diffs of the hidden states and
    over all gradients, and each relative to its scale (gradients: the worst leaf)."""

    def rel(pair):
        diff, scale = pair
        if not math.isfinite(diff):
            return math.nan
        return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)

    grads = {k: v for k, v in stats.items() if k != "hidden"}
    worst = max(grads, key=lambda k: (math.isnan(rel(grads[k])), rel(grads[k])))
    return {
        "out_max_abs_diff": _round(stats["hidden"][0]),
        "out_rel": _round(rel(stats["hidden"])),
        "grad_max_abs_diff": _round(max(d for d, _ in grads.values())),
        "grad_rel": _round(rel(grads[worst])),
        "grad_worst_leaf": worst,
    }


def _fixed_verdict(stats: dict[str, tuple[float, float]], tol: float) -> dict[str, Any]:
    """ok when every max |a - b| <= tol * max |b|."""
    numbers = _max_diffs(stats)
    ok = all(d <= tol * scale for d, scale in stats.values())  # False on NaN
    return {"ok": ok, "rule": f"|diff| <= {tol:g} * scale", **numbers}


def _relative_verdict(
    vs_ref: dict[str, tuple[float, float]],
    xla_vs_ref: dict[str, tuple[float, float]],
    factor: float,
    vs_xla: dict[str, tuple[float, float]],
) -> dict[str, Any]:
    """ok when B's distance to float32 is within factor x XLA's + 2^-9 of the scale."""
    ratios = {}
    for key, (diff, scale) in vs_ref.items():
        bound = factor * xla_vs_ref[key][0] + 2.0**-9 * scale
        ratios[key] = diff / bound if bound > 0 else (0.0 if diff == 0 else math.inf)
    worst = max(ratios, key=lambda k: (math.isnan(ratios[k]), ratios[k]))
    ok = all(r <= 1.0 for r in ratios.values())  # False on NaN
    return {
        "ok": ok,
        "rule": f"|B - f32| <= {factor:g} * |xla - f32| + 2^-9 * scale",
        **_max_diffs(vs_xla),
        "bound_ratio": _round(ratios[worst]),
        "bound_worst": worst,
        "vs_f32": _max_diffs(vs_ref),
        "xla_vs_f32": _max_diffs(xla_vs_ref),
    }


def _attention_record(cases: list[dict[str, Any]], backend: str) -> dict[str, Any]:
    against = "f32" if backend == "xla" else "xla"
    ran = [c for c in cases if "error" not in c]
    failed = [c for c in ran if not c["ok"]]
    errors = [c for c in cases if "error" in c]
    parts = []
    for c in cases:
        head = f"{c['seq']}/{c['mask']}: "
        if "error" in c:
            parts.append(head + c["error"][:80])
            continue
        text = f"out {c['out_max_abs_diff']:.2g} ({c['out_rel']:.2g} rel), grad {c['grad_rel']:.2g} rel"
        if "bound_ratio" in c:
            text += f", {c['bound_ratio']:.2f} of bound"
        parts.append(head + text + ("" if c["ok"] else " FAIL"))
    status = "fail" if failed else ("error" if errors else "ok")
    return {
        "status": status,
        "summary": f"{backend} vs {against}, max abs diff: " + "; ".join(parts),
        "against": against,
        "worst_out_rel": max((c["out_rel"] for c in ran), default=None),
        "worst_grad_rel": max((c["grad_rel"] for c in ran), default=None),
        "cases": cases,
    }


# ------------------------------------------------------------------------------- train


def child_train(args, s: Settings, gate) -> None:
    """Our LoRA step, each shape on its own (an error in one still reports the other)."""
    _import_train_modules()
    gate()
    jax = _jax_setup(args.cpu_smoke)
    for shape in s.train_shapes:
        name = f"train_lora:{shape}"
        try:
            report(_train_shape(jax, args, s, shape))
        except Exception as err:
            log(traceback.format_exc())
            report(_error_record(name, err))
        gc.collect()
        jax.clear_caches()


def _train_shape(jax, args, s: Settings, shape: str) -> dict[str, Any]:
    """Our LoRA step per attention backend, the longest sequence of the ladder that fits."""
    import bench_train

    from mllm_jax.train import flops

    config = model_config(shape, args.cpu_smoke, s.train_layers)
    full = full_config(shape, args.cpu_smoke)
    backends: dict[str, Any] = {}
    for backend in s.train_attention:
        why = backend_unavailable(jax, backend)
        if why is not None:
            backends[backend] = f"skipped: {why}"
            continue
        tried: dict[int, str] = {}
        for seq in s.train_seqs:
            bench = argparse.Namespace(
                mode="lora",
                dtype=s.train_dtype,
                attention=backend,
                query_chunk=s.train_query_chunk,
                preset=None,
                remat=s.train_remat,
            )
            batch = bench_train.make_batch(
                config.vocab_size, seq, 1, 0.0, 0, answer_tokens=s.train_answer
            )
            ours = None
            try:
                t0 = time.monotonic()
                ours = bench_train.Ours(bench, batch, config=config)
                ours.step()  # compile
                compile_s = time.monotonic() - t0
                ours.step()  # first compiled call
                times = [ours.step()[0] for _ in range(s.train_steps)]
            except Exception as err:
                if not is_oom(err):
                    raise
                tried[seq] = "OOM: " + _error_text(err)[:300]
                log(f"train {shape} {backend} seq {seq}: out of memory, trying a shorter one")
                del ours
                gc.collect()
                jax.clear_caches()
                continue
            step_s = statistics.median(times)
            full_flops = flops.step_flops(full, ours.stats, "lora")
            backends[backend] = {
                "attention": backend,
                "seq": seq,
                "tokens_per_s": round(seq / step_s, 1),
                "step_s": round(step_s, 4),
                "steps_s": [round(t, 4) for t in times],
                "compile_s": round(compile_s, 1),
                "flops_per_step": ours.flops,
                "peak_flops": ours.peak,
                "mfu": None if not ours.peak else round(ours.flops / step_s / ours.peak, 4),
                # The same MFU on all layers: the full model's FLOPs at this step's rate.
                "full_depth_tokens_per_s_est": round(seq / (step_s * full_flops / ours.flops), 1),
                "process_peak_memory_gb": _peak_memory_gb(jax),  # since the process began
                "longer_seqs_oom": tried or None,
            }
            del ours
            gc.collect()
            jax.clear_caches()
            break
        else:
            backends[backend] = {
                "attention": backend,
                "error": f"no sequence length of {list(s.train_seqs)} fits",
                "longer_seqs_oom": tried,
            }
    ran = [b for b in backends.values() if isinstance(b, dict) and "tokens_per_s" in b]
    errors = [k for k, b in backends.items() if isinstance(b, dict) and "error" in b]
    status = "error" if errors else ("ok" if ran else "skipped: no attention backend can run here")
    parts = []
    for backend, b in backends.items():
        if isinstance(b, str):
            parts.append(f"{backend} {b.split(' (')[0]}")
        elif "error" in b:
            parts.append(f"{backend} error: {b['error']}")
        else:
            mfu = "" if b["mfu"] is None else f", MFU {b['mfu']:.1%}"
            parts.append(f"{backend} {b['tokens_per_s']:.0f} tok/s at {b['seq']}{mfu}")
    return {
        "check": f"train_lora:{shape}",
        "status": status,
        "summary": f"{s.train_layers} of {full.num_hidden_layers} layers; " + "; ".join(parts),
        **_device_facts(jax),
        "shape": shape,
        "layers": s.train_layers,
        "full_layers": full.num_hidden_layers,
        "dtype": s.train_dtype,
        "remat": s.train_remat,
        "lora": "r=8 alpha=16 q,k,v,o,gate,up,down",
        "batch": 1,
        "answer_tokens": s.train_answer,
        "backends": backends,
    }


def _torch_missing(need_peft: bool) -> str | None:
    """Imports the torch side (before the gate); why it cannot run, or None."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        if need_peft:
            import bench_train  # noqa: F401
            import peft  # noqa: F401
    except ImportError as err:
        return f"torch/transformers/peft not importable ({_error_text(err)})"
    return None


def child_torch_train(args, s: Settings, gate) -> None:
    """transformers + peft on each shape, at ours' longest sequence (or the ladder)."""
    missing = _torch_missing(need_peft=True)
    prev = gate()
    if missing:
        for shape in s.train_shapes:
            report({"check": f"torch_lora:{shape}", "status": f"skipped: {missing}"})
        return
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if not args.cpu_smoke and device == "cpu":
        raise RuntimeError("torch sees no CUDA device; use --cpu-smoke on a CPU")
    for shape in s.train_shapes:
        name = f"torch_lora:{shape}"
        try:
            ours = (prev or {}).get(f"train_lora:{shape}")
            report(_torch_shape(torch, device, args, s, shape, ours))
        except Exception as err:
            log(traceback.format_exc())
            report(_error_record(name, err))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _torch_shape(torch, device, args, s: Settings, shape, ours) -> dict[str, Any]:
    import bench_train

    config = model_config(shape, args.cpu_smoke, s.train_layers)
    hf_shape = config.to_hf_dict()
    hf_shape.pop("dtype", None)
    seqs = list(s.train_seqs)
    ours_seqs = [
        b["seq"]
        for b in ((ours or {}).get("backends") or {}).values()
        if isinstance(b, dict) and "seq" in b
    ]
    if ours_seqs:  # start at ours' longest: the ratio needs the same length
        seqs = [q for q in seqs if q <= max(ours_seqs)] or seqs
    tried: dict[int, str] = {}
    for seq in seqs:
        bench = argparse.Namespace(mode="lora", dtype=s.train_torch_dtype, remat=s.train_remat)
        batch = bench_train.make_batch(
            config.vocab_size, seq, 1, 0.0, 0, answer_tokens=s.train_answer
        )
        model = None
        try:
            t0 = time.monotonic()
            model = bench_train.Torch(
                bench, batch, shape=hf_shape, device=device, answer_logits_only=True
            )
            build_s = time.monotonic() - t0
            model.step()  # warm-up (allocator, kernels)
            times = [model.step()[0] for _ in range(s.train_steps)]
        except Exception as err:
            if not is_oom(err):
                raise
            tried[seq] = "OOM: " + _error_text(err)[:300]
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        step_s = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
        tps = seq / step_s
        del model
        return {
            "check": f"torch_lora:{shape}",
            "status": "ok",
            "summary": f"{s.train_layers} layers, {tps:.0f} tok/s at {seq}",
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "shape": shape,
            "layers": s.train_layers,
            "seq": seq,
            "tokens_per_s": round(tps, 1),
            "step_s": round(step_s, 4),
            "steps_s": [round(t, 4) for t in times],
            "build_s": round(build_s, 1),
            "dtype": s.train_torch_dtype,
            "gradient_checkpointing": s.train_remat != "none",
            "impl": "transformers+peft (sdpa, logits_to_keep = answer tail, no compile)",
            "peak_memory_gb": None if peak is None else round(peak, 2),
            "longer_seqs_oom": tried or None,
            "versions": {
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "peft": _version("peft"),
            },
        }
    return {
        "check": f"torch_lora:{shape}",
        "status": "error",
        "summary": f"no sequence length of {seqs} fits",
        "longer_seqs_oom": tried,
    }


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------- prior


def child_prior(args, s: Settings, gate) -> None:
    """Compiles the programs the timed ranges need, waits for its turn, then times."""
    jax = _jax_setup(args.cpu_smoke)
    import numpy as np

    from mllm_jax.prior import PriorConfig, sample_tasks
    from mllm_jax.prior.sampler import compile_programs

    extra = json.loads(s.prior_config)
    if "widths" in extra:
        extra["widths"] = tuple(extra["widths"])
    config = PriorConfig(chunk_size=s.prior_chunk, task_block=s.prior_task_block, **extra)
    seed, start = 0, 1_000_000
    warm_start = start + s.prior_tasks
    t0 = time.monotonic()
    kinds = compile_programs(seed, start, s.prior_tasks + s.prior_warmup, config)
    compile_s = time.monotonic() - t0
    log(f"prior: {len(kinds)} programs compiled in {compile_s:.1f} s")
    gate()
    t0 = time.monotonic()
    sample_tasks(seed, warm_start, s.prior_warmup, config)
    warm_s = time.monotonic() - t0
    t0 = time.monotonic()
    batch = sample_tasks(seed, start, s.prior_tasks, config)
    seconds = time.monotonic() - t0
    rate = s.prior_tasks / seconds
    report(
        {
            "check": "prior",
            "status": "ok",
            "summary": f"{rate:.0f} tasks/s ({s.prior_tasks} tasks, chunk_size {s.prior_chunk}, "
            f"task_block {s.prior_task_block}; compile {compile_s:.0f} s in the background)",
            **_device_facts(jax),
            "tasks_per_s": round(rate, 1),
            "tasks": s.prior_tasks,
            "seconds": round(seconds, 2),
            "warmup_tasks": s.prior_warmup,
            "warmup_s": round(warm_s, 2),
            "compile_s": round(compile_s, 1),
            "programs": len(kinds),
            "valid_fraction": round(float(np.mean(batch.valid)), 4),
            "config": config.to_dict(),
        }
    )


# ------------------------------------------------------------------------------- infer


def child_infer(args, s: Settings, gate) -> None:
    """Ours: prefix-reuse label scoring; saves the model, prompt and probabilities for
    the torch phase."""
    import numpy as np
    import pandas as pd

    from mllm_jax.infer import RunSettings, answer_frame, build_chunked_prompt, from_model
    from mllm_jax.infer.runner import score_prompt
    from mllm_jax.model import init_model, save_hf

    gate()
    jax = _jax_setup(args.cpu_smoke)

    runtime = dict(
        param_dtype=s.infer_dtype,
        compute_dtype=s.infer_dtype,
        attention_query_chunk=128,
        max_position_embeddings=131072,
        initializer_range=s.infer_init_std,
    )
    if args.cpu_smoke:  # the real vocabulary: the prompts are real prompts
        runtime.update(vocab_size=151936)
    config = model_config(s.infer_shape, args.cpu_smoke, s.infer_layers, **runtime)
    t0 = time.monotonic()
    model = init_model(config, 0)
    loaded = from_model(model)
    rng = np.random.default_rng(0)
    shots = pd.DataFrame(rng.normal(size=(s.infer_shots, s.infer_features)))
    y = rng.integers(0, s.infer_classes, s.infer_shots)
    test = pd.DataFrame(rng.normal(size=(s.infer_queries, s.infer_features)))
    prompt = build_chunked_prompt(loaded.prompt_tokenizer, shots, y, test, chunk_size=s.infer_chunk)
    settings = RunSettings(s.infer_batch, s.infer_prefill_chunk, reuse_prefix=True)
    first = dataclasses.replace(prompt, queries=prompt.queries[:1], rows=prompt.rows[:1])
    score_prompt(loaded, first, s.infer_classes, settings)  # compiles every program
    compile_s = time.monotonic() - t0
    t0 = time.monotonic()
    log_probs = score_prompt(loaded, prompt, s.infer_classes, settings)
    seconds = time.monotonic() - t0
    out = Path(args.workdir) / "infer"
    out.mkdir(parents=True, exist_ok=True)
    save_hf(model, out / "model", overwrite=True)
    frame = answer_frame(loaded.prompt_tokenizer, max(len(r) for r in prompt.rows))
    np.savez(
        out / "prompt.npz",
        prefix=prompt.prefix,
        queries=np.concatenate(prompt.queries),
        query_lengths=np.array([len(q) for q in prompt.queries]),
        row_starts=np.array([r.start for r in prompt.rows]),
        row_stops=np.array([r.stop for r in prompt.rows]),
        frame_ids=frame.ids,
        frame_slots=frame.slots,
        digit_ids=np.asarray(loaded.prompt_tokenizer.digit_ids),
        log_probs=log_probs,
    )
    rows = prompt.rows[-1].stop
    report(
        {
            "check": "infer",
            "status": "ok",
            "summary": f"ours {rows / seconds:.1f} rows/s",
            **_device_facts(jax),
            "ours_rows_per_s": round(rows / seconds, 2),
            "ours_s": round(seconds, 3),
            "ours_compile_s": round(compile_s, 1),
            "rows": rows,
            "prefix_tokens": len(prompt.prefix),
            "query_tokens_mean": float(np.mean([len(q) for q in prompt.queries])),
            "chunks": len(prompt.queries),
            "shape": s.infer_shape,
            "layers": s.infer_layers,
            "dtype": s.infer_dtype,
            "init_std": s.infer_init_std,
            "shots": s.infer_shots,
            "features": s.infer_features,
            "classes": s.infer_classes,
            "chunk_size": s.infer_chunk,
            "batch_size": s.infer_batch,
            "process_peak_memory_gb": _peak_memory_gb(jax),
        }
    )


def child_infer_torch(args, s: Settings, gate) -> None:
    """transformers with its own KV cache of the prefix (deep-copied per chunk), the
    answer scored slot by slot with its own greedy labels, as ours."""
    import copy
    import inspect

    import numpy as np

    missing = _torch_missing(need_peft=False)
    prev = gate()
    if missing:  # ours' numbers stand; the comparison cannot run
        report({**prev["infer"], "status": f"skipped: {missing}"})
        return
    import torch
    from transformers import Qwen2ForCausalLM

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[s.infer_dtype]
    data = Path(args.workdir) / "infer"
    z = np.load(data / "prompt.npz")
    model = Qwen2ForCausalLM.from_pretrained(
        str(data / "model"), dtype=dtype, attn_implementation="sdpa"
    )
    model = model.to(device=device, dtype=dtype).eval()  # older transformers: torch_dtype
    k = s.infer_classes
    digits = torch.as_tensor(z["digit_ids"][:k], device=device)
    ids_list = np.split(z["queries"], np.cumsum(z["query_lengths"])[:-1])
    frame_ids, slots = z["frame_ids"], z["frame_slots"]
    starts, stops = z["row_starts"], z["row_stops"]

    def tensor(x):
        return torch.as_tensor(np.asarray(x, np.int64)[None], device=device)

    # transformers >= 5.2x names the cache `cache` (`past_key_values` before).
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

    def cache_of(out):
        return out.cache if getattr(out, "cache", None) is not None else out.past_key_values

    def label_log_probs(out):
        logits = out.logits[0, -1].float()
        return torch.log_softmax(logits[digits], dim=-1)

    def score(chunks: list[int]) -> np.ndarray:
        result = np.zeros((int(stops[chunks[-1]]), k), np.float32)
        with torch.no_grad():
            prefix = model(tensor(z["prefix"]), use_cache=True, logits_to_keep=1)
            for c in chunks:
                cache = copy.deepcopy(cache_of(prefix))
                out = model(
                    tensor(ids_list[c]), **{cache_kw: cache}, use_cache=True, logits_to_keep=1
                )
                rows = int(stops[c] - starts[c])
                pick = 0
                for r in range(rows):
                    if r:
                        step = [int(z["digit_ids"][pick])]
                        step += frame_ids[slots[r - 1] + 1 : slots[r]].tolist()
                        out = model(
                            tensor(step),
                            **{cache_kw: cache_of(out)},
                            use_cache=True,
                            logits_to_keep=1,
                        )
                    lp = label_log_probs(out)
                    pick = int(torch.argmax(lp))
                    result[starts[c] + r] = lp.cpu().numpy()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    t0 = time.monotonic()
    score([0])  # warm-up: the prefix and one chunk
    warm_s = time.monotonic() - t0
    t0 = time.monotonic()
    theirs = score(list(range(len(ids_list))))
    seconds = time.monotonic() - t0
    ours = z["log_probs"]
    # Rows compared: in each chunk, up to the first slot where the two greedy labels
    # differ (after it the two answers hold different tokens).
    compared = np.zeros(len(ours), bool)
    for a, b in zip(starts, stops, strict=True):
        same = np.argmax(ours[a:b], 1) == np.argmax(theirs[a:b], 1)
        first_diff = int(np.argmin(same)) if not same.all() else b - a - 1
        compared[a : a + first_diff + 1] = True
    p_ours, p_theirs = np.exp(ours), np.exp(theirs)
    diff = float(np.abs(p_ours - p_theirs)[compared].max())
    agree = float(np.mean(np.argmax(ours, 1) == np.argmax(theirs, 1)))
    spread = float(np.mean(p_ours.max(1) - p_ours.min(1)))
    rows = int(stops[-1])
    rate = rows / seconds
    prev = prev["infer"]
    ours_rate = prev["ours_rows_per_s"]
    ok = diff <= s.infer_tol
    record = dict(prev)
    record.update(
        {
            "status": "ok" if ok else "fail",
            "summary": f"label probabilities within {diff:.2g} of transformers' (tol "
            f"{s.infer_tol:g}, {compared.sum()} of {rows} rows); ours {ours_rate:.1f} vs "
            f"transformers {rate:.1f} rows/s = {ours_rate / rate:.2f}x",
            "torch_rows_per_s": round(rate, 2),
            "torch_s": round(seconds, 3),
            "torch_warmup_s": round(warm_s, 1),
            "ratio": round(ours_rate / rate, 3),
            "max_prob_diff": _round(diff),
            "tolerance": s.infer_tol,
            "rows_compared": int(compared.sum()),
            "greedy_label_agreement": round(agree, 4),
            "prob_spread_mean": _round(spread),
            "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch_impl": "transformers sdpa, prefix past_key_values deep-copied per chunk, "
            "one call per answer slot, batch 1",
        }
    )
    report(record)


CHILDREN = {
    "attention": child_attention,
    "train": child_train,
    "torch_train": child_torch_train,
    "prior": child_prior,
    "infer": child_infer,
    "infer_torch": child_infer_torch,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, settings = parse_args(argv)
    if args.list:
        for c in checks(settings):
            print(c.name, ", ".join(c.records))
        return 0
    if args.child:
        return run_child(args, settings)
    passthrough = []
    skip_next = False
    for i, a in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if a in ("--only", "--out"):
            skip_next = i + 1 < len(argv)
            continue
        if a.startswith(("--only=", "--out=")) or a == "--list":
            continue
        passthrough.append(a)
    return Runner(args, settings, passthrough).run()


if __name__ == "__main__":
    sys.exit(main())
