"""Benchmarks and calibration of the random-forest filters (docs/filtering.md).

    pool        filter pool tasks/s vs plain scikit-learn forests with scikit-learn's own
                parallelism (n_jobs = cores) on the same pre-generated tasks; the serial
                scikit-learn loop and our filter in one process as ablations, plus
                scaling efficiency (JSON line last)
    forest      accept/reject agreement and speed of candidate forests vs a large forest
    thresholds  metric distributions on prior tasks vs the same tasks with permuted labels
    accept      acceptance rate, rejections by reason, consensus keep-rate (defaults)
    e2e         generate + filter end to end (needs mllm_jax.prior)

Tasks come from our prior (``mllm_jax.prior``) when it is installed, else from the
reference prior (tabicl 0.1.4, i.i.d. draws); ``--source`` picks one and ``--cache``
keeps them in an .npz so repeated runs filter the same tasks.

    .venv/bin/python tools/bench_filter.py pool              # 40 tabicl tasks, 3 repeats
    .venv/bin/python tools/bench_filter.py pool --no-ablations   # pool vs scikit-learn only
    .venv/bin/python tools/bench_filter.py pool --source prior --cache /tmp/ours.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from mllm_jax.filtering import FilterConfig, FilterPool, apply_filters
from mllm_jax.filtering.pool import default_workers
from mllm_jax.foundation.tasks import Task

# ----------------------------------------------------------------------------- tasks


def _reference_prior_tasks(count: int, seed: int) -> list[Task]:
    """i.i.d. tasks of the reference prior (tabicl 0.1.4) at MachineLearningLM's settings."""
    import torch
    from tabicl.prior.dataset import PriorDataset

    torch.manual_seed(seed)
    np.random.seed(seed)  # the reference draws from numpy's global generator
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    priors = {
        family: PriorDataset(
            batch_size=1,
            batch_size_per_gp=1,
            min_features=5,
            max_features=50,
            max_classes=10,
            min_seq_len=1024,
            max_seq_len=1025,
            prior_type=f"{family}_scm",
            n_jobs=1,
        )
        for family in ("mlp", "tree")
    }
    tasks = []
    for index in _progress(range(count), "reference prior"):
        family = "mlp" if rng.random() < 0.7 else "tree"
        X, y, d, _, train_size = priors[family].get_batch()
        n_features = int(d[0])
        labels = y[0].numpy().astype(np.int32)
        tasks.append(
            Task(
                X=X[0, :, :n_features].numpy().astype(np.float32),
                y=labels,
                n_classes=int(np.unique(labels).size),
                n_train=int(train_size[0]),
                categorical=np.zeros(n_features, bool),  # not reported by the reference
                family=family,
                seed=seed,
                index=index,
            )
        )
    return tasks


def _our_prior_tasks(count: int, seed: int) -> list[Task]:
    from mllm_jax.prior import sample_tasks

    return list(sample_tasks(seed, 0, count, None).to_tasks())


def _save_tasks(tasks: list[Task], path: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, task in enumerate(tasks):
        arrays[f"X{i}"], arrays[f"y{i}"], arrays[f"c{i}"] = task.X, task.y, task.categorical
        arrays[f"m{i}"] = np.array(
            [task.n_classes, task.n_train, task.family == "tree", task.seed, task.index]
        )
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez(tmp, n=len(tasks), **arrays)
    os.replace(tmp, path)


def _load_tasks(path: Path) -> list[Task]:
    with np.load(path) as z:
        tasks = []
        for i in range(int(z["n"])):
            n_classes, n_train, tree, seed, index = (int(v) for v in z[f"m{i}"])
            tasks.append(
                Task(
                    z[f"X{i}"],
                    z[f"y{i}"],
                    n_classes,
                    n_train,
                    z[f"c{i}"],
                    "tree" if tree else "mlp",
                    seed,
                    index,
                )
            )
    return tasks


def load_tasks(args: argparse.Namespace) -> tuple[list[Task], str]:
    source = args.source
    if source == "auto":
        try:
            from mllm_jax.prior import sample_tasks  # noqa: F401

            source = "prior"
        except ImportError:
            source = "tabicl"
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        tasks = _load_tasks(cache)
        if len(tasks) >= args.tasks:
            return tasks[: args.tasks], f"{source} (cached {cache})"
    make = _our_prior_tasks if source == "prior" else _reference_prior_tasks
    tasks = make(args.tasks, args.seed)
    if cache is not None:
        _save_tasks(tasks, cache)
    return tasks, source


# ----------------------------------------------------------------------------- helpers


def _progress(items: Iterable, label: str, total: int | None = None) -> Iterable:
    from rich.progress import Progress

    with Progress(transient=True, console=_stderr_console()) as progress:
        task = progress.add_task(label, total=total if total is not None else len(items))
        for item in items:
            yield item
            progress.advance(task)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _log(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _settings(args: argparse.Namespace, source: str, config: FilterConfig) -> dict:
    return {
        "tasks": args.tasks,
        "source": source,
        "workers": args.workers,
        "forest": {
            "n_estimators": config.n_estimators,
            "max_depth": config.max_depth,
            "max_features": config.max_features,
        },
        "consensus": config.consensus,
        "consensus_folds": config.consensus_folds,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
    }


def _pool_results(pool: FilterPool, tasks: Iterable, total: int | None = None) -> list:
    total = len(tasks) if total is None else total
    return [item.result for item in _progress(pool.imap(tasks), "filtering", total)]


# ----------------------------------------------------------------------------- pool


def reference_filter(task: Task, config: FilterConfig, n_jobs: int = 1) -> bool:
    """The plain way: a scikit-learn forest and scikit-learn's metrics, one task at a time.

    Same forest settings and acceptance rules as ours; consensus with
    ``cross_val_predict`` over a shuffled ``StratifiedKFold``. ``n_jobs`` is the forest's
    (scikit-learn fits and predicts its trees in that many threads); the forests, and so
    the decisions, do not depend on it (``random_state`` fixes every tree's seed).
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    def forest() -> RandomForestClassifier:
        return RandomForestClassifier(
            n_estimators=config.n_estimators,
            max_depth=config.max_depth,
            max_features=config.max_features,
            min_samples_leaf=config.min_samples_leaf,
            n_jobs=n_jobs,
            random_state=0,
        )

    X_train, y_train, X_test, y_test = task.split()
    y_pred = forest().fit(X_train, y_train).predict(X_test)
    shares = np.unique(y_pred, return_counts=True)[1] / y_pred.size
    accepted = (
        shares.size >= config.min_predicted_classes
        and shares.max() <= config.max_predicted_share
        and cohen_kappa_score(y_test, y_pred) >= config.min_kappa
        and balanced_accuracy_score(y_test, y_pred)
        >= 1 / np.unique(y_test).size + config.balanced_accuracy_margin
    )
    if accepted and config.consensus:
        with warnings.catch_warnings():  # classes smaller than the fold count
            warnings.simplefilter("ignore")
            folds = StratifiedKFold(config.consensus_folds, shuffle=True, random_state=0)
            oof = cross_val_predict(forest(), task.X, task.y, cv=folds)
        _ = oof == task.y
    return bool(accepted)


def _timed(fn: Callable[[], list]) -> tuple[list, float, float]:
    """(fn's result, wall seconds, this process's CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _span(values: list[float]) -> list[float]:
    return [round(min(values), 3), round(max(values), 3)]


def _schedstat(pids: set[int]) -> dict[int, tuple[int, int]]:
    """Per process: (ns spent running, ns spent runnable but waiting for a core)."""
    stats = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                run, wait, _ = (int(v) for v in f.read().split())
        except (OSError, ValueError):
            continue
        stats[pid] = (run, wait)
    return stats


def bench_pool(args: argparse.Namespace) -> None:
    """Pool vs scikit-learn's own parallelism, interleaved ``--repeats`` times.

    The peer (``reference``) is what a user would otherwise run: the plain scikit-learn
    filter (``reference_filter``) with ``n_jobs`` = ``--reference-jobs`` (default: the
    cores), one task after another. Two ablations run beside it on the same tasks: our
    filter in one process (``single_process``, for the pool's scaling efficiency) and the
    plain filter single-threaded (``ablation_serial_loop``). The plain filter's decisions
    with and without threads must be identical (same seeds; checked, else the run fails).

    Wall-clock rates give the headline numbers. Because the machine may be shared, CPU
    accounting is reported too: ``busy_fraction`` = worker CPU / (workers x wall), i.e.
    how much of the cores the workers actually got, and ``cpu_scaling_efficiency`` = CPU
    per task in one process / (worker + parent CPU per task in the pool), i.e. the share
    of the pool's CPU that is filtering work rather than hand-off overhead.
    ``ratio_cpu`` = the peer's CPU seconds per task (all its threads) / the pool's
    (workers + parent); ``reference_busy_fraction`` = the peer's CPU / (n_jobs x wall),
    how much of its cores scikit-learn's threads kept busy.

    ``runnable_fraction`` (Linux only; from the second repeat on) = the share of the wall
    time each worker was running or waiting for a core, from /proc/PID/schedstat; the rest
    it slept, i.e. had no task. With a free core per worker, runnable time becomes running
    time, so ``projected_scaling_efficiency`` = runnable_fraction x cpu_scaling_efficiency
    estimates the efficiency on an idle machine. It is an estimate, not a measurement.
    """
    started = time.perf_counter()
    tasks, source = load_tasks(args)
    task_seconds = time.perf_counter() - started
    n = len(tasks)
    config = FilterConfig(consensus=args.consensus)
    workers, jobs = args.workers, args.reference_jobs
    runs: dict[str, list[dict]] = {"pool": [], "single": [], "serial": [], "reference": []}
    runnable: list[float] = []
    pids: set[int] = set()
    with FilterPool(config, workers=workers) as pool:
        pool.warm_up()
        reference_filter(tasks[0], config, n_jobs=jobs)  # imports, thread pool start
        for repeat in range(args.repeats):
            before = _schedstat(pids)
            items, wall, parent_cpu = _timed(lambda: list(pool.imap(_progress(tasks, "pool"))))
            after = _schedstat(pids)
            shares = [
                (after[p][0] + after[p][1] - before[p][0] - before[p][1]) / 1e9 / wall
                for p in before
                if p in after
            ]
            if len(shares) == workers:
                runnable.append(statistics.mean(shares))
            pids = {item.worker_pid for item in items}
            ours = [item.result for item in items]
            worker_cpu = sum(r.cpu_seconds for r in ours)
            runs["pool"].append(
                {
                    "rate": n / wall,
                    "cpu": (worker_cpu + parent_cpu) / n,
                    "worker_cpu": worker_cpu,
                    "parent_cpu": parent_cpu,
                    "wall": wall,
                }
            )
            if args.ablations:
                _, wall, cpu = _timed(
                    lambda: [apply_filters(t, config) for t in _progress(tasks, "one process")]
                )
                runs["single"].append({"rate": n / wall, "cpu": cpu / n})
                serial, wall, cpu = _timed(
                    lambda: [reference_filter(t, config) for t in _progress(tasks, "serial loop")]
                )
                runs["serial"].append({"rate": n / wall, "cpu": cpu / n})
            reference, wall, cpu = _timed(
                lambda: [
                    reference_filter(t, config, n_jobs=jobs)
                    for t in _progress(tasks, f"scikit-learn n_jobs={jobs}")
                ]
            )
            runs["reference"].append({"rate": n / wall, "cpu": cpu / n, "wall": wall})
            if args.ablations and serial != reference:
                raise RuntimeError(
                    f"scikit-learn with n_jobs={jobs} decided differently from n_jobs=1 on "
                    f"{sum(a != b for a, b in zip(serial, reference, strict=True))} tasks"
                )
            agreement = float(
                np.mean([r.accepted == a for r, a in zip(ours, reference, strict=True)])
            )
            _log({"repeat": repeat, **{k: round(v[-1]["rate"], 3) for k, v in runs.items() if v}})

    def rates(name: str) -> list[float]:
        return [run["rate"] for run in runs[name]]

    def median(name: str, key: str = "rate") -> float:
        return statistics.median(run[key] for run in runs[name])

    busy = [p["worker_cpu"] / (workers * p["wall"]) for p in runs["pool"]]
    parent_share = [p["parent_cpu"] / (p["worker_cpu"] + p["parent_cpu"]) for p in runs["pool"]]
    reference_busy = [r["cpu"] * n / (jobs * r["wall"]) for r in runs["reference"]]
    cpu_ratio = [r["cpu"] / p["cpu"] for p, r in zip(runs["pool"], runs["reference"], strict=True)]
    pool_rate, reference_rate = median("pool"), median("reference")
    record: dict = {
        "name": "filter_pool",
        "ours": round(pool_rate, 3),
        "reference": round(reference_rate, 3),
        "unit": "tasks/s",
        "ratio": round(pool_rate / reference_rate, 3),
        "ratio_cpu": round(statistics.median(cpu_ratio), 3),
        "reference_impl": f"scikit-learn {_sklearn_version()} RandomForestClassifier "
        f"n_jobs={jobs}, one task after another",
        "reference_jobs": jobs,
        "pool_range": _span(rates("pool")),
        "reference_range": _span(rates("reference")),
        "busy_fraction": round(statistics.median(busy), 3),
        "reference_busy_fraction": round(statistics.median(reference_busy), 3),
        "parent_cpu_share": round(statistics.median(parent_share), 4),
        "runnable_fraction": round(statistics.median(runnable), 3) if runnable else None,
    }
    if args.ablations:
        efficiency = [
            p["rate"] / (workers * s["rate"])
            for p, s in zip(runs["pool"], runs["single"], strict=True)
        ]
        cpu_efficiency = [
            s["cpu"] / p["cpu"] for p, s in zip(runs["pool"], runs["single"], strict=True)
        ]
        record.update(
            {
                # Ablation: the same plain filter single-threaded (not a peer: nobody
                # would leave scikit-learn's n_jobs at 1 on a multi-core machine).
                "ablation_serial_loop": {
                    "rate": round(median("serial"), 3),
                    "range": _span(rates("serial")),
                    "ratio": round(pool_rate / median("serial"), 3),
                    "reference_speedup": round(reference_rate / median("serial"), 3),
                },
                "scaling_efficiency": round(statistics.median(efficiency), 3),
                "scaling_efficiency_range": _span(efficiency),
                "single_process": round(median("single"), 3),
                "single_process_range": _span(rates("single")),
                "cpu_scaling_efficiency": round(statistics.median(cpu_efficiency), 3),
                "projected_scaling_efficiency": (
                    round(statistics.median(runnable) * statistics.median(cpu_efficiency), 3)
                    if runnable
                    else None
                ),
            }
        )
    record.update(
        {
            "cpu_seconds_per_task": {k: round(median(k, "cpu"), 4) for k, v in runs.items() if v},
            "decision_agreement_with_reference": agreement,
            "reference_decisions_equal_serial": (serial == reference) if args.ablations else None,
            "repeats": args.repeats,
            "task_generation_seconds": round(task_seconds, 1),
            **_settings(args, source, config),
        }
    )
    _log(record)


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


# ----------------------------------------------------------------------------- forest


def _run(tasks: list[Task], config: FilterConfig, workers: int) -> list:
    with FilterPool(config, workers=workers) as pool:
        return _pool_results(pool, tasks)


FOREST_CANDIDATES = (
    {"n_estimators": 10},
    {"n_estimators": 20},
    {"n_estimators": 30},
    {"n_estimators": 30, "consensus_folds": 3},
    {"n_estimators": 30, "max_depth": 12},
    {"n_estimators": 30, "consensus_method": "oob"},
    {"n_estimators": 50},
    {"n_estimators": 100},
    {"n_estimators": 100, "consensus_method": "oob"},
    {"n_estimators": 200, "seed": 1},  # the reference itself, other seed: the noise floor
)


def bench_forest(args: argparse.Namespace) -> None:
    """Candidate forests vs a large one: same decisions and masks? how much cheaper?

    Cost is the workers' CPU seconds per task (wall time is also reported, but on a
    shared machine it mostly measures the neighbours).
    """
    tasks, source = load_tasks(args)
    base = FilterConfig(consensus=True)
    reference = dataclasses.replace(base, n_estimators=args.reference_trees)
    ref = _run(tasks, reference, args.workers)
    ref_cpu = statistics.mean(r.cpu_seconds for r in ref)
    ref_accept = np.array([r.accepted for r in ref])
    summary = []
    candidates = json.loads(args.candidates) if args.candidates else FOREST_CANDIDATES
    for overrides in candidates:
        config = dataclasses.replace(base, **overrides)
        results = _run(tasks, config, args.workers)
        accept = np.array([r.accepted for r in results])
        both = [
            (r.consensus, q.consensus)
            for r, q in zip(results, ref, strict=True)
            if r.consensus is not None and q.consensus is not None
        ]
        kappa_diff = [
            abs(r.metrics.kappa - q.metrics.kappa)
            for r, q in zip(results, ref, strict=True)
            if r.metrics is not None and q.metrics is not None
        ]
        cpu = statistics.mean(r.cpu_seconds for r in results)
        record = {
            **overrides,
            "accept_rate": float(accept.mean()),
            "decision_agreement": float(np.mean(accept == ref_accept)),
            "accepted_only_here": int((accept & ~ref_accept).sum()),
            "rejected_only_here": int((~accept & ref_accept).sum()),
            "kappa_mean_abs_diff": round(float(np.mean(kappa_diff)), 4),
            "consensus_row_agreement": round(float(np.mean([np.mean(a == b) for a, b in both])), 4),
            "consensus_keep_rate": round(float(np.mean([a.mean() for a, _ in both])), 4),
            "cpu_seconds_per_task": round(cpu, 4),
            "wall_seconds_per_task": round(statistics.mean(r.seconds for r in results), 4),
            "cpu_speedup_vs_reference": round(ref_cpu / cpu, 2),
        }
        _log(record)
        summary.append(record)
    _log(
        {
            "name": "filter_forest_study",
            "reference_trees": args.reference_trees,
            "reference_accept_rate": float(ref_accept.mean()),
            "reference_cpu_seconds_per_task": round(ref_cpu, 4),
            "reference_consensus_keep_rate": float(
                np.mean([r.consensus.mean() for r in ref if r.consensus is not None])
            ),
            "candidates": summary,
            **_settings(args, source, base),
        }
    )


# ----------------------------------------------------------------------------- thresholds


def _quantiles(values: list[float]) -> dict[str, float]:
    qs = (50, 90, 95, 99, 99.5, 100)
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in qs}


def _permuted(task: Task, draw: int) -> Task:
    """Same features and label counts, labels shuffled over all rows: nothing to learn."""
    rng = np.random.default_rng([task.seed, task.index, draw])
    return dataclasses.replace(task, y=rng.permutation(task.y), index=task.index + (draw << 32))


def bench_thresholds(args: argparse.Namespace) -> None:
    """Where do real tasks and label-permuted (null) tasks fall on each metric?"""
    tasks, source = load_tasks(args)
    # Margins off: collect every metric, decide afterwards.
    config = FilterConfig(min_kappa=-1.0, balanced_accuracy_margin=-1.0, max_predicted_share=1.0)
    real = [r.metrics for r in _run(tasks, config, args.workers) if r.metrics is not None]
    null_tasks = [_permuted(t, draw) for draw in range(1, args.permutations + 1) for t in tasks]
    null = [r.metrics for r in _run(null_tasks, config, args.workers) if r.metrics is not None]

    def describe(metrics: list) -> dict:
        return {
            "kappa": _quantiles([m.kappa for m in metrics]),
            "balanced_accuracy_over_chance": _quantiles(
                [m.balanced_accuracy - m.chance_balanced_accuracy for m in metrics]
            ),
            "max_predicted_share": _quantiles([m.max_predicted_share for m in metrics]),
            "single_predicted_class": float(np.mean([m.n_predicted_classes < 2 for m in metrics])),
        }

    def accept_rate(metrics: list, kappa: float, margin: float, share: float) -> float:
        return float(
            np.mean(
                [
                    m.n_predicted_classes >= 2
                    and m.max_predicted_share <= share
                    and m.kappa >= kappa
                    and m.balanced_accuracy >= m.chance_balanced_accuracy + margin
                    for m in metrics
                ]
            )
        )

    grid = []
    for kappa in (0.05, 0.1, 0.15, 0.2, 0.3):
        for margin in (0.0, 0.05, 0.1):
            for share in (0.9, 0.95, 0.99):
                grid.append(
                    {
                        "min_kappa": kappa,
                        "balanced_accuracy_margin": margin,
                        "max_predicted_share": share,
                        "real_accept_rate": accept_rate(real, kappa, margin, share),
                        "null_accept_rate": accept_rate(null, kappa, margin, share),
                    }
                )
    _log(
        {
            "name": "filter_threshold_study",
            "real": describe(real),
            "null": describe(null),
            "null_tasks": len(null),
            "grid": grid,
            **_settings(args, source, config),
        }
    )


# ----------------------------------------------------------------------------- accept


def bench_accept(args: argparse.Namespace) -> None:
    """Acceptance rate, rejections by reason and consensus keep-rate with the defaults."""
    from collections import Counter

    from mllm_jax.filtering.run import filter_into

    tasks, source = load_tasks(args)
    config = FilterConfig(consensus=args.consensus)
    families: dict[str, Counter] = {}
    kept: list[Task] = []
    summary = filter_into(tasks, kept.append, config, workers=args.workers, total=len(tasks))
    for task in tasks:
        families.setdefault(task.family, Counter())["seen"] += 1
    for task in kept:
        families[task.family]["accepted"] += 1
    by_family = {
        name: {"tasks": c["seen"], "acceptance_rate": round(c["accepted"] / c["seen"], 4)}
        for name, c in sorted(families.items())
    }
    _log(
        {
            "name": "filter_acceptance",
            **{k: v for k, v in summary.items() if k != "config"},
            "by_family": by_family,
            **_settings(args, source, config),
        }
    )


# ----------------------------------------------------------------------------- e2e


def bench_e2e(args: argparse.Namespace) -> None:
    """The generator feeding the pool vs the pool alone on the same (pre-generated) tasks.

    Both filter the tasks of seed ``--seed`` (decisions must be equal). CPU accounting
    shows what the generator and the hand-off cost: ``generator_cpu_share`` = the main
    process's CPU (prior + pulling results) / all CPU of the end-to-end run.
    """
    from mllm_jax.prior import iter_task_batches

    config = FilterConfig(consensus=args.consensus)

    def batches():
        return iter_task_batches(args.seed, 0, args.tasks, None, args.batch_size)

    started = time.perf_counter()
    tasks = [t for b in batches() for t in b.to_tasks()]  # also compiles the prior
    first_generation = time.perf_counter() - started
    with FilterPool(config, workers=args.workers) as pool:
        pool.warm_up()
        alone, alone_wall, alone_parent = _timed(
            lambda: [i.result for i in _progress(pool.imap(tasks), "pool alone", len(tasks))]
        )
        e2e, e2e_wall, e2e_parent = _timed(
            lambda: [i.result for i in _progress(pool.imap(batches()), "e2e", len(tasks))]
        )
    _, generate_wall, generate_cpu = _timed(lambda: [b.to_tasks() for b in batches()])
    if [r.accepted for r in alone] != [r.accepted for r in e2e]:
        raise RuntimeError("end-to-end decisions differ from the pool's on the same tasks")
    alone_workers = sum(r.cpu_seconds for r in alone)
    e2e_workers = sum(r.cpu_seconds for r in e2e)
    n = len(tasks)
    _log(
        {
            "name": "generate_filter_e2e",
            "ours": round(n / e2e_wall, 3),
            "reference": round(n / alone_wall, 3),
            "unit": "tasks/s",
            "ratio": round(alone_wall / e2e_wall, 3),
            "generator_cpu_share": round(e2e_parent / (e2e_parent + e2e_workers), 4),
            "handoff_cpu_share": round(alone_parent / (alone_parent + alone_workers), 4),
            "generate_alone": round(n / generate_wall, 3),
            "generate_cpu_seconds_per_task": round(generate_cpu / n, 4),
            "filter_cpu_seconds_per_task": round(e2e_workers / n, 4),
            "first_generation_seconds": round(first_generation, 1),
            "batch_size": args.batch_size,
            **_settings(args, "prior", config),
        }
    )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "pool": bench_pool,
        "forest": bench_forest,
        "thresholds": bench_thresholds,
        "accept": bench_accept,
        "e2e": bench_e2e,
    }
    for name in commands:
        p = sub.add_parser(name)
        # pool: 3 repeats of pool + one process + reference in <= 3 minutes on 2 cores
        p.add_argument("--tasks", type=int, default=40 if name == "pool" else 96)
        p.add_argument("--workers", type=int, default=default_workers())
        p.add_argument("--seed", type=int, default=0)
        # pool: tasks from the reference prior by default, so the first run does not pay
        # the JAX prior's compilation (~130 CPU s) inside the 3-minute budget; per task the
        # filter costs about the same on both priors (docs/filtering.md).
        p.add_argument(
            "--source",
            choices=("auto", "prior", "tabicl"),
            default="tabicl" if name == "pool" else "auto",
        )
        p.add_argument("--cache", help="npz file keeping the generated tasks between runs")
        p.add_argument("--consensus", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--reference-trees", type=int, default=200)
        p.add_argument(
            "--reference-jobs",
            type=int,
            default=default_workers(),
            help="pool: n_jobs of the scikit-learn peer (default: the cores)",
        )
        p.add_argument(
            "--ablations",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="pool: also run our filter in one process and the serial scikit-learn loop",
        )
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--permutations", type=int, default=3, help="null draws per task")
        p.add_argument(
            "--candidates",
            help="forest study: JSON list of FilterConfig overrides, e.g. '[{\"seed\": 1}]'",
        )
    args = parser.parse_args(argv)
    commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
