"""Tasks/s of our JAX prior and of the reference prior (tabicl 0.1.4), same settings, same run.

Both use every core: ours one single-device worker process pinned per core
(``CoreWorkers``; ``--processes 0``: one process with one JAX CPU device per core), the
reference ``n_jobs`` = cores joblib workers. Both are timed at steady state after one
warm-up batch: ours on fresh index ranges after its programs are compiled (compile time
reported separately), the reference after the batch that starts its workers.

The two are timed in alternating rounds (ours, then the reference, ``--rounds`` times),
so both see the same phases of a shared machine, whose speed here swings by 1.5x for
minutes at a time; timing one after the other let a single phase decide the ratio. The
headline ratio pools all rounds (total tasks over total seconds, each side); the
per-round ratios are printed too. Besides wall-clock tasks/s, both report tasks per
CPU-second (this process and its worker processes: ``cpu_ratio``). The last line
printed is the JSON result.

    .venv/bin/python tools/bench_prior.py --rounds 8 --tasks 4096 --ref-tasks 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_START = 1_000_000  # first task index timed (the warm-up batch uses the range after)


@dataclass
class _Tally:
    """Tasks, wall seconds and CPU seconds of one side, summed over rounds."""

    tasks: int = 0
    seconds: float = 0.0
    cpu: float = 0.0

    def time(self, work: Callable[[], object], tasks: int) -> float:
        """Runs ``work`` (``tasks`` tasks), adds it to the tally; returns its tasks/s."""
        t0, c0 = time.perf_counter(), _tree_cpu_seconds()
        work()
        seconds = time.perf_counter() - t0
        self.tasks += tasks
        self.seconds += seconds
        self.cpu += _tree_cpu_seconds() - c0
        return tasks / seconds

    @property
    def per_s(self) -> float:
        return self.tasks / self.seconds

    @property
    def per_cpu_s(self) -> float:
        return self.tasks / self.cpu


@contextlib.contextmanager
def _ours(args, config) -> Iterator[tuple[Callable, Callable, dict]]:
    """(compile(seed, start, count, config), sample_tasks(...), facts) of ours."""
    if args.processes:
        from mllm_jax.prior.workers import CoreWorkers

        with CoreWorkers(args.processes) as workers:
            facts = {"processes": args.processes, "devices": 1, "backend": "cpu"}
            yield workers.compile, workers.sample_tasks, facts
        return

    import jax

    from mllm_jax.prior import sample_tasks
    from mllm_jax.prior.sampler import compile_programs

    facts = {"processes": 1, "devices": len(jax.devices()), "backend": jax.default_backend()}
    yield compile_programs, sample_tasks, facts


def _reference(args, cores: int) -> Callable[[], object]:
    """The reference prior, its workers started; returns its get_batch."""
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
    return prior.get_batch


def _tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live descendants (either side's workers)."""
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


def _split(total: int, parts: int, unit: int = 1) -> int:
    """Units of ``unit`` per part so that ``parts`` parts hold at least ``total``."""
    return max(1, -(-total // (parts * unit)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="alternating timing rounds")
    parser.add_argument("--tasks", type=int, default=4096, help="tasks timed for ours, in all")
    parser.add_argument(
        "--ref-tasks", type=int, default=512, help="tasks timed for the reference, in all"
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
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} must be >= 1")

    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the device count was set")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cores}"
    from mllm_jax.prior import PriorConfig

    config = PriorConfig(rows=args.rows, max_features=args.max_features, **json.loads(args.config))
    per_round = _split(args.tasks, args.rounds)
    ref_batches = _split(args.ref_tasks, args.rounds, args.ref_batch)
    load_before = os.getloadavg()[0]
    ours, ref = _Tally(), _Tally()
    rounds = []
    with _ours(args, config) as (compile_programs, sample_tasks, facts):
        t0 = time.perf_counter()
        compile_programs(args.seed, _START, per_round * args.rounds, config)
        compile_s = time.perf_counter() - t0
        # Warm-up on another index range: the first batch of a process also pays the
        # operating system's first touch of its freshly mapped output memory (~0.5 s
        # for 1024 tasks here), which a long generation run pays once.
        sample_tasks(args.seed, _START + per_round * args.rounds, per_round, config)
        get_batch = None if args.skip_reference else _reference(args, args.cores)
        valid = []
        for r in range(args.rounds):
            start = _START + r * per_round
            ours_rate = ours.time(
                lambda start=start: valid.append(
                    sample_tasks(args.seed, start, per_round, config).valid.mean()
                ),
                per_round,
            )
            entry = {"ours": round(ours_rate, 1)}
            if get_batch is not None:
                ref_rate = ref.time(
                    lambda: [get_batch() for _ in range(ref_batches)],
                    ref_batches * args.ref_batch,
                )
                entry |= {"reference": round(ref_rate, 2), "ratio": round(ours_rate / ref_rate, 1)}
            rounds.append(entry)
            print(json.dumps({"round": r, **entry}), flush=True)

    ratios = [e["ratio"] for e in rounds if "ratio" in e]
    with_ref = get_batch is not None
    result = {
        "name": "prior_tasks_per_s",
        "ours": round(ours.per_s, 2),
        "reference": round(ref.per_s, 2) if with_ref else None,
        "unit": "tasks/s",
        "ratio": round(ours.per_s / ref.per_s, 1) if with_ref else None,
        "round_ratios": ratios,
        "round_ratio_median": statistics.median(ratios) if ratios else None,
        "ours_tasks_per_cpu_s": round(ours.per_cpu_s, 2),
        "reference_tasks_per_cpu_s": round(ref.per_cpu_s, 3) if with_ref else None,
        "cpu_ratio": round(ours.per_cpu_s / ref.per_cpu_s, 1) if with_ref else None,
        "ours_compile_s": round(compile_s, 1),
        "ours_tasks": ours.tasks,
        "reference_tasks": ref.tasks,
        "rounds": args.rounds,
        "rows": args.rows,
        "features": f"5-{args.max_features}",
        "max_classes": 10,
        "cores": args.cores,
        **facts,
        "valid_fraction": round(float(sum(valid) / len(valid)), 4),
        "config": config.to_dict(),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
