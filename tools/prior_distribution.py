"""Our prior against the reference prior (tabicl 0.1.4) on nine task statistics.

Generates `--count` tasks of the default `PriorConfig` (seed `--seed`), computes
`mllm_jax.prior.stats.task_statistics` for each and compares them with the committed
reference fixture (tests/fixtures/prior_reference_stats.json, 600 tabicl tasks) by the
two-sample Kolmogorov-Smirnov statistic, for all tasks and per SCM family, each beside
its critical value at alpha = 0.01 for the two sample sizes. Prints the markdown table
of docs/prior.md, then one JSON line.

    .venv/bin/python tools/prior_distribution.py --count 600     # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mllm_jax.prior.stats import ks_critical_value

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "prior_reference_stats.json"


def critical_value(n: int, m: int) -> float:
    """Asymptotic two-sample KS critical value at alpha = 0.01 (the test's)."""
    return ks_critical_value(n, m, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600, help="our tasks (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import scipy.stats as sps

    from mllm_jax.prior import PriorConfig, sample_tasks
    from mllm_jax.prior.sampler import compile_programs
    from mllm_jax.prior.stats import STATISTICS, task_statistics

    started = time.perf_counter()
    reference = json.loads(FIXTURE.read_text())
    config = PriorConfig()
    compile_programs(args.seed, 0, args.count, config)
    batch = sample_tasks(args.seed, 0, args.count, config)
    tasks = [t for t, ok in zip(batch.to_tasks(), batch.valid, strict=True) if ok]
    with ThreadPoolExecutor(2) as pool:  # forests release the GIL
        rows = list(pool.map(lambda t: task_statistics(t.X, t.y, t.n_train, t.categorical), tasks))
    ours = {name: np.array([row[name] for row in rows]) for name in STATISTICS}
    theirs = {name: np.array(reference["statistics"][name]) for name in STATISTICS}
    our_family = np.array([t.family for t in tasks])
    their_family = np.array(reference["info"]["family"])

    def ks(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        return float(sps.ks_2samp(a, b).statistic), critical_value(len(a), len(b))

    lines = [
        "| statistic | KS all (crit. 0.01) | mean ours | mean ref | KS MLP only (crit.) "
        "| KS tree only (crit.) |",
        "|---|---|---|---|---|---|",
    ]
    result: dict[str, dict[str, float]] = {}
    for name in STATISTICS:
        all_ks, all_crit = ks(ours[name], theirs[name])
        mlp_ks, mlp_crit = ks(ours[name][our_family == "mlp"], theirs[name][their_family == "mlp"])
        tree_ks, tree_crit = ks(
            ours[name][our_family == "tree"], theirs[name][their_family == "tree"]
        )
        result[name] = {"ks": all_ks, "critical": all_crit, "ks_mlp": mlp_ks, "ks_tree": tree_ks}
        lines.append(
            f"| {name} | {all_ks:.3f} ({all_crit:.3f}) | {ours[name].mean():.3f} | "
            f"{theirs[name].mean():.3f} | {mlp_ks:.3f} ({mlp_crit:.3f}) | "
            f"{tree_ks:.3f} ({tree_crit:.3f}) |"
        )
    print("\n".join(lines))
    shares = {
        "ours": float((our_family == "tree").mean()),
        "reference": float((their_family == "tree").mean()),
    }
    print(f"tree share: ours {shares['ours']:.3f}, reference {shares['reference']:.3f}; "
          f"{len(tasks)} of {args.count} tasks valid")  # fmt: skip
    print(
        json.dumps(
            {
                "name": "prior_distribution",
                "count": args.count,
                "valid": len(tasks),
                "tree_share": shares,
                "statistics": result,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
