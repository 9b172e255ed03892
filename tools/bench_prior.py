"""Tasks/s of our JAX prior and of the reference prior (tabicl 0.1.4), same settings, same run.

Both use every core: ours one single-device worker process pinned per core
(``CoreWorkers``; ``--processes 0``: one process with one JAX CPU device per core), the
reference ``n_jobs`` = cores joblib workers. Both are timed at steady state after one
warm-up batch: ours on a fresh index range after its programs are compiled (compile
time reported separately) and one batch on another range, the reference after the
batch that starts its workers. Besides wall-clock tasks/s, both report tasks per
CPU-second (this process and its worker processes), steadier than wall time on a shared
machine (``cpu_ratio``). The last line printed is the JSON result.

    .venv/bin/python tools/bench_prior.py --tasks 1024 --ref-tasks 480
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _ours(args, cores: int) -> dict:
    from mllm_jax.prior import PriorConfig

    config = PriorConfig(rows=args.rows, max_features=args.max_features, **json.loads(args.config))
    start = 1_000_000
    if args.processes:
        from mllm_jax.prior.workers import CoreWorkers

        with CoreWorkers(args.processes) as workers:
            result = _time_ours(args, config, start, workers.compile, workers.sample_tasks)
        return result | {"processes": args.processes, "devices": 1, "backend": "cpu"}

    import jax

    from mllm_jax.prior import sample_tasks
    from mllm_jax.prior.sampler import compile_programs

    result = _time_ours(args, config, start, compile_programs, sample_tasks)
    return result | {
        "processes": 1,
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
    }


def _time_ours(args, config, start: int, compile_programs, sample_tasks) -> dict:
    t0 = time.perf_counter()
    compile_programs(args.seed, start, args.tasks, config)
    compile_s = time.perf_counter() - t0
    # Warm-up on another index range: the first batch of a process also pays the
    # operating system's first touch of its freshly mapped output memory (~0.5 s for
    # 1024 tasks here), which a long generation run pays once.
    sample_tasks(args.seed, start + args.tasks, args.tasks, config)
    t0, c0 = time.perf_counter(), _tree_cpu_seconds()
    batch = sample_tasks(args.seed, start, args.tasks, config)
    seconds, cpu = time.perf_counter() - t0, _tree_cpu_seconds() - c0
    return {
        "tasks_per_s": args.tasks / seconds,
        "tasks_per_cpu_s": args.tasks / cpu,
        "compile_s": round(compile_s, 1),
        "valid_fraction": float(batch.valid.mean()),
        "config": config.to_dict(),
    }


def _reference(args, cores: int) -> dict:
    import numpy as np
    import torch
    from tabicl.prior.dataset import PriorDataset

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    prior = PriorDataset(
        batch_size=args.ref_batch,
        prior_type="mix_scm",
        min_features=5,
        max_features=args.max_features,
        max_classes=10,
        min_seq_len=args.rows,
        max_seq_len=args.rows + 1,
        n_jobs=cores,
    )
    prior.get_batch()  # starts the worker processes
    n_batches = max(1, args.ref_tasks // args.ref_batch)
    t0, c0 = time.perf_counter(), _tree_cpu_seconds()
    for _ in range(n_batches):
        prior.get_batch()
    seconds, cpu = time.perf_counter() - t0, _tree_cpu_seconds() - c0
    tasks = n_batches * args.ref_batch
    return {"tasks_per_s": tasks / seconds, "tasks_per_cpu_s": tasks / cpu, "tasks": tasks}


def _tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live descendants (the reference's workers)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1024, help="tasks timed for ours")
    parser.add_argument(
        "--ref-tasks",
        type=int,
        default=480,
        help="tasks timed for the reference (its rate over 96 tasks varied from 6 to 12/s)",
    )
    parser.add_argument("--ref-batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--max-features", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="ours: worker processes pinned one per core (default: --cores); 0: one process "
        "with one JAX device per core",
    )
    parser.add_argument("--config", default="{}", help="JSON of extra PriorConfig fields")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    if args.processes is None:
        args.processes = args.cores

    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the device count was set")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cores}"

    load_before = os.getloadavg()[0]
    ours = _ours(args, args.cores)
    print(json.dumps({"ours": ours}), flush=True)
    ref = None if args.skip_reference else _reference(args, args.cores)
    if ref:
        print(json.dumps({"reference": ref}), flush=True)
    result = {
        "name": "prior_tasks_per_s",
        "ours": round(ours["tasks_per_s"], 2),
        "reference": round(ref["tasks_per_s"], 2) if ref else None,
        "unit": "tasks/s",
        "ratio": round(ours["tasks_per_s"] / ref["tasks_per_s"], 1) if ref else None,
        "ours_tasks_per_cpu_s": round(ours["tasks_per_cpu_s"], 2),
        "reference_tasks_per_cpu_s": round(ref["tasks_per_cpu_s"], 3) if ref else None,
        "cpu_ratio": round(ours["tasks_per_cpu_s"] / ref["tasks_per_cpu_s"], 1) if ref else None,
        "ours_compile_s": ours["compile_s"],
        "ours_tasks": args.tasks,
        "reference_tasks": ref["tasks"] if ref else 0,
        "rows": args.rows,
        "features": f"5-{args.max_features}",
        "max_classes": 10,
        "cores": args.cores,
        "processes": ours["processes"],
        "devices": ours["devices"],
        "backend": ours["backend"],
        "valid_fraction": ours["valid_fraction"],
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
