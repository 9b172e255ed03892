"""CPU milliseconds per task of each prior program kind (MLP width bucket, or tree).

Runs the compiled chunk programs alone (no host-side collection) in a one-device
process, after one warm-up pass, and keeps the best of ``--repeats`` passes per kind.
Pin it to one core for steady numbers. On a noisy shared machine, compare two checkouts
by running them at the same time, one per core, then swapped:

    taskset -c 0 .venv/bin/python tools/prior_kind_costs.py --tasks 1024
    PYTHONPATH=/path/to/other/checkout taskset -c 1 .venv/bin/python tools/prior_kind_costs.py

Set ``--malloc-keep`` to run with the malloc settings of ``CoreWorkers`` workers. The last
line printed is the JSON result: the mix-weighted mean and each kind's cost and count.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1024)
    parser.add_argument("--start", type=int, default=2_000_000, help="first task index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="{}", help="JSON of PriorConfig fields")
    parser.add_argument("--malloc-keep", action="store_true")
    args = parser.parse_args()

    from mllm_jax.prior.workers import _keep_freed_memory, _one_device_flags

    os.environ["XLA_FLAGS"] = _one_device_flags(os.environ.get("XLA_FLAGS", ""))
    if args.malloc_keep and not _keep_freed_memory():
        raise SystemExit("--malloc-keep needs glibc")
    import jax
    import numpy as np

    from mllm_jax.prior import PriorConfig, sampler

    config = PriorConfig.from_dict(PriorConfig().to_dict() | json.loads(args.config))
    devices = tuple(jax.devices())
    hp, streams, kinds = sampler._plan(args.seed, args.start, args.tasks, config)

    def run(kind, positions) -> None:
        parts = sampler.dispatch_kind(kind, positions, hp, streams, config, devices)
        jax.block_until_ready([outputs for _, outputs in parts])

    costs, counts, total = {}, {}, 0.0
    for kind in sorted(set(kinds)):
        positions = np.array([i for i, k in enumerate(kinds) if k == kind])
        run(kind, positions)  # compiles and warms up
        best = float("inf")
        for _ in range(args.repeats):
            c0 = time.process_time()
            run(kind, positions)
            best = min(best, time.process_time() - c0)
        name = f"{kind[0]}{kind[1] or ''}"
        costs[name] = round(1000 * best / len(positions), 3)
        counts[name] = len(positions)
        total += best
        print(json.dumps({"kind": name, "tasks": len(positions), "cpu_ms_per_task": costs[name]}))
    print(
        json.dumps(
            {
                "name": "prior_cpu_ms_per_task",
                "mean": round(1000 * total / args.tasks, 3),
                "per_kind": costs,
                "tasks_per_kind": counts,
                "tasks": args.tasks,
                "malloc_keep": args.malloc_keep,
            }
        )
    )


if __name__ == "__main__":
    main()
