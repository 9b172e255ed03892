"""Accuracy-vs-shots plots: one PNG per dataset and one averaged over datasets.

Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`), so
nothing touches pyplot's global state or needs a display. One line per method; the band
around a per-dataset line spans the seeds' minimum to maximum.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mllm_jax.eval.report import dataset_average
from mllm_jax.foundation.files import atomic_write_bytes


def safe_filename(name: str) -> str:
    """A dataset name as a file name: anything but letters, digits, `._-` becomes `_`.

    A name that had to change gets a short hash of the original, so two names never share
    a file.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:150]
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _axes(title: str, shots: list[int]):
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    axes.set_xscale("log", base=2)
    axes.set_xticks(shots, [str(s) for s in shots])
    axes.minorticks_off()
    axes.set_xlabel("shots")
    axes.set_ylabel("accuracy")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    return figure, axes


def plot_dataset(frame: pd.DataFrame, dataset: str, path: Path) -> None:
    """frame: results rows of one dataset (columns method, shots, seed, accuracy)."""
    figure, axes = _axes(dataset, sorted(int(s) for s in frame["shots"].unique()))
    for method, rows in frame.groupby("method", sort=False):
        stats = rows.groupby("shots")["accuracy"].agg(["mean", "min", "max"]).sort_index()
        (line,) = axes.plot(stats.index, stats["mean"], marker="o", label=str(method))
        if rows["seed"].nunique() > 1:
            axes.fill_between(
                stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.15
            )
    axes.legend(fontsize=8)
    _save(figure, path)


def plot_average(frame: pd.DataFrame, path: Path) -> None:
    average = dataset_average(frame, "accuracy")
    counts = average.groupby("shots")["datasets"].first()
    figure, axes = _axes(
        f"accuracy averaged over datasets ({counts.min()}-{counts.max()} per shot count)"
        if counts.min() != counts.max()
        else f"accuracy averaged over {counts.min()} datasets",
        sorted(int(s) for s in counts.index),
    )
    for method, rows in average.groupby("method", sort=False):
        axes.plot(rows["shots"], rows["mean"], marker="o", label=str(method))
    axes.legend(fontsize=8)
    _save(figure, path)


def write_plots(frame: pd.DataFrame, plot_dir: Path) -> list[Path]:
    """Writes accuracy_<dataset>.png for each dataset and accuracy_mean.png; returns paths."""
    written = []
    order = list(dict.fromkeys(frame["method"]))
    frame = frame.assign(method=pd.Categorical(frame["method"], categories=order, ordered=True))
    for dataset, rows in frame.groupby("dataset", sort=True, observed=True):
        path = plot_dir / f"accuracy_{safe_filename(str(dataset))}.png"
        plot_dataset(rows, str(dataset), path)
        written.append(path)
    path = plot_dir / "accuracy_mean.png"
    plot_average(frame.assign(method=frame["method"].astype(str)), path)
    written.append(path)
    return written
