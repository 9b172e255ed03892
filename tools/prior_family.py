"""One SCM family of our prior against the same family of the reference (tabicl 0.1.4),
with samples large enough to tell a KS distance of 0.08 from sampling noise.

In the mixed prior only ~30% of tasks are tree-SCM, so the per-family KS distances of
tools/prior_distribution.py rest on ~177 tasks a side, where two samples of one and the
same distribution already differ by ~0.09. This tool draws `--count` tasks of one family
on both sides (the reference live, `PriorDataset(prior_type="tree_scm" | "mlp_scm")`),
computes the nine statistics of `mllm_jax.prior.stats.task_statistics`, and prints per
statistic the KS distance, its alpha = 0.01 critical value and the noise floor: the
median KS distance between two random halves of the pooled samples (what an exact
replica would typically show at these sizes). `--set name=value` changes one
`PriorConfig` field of ours (e.g. `tree_candidates=256`). The last line is JSON.

    .venv/bin/python tools/prior_family.py --family tree --count 600 \\
        --reference-cache /tmp/tree_ref.json                      # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.stats as sps

from mllm_jax.prior import PriorConfig, sample_tasks
from mllm_jax.prior.sampler import compile_programs
from mllm_jax.prior.stats import STATISTICS, ks_critical_value, task_statistics

PRIOR_TYPES = {"tree": "tree_scm", "mlp": "mlp_scm"}


def reference_statistics(family: str, count: int, seed: int, rf: bool) -> dict[str, list]:
    """Statistics of `count` i.i.d. reference tasks of one family."""
    sys.path.insert(0, str(Path(__file__).parent))
    from make_prior_fixture import sample_reference

    columns: dict[str, list[float]] = {}
    started = time.perf_counter()
    tasks = sample_reference(count, seed, prior_type=PRIOR_TYPES[family])
    for i, (X, y, n_train, categorical, _) in enumerate(tasks):
        for name, value in task_statistics(X, y, n_train, categorical, rf=rf).items():
            columns.setdefault(name, []).append(value)
        if (i + 1) % 100 == 0:
            print(f"reference: {i + 1}/{count}, {time.perf_counter() - started:.0f}s", flush=True)
    return columns


def our_statistics(config: PriorConfig, count: int, seed: int, rf: bool) -> dict[str, list]:
    """Statistics of our first `count` valid tasks of `config`."""
    compile_programs(seed, 0, count, config)
    batch = sample_tasks(seed, 0, count, config)
    tasks = [t for t, ok in zip(batch.to_tasks(), batch.valid, strict=True) if ok]
    with ThreadPoolExecutor(2) as pool:  # forests release the GIL
        rows = list(
            pool.map(lambda t: task_statistics(t.X, t.y, t.n_train, t.categorical, rf=rf), tasks)
        )
    return {name: [row[name] for row in rows] for name in rows[0]}


def noise_floor(a: np.ndarray, b: np.ndarray, draws: int, seed: int) -> float:
    """Median KS distance between random splits of the pooled samples into sizes
    len(a) and len(b): the distance an exact replica shows at these sizes."""
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([a, b])
    out = []
    for _ in range(draws):
        perm = rng.permutation(len(pooled))
        out.append(sps.ks_2samp(pooled[perm[: len(a)]], pooled[perm[len(a) :]]).statistic)
    return float(np.median(out))


def parse_sets(items: list[str]) -> dict[str, object]:
    fields = {f.name: f for f in dataclasses.fields(PriorConfig)}
    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {item!r}: expected name=value with a PriorConfig field")
        out[name] = json.loads(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(PRIOR_TYPES), default="tree")
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rf", dest="rf", action="store_false", help="skip the forests")
    parser.add_argument("--set", action="append", default=[], help="PriorConfig field=value")
    parser.add_argument("--reference-cache", type=Path, help="reuse the reference's statistics")
    parser.add_argument("--draws", type=int, default=200, help="splits for the noise floor")
    args = parser.parse_args()

    started = time.perf_counter()
    key = {"family": args.family, "count": args.count, "seed": args.seed, "rf": args.rf}
    cached = None
    if args.reference_cache and args.reference_cache.exists():
        cached = json.loads(args.reference_cache.read_text())
        if cached.get("key") != key:
            raise SystemExit(f"{args.reference_cache}: made for {cached.get('key')}, not {key}")
    if cached is None:
        theirs = reference_statistics(args.family, args.count, args.seed, args.rf)
        if args.reference_cache:
            tmp = args.reference_cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "statistics": theirs}))
            tmp.replace(args.reference_cache)
    else:
        theirs = cached["statistics"]
    overrides = parse_sets(args.set)
    config = PriorConfig(tree_prob=1.0 if args.family == "tree" else 0.0, **overrides)
    ours = our_statistics(config, args.count, args.seed, args.rf)

    lines = [
        "| statistic | KS | crit. 0.01 | noise floor | mean ours | mean ref |",
        "|---|---|---|---|---|---|",
    ]
    result: dict[str, dict[str, float]] = {}
    for name in STATISTICS:
        if name not in ours or name not in theirs:
            continue
        a, b = np.asarray(ours[name]), np.asarray(theirs[name])
        ks = float(sps.ks_2samp(a, b).statistic)
        crit = ks_critical_value(len(a), len(b))
        floor = noise_floor(a, b, args.draws, args.seed)
        result[name] = {"ks": ks, "critical": crit, "noise_floor": floor}
        lines.append(
            f"| {name} | {ks:.3f} | {crit:.3f} | {floor:.3f} | {a.mean():.3f} | {b.mean():.3f} |"
        )
    print("\n".join(lines))
    record = {
        "name": "prior_family",
        "family": args.family,
        "ours_tasks": len(next(iter(ours.values()))),
        "reference_tasks": len(next(iter(theirs.values()))),
        "overrides": overrides,
        "statistics": result,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
