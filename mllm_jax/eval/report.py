"""Reports from the results log: CSV, JSON, a markdown summary and the plots.

Each (dataset, seed, shots, method) counts once: the last "ok" line of the log. An "error"
line counts only while no later "ok" line has the same key. Seed means are plain means;
the average over datasets at a shot count uses only the datasets where every method has a
result at that shot count, so the methods are compared on the same tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mllm_jax.eval.metrics import METRICS
from mllm_jax.eval.protocol import Protocol
from mllm_jax.eval.results_io import write_json
from mllm_jax.foundation.files import atomic_write_text

KEY = ["dataset", "seed", "shots", "method"]


def split_records(records: Sequence[Mapping[str, Any]]) -> tuple[pd.DataFrame, list[dict]]:
    """(results, open_errors): one row per key from the last ok record; unresolved errors."""
    latest_ok: dict[tuple, Mapping[str, Any]] = {}
    latest_error: dict[tuple, Mapping[str, Any]] = {}
    for record in records:
        key = tuple(record[k] for k in KEY)
        if record.get("status") == "ok":
            latest_ok[key] = record
            latest_error.pop(key, None)
        else:
            latest_error[key] = record
    frame = pd.DataFrame(list(latest_ok.values()))
    if frame.empty:
        frame = pd.DataFrame(columns=[*KEY, *METRICS])
    method_order = list(dict.fromkeys(frame["method"]))
    frame["method"] = pd.Categorical(frame["method"], categories=method_order, ordered=True)
    frame = frame.sort_values(["dataset", "method", "shots", "seed"], kind="stable")
    frame["method"] = frame["method"].astype(str)
    for column in METRICS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame.reset_index(drop=True), [dict(e) for e in latest_error.values()]


def seed_means(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Columns dataset, method, shots, mean, std, seeds: `metric` over seeds."""
    grouped = frame.groupby(["dataset", "method", "shots"], sort=False)[metric]
    table = grouped.agg(mean="mean", std="std", seeds="count").reset_index()
    return table


def dataset_average(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Columns method, shots, mean, datasets: seed means averaged over the shared datasets."""
    means = seed_means(frame, metric)
    methods = list(dict.fromkeys(frame["method"]))
    rows = []
    for shots, at_shots in means.groupby("shots", sort=True):
        per_dataset = at_shots.pivot(index="dataset", columns="method", values="mean")
        shared = per_dataset.reindex(columns=methods).dropna(how="any", subset=methods)
        # NaN metric values (e.g. AUC on a one-class test set) drop the dataset too.
        for method in methods:
            rows.append(
                {
                    "method": method,
                    "shots": int(shots),
                    "mean": shared[method].mean(),
                    "datasets": len(shared),
                }
            )
    return pd.DataFrame(rows, columns=["method", "shots", "mean", "datasets"])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float | np.floating):
            return "—" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(
    frame: pd.DataFrame,
    errors: Sequence[Mapping[str, Any]],
    skipped: Sequence[Mapping[str, str]],
    protocol: Protocol,
) -> str:
    shots = sorted(int(s) for s in frame["shots"].unique()) if len(frame) else []
    methods = list(dict.fromkeys(frame["method"]))
    n_seeds = frame["seed"].nunique() if len(frame) else 0
    parts = [
        "# Evaluation summary",
        "",
        f"{len(frame)} results: {frame['dataset'].nunique() if len(frame) else 0} datasets, "
        f"methods {', '.join(methods) or '-'}, shots {', '.join(map(str, shots)) or '-'}, "
        f"{n_seeds} seeds. Protocol: {protocol.to_dict()}.",
    ]
    if len(frame):
        for metric in METRICS:
            average = dataset_average(frame, metric)
            table = average.pivot(index="method", columns="shots", values="mean").reindex(methods)
            counts = average.groupby("shots")["datasets"].first()
            parts += [
                "",
                f"## {metric}, mean over seeds and shared datasets",
                "",
                markdown_table(
                    ["method", *[f"{s} ({counts[s]} ds)" for s in table.columns]],
                    [[m, *table.loc[m].tolist()] for m in table.index],
                ),
            ]
        means = seed_means(frame, "accuracy")
        table = means.pivot_table(
            index=["dataset", "method"], columns="shots", values="mean", sort=False
        )
        parts += [
            "",
            "## accuracy per dataset, mean over seeds",
            "",
            markdown_table(
                ["dataset", "method", *map(str, table.columns)],
                [[d, m, *table.loc[(d, m)].tolist()] for d, m in table.index],
            ),
        ]
    if skipped:
        parts += ["", "## Skipped datasets", ""]
        parts += [f"- {s['dataset']}: {s['reason']}" for s in skipped]
    if errors:
        parts += ["", "## Errors (retried by the next run into this directory)", ""]
        parts += [
            f"- {e['dataset']} seed={e['seed']} shots={e['shots']} {e['method']}: {e['error']}"
            for e in errors
        ]
    return "\n".join(parts) + "\n"


def write_reports(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    skipped: Sequence[Mapping[str, str]],
    protocol: Protocol,
    *,
    write_plots: bool = True,
) -> pd.DataFrame:
    """results.csv, results.json, summary.md and plots/*.png in `out_dir`; returns the results."""
    out_dir = Path(out_dir)
    frame, errors = split_records(records)
    atomic_write_text(out_dir / "results.csv", frame.to_csv(index=False))
    averages = {metric: dataset_average(frame, metric).to_dict("records") for metric in METRICS}
    write_json(
        out_dir / "results.json",
        {
            "protocol": protocol.to_dict(),
            "results": frame.to_dict("records"),
            "average_over_datasets": averages if len(frame) else {},
            "errors": list(errors),
            "skipped": list(skipped),
        },
    )
    atomic_write_text(out_dir / "summary.md", summary_markdown(frame, errors, skipped, protocol))
    if write_plots and len(frame):
        from mllm_jax.eval.plots import write_plots as plot_all

        plot_all(frame, out_dir / "plots")
    return frame
