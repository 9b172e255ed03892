"""The demo's report: metrics JSON, a markdown summary, the loss curve and accuracy plots.

Everything is read back from the files the stages wrote (stage timings, the corpora's
generate manifests, the training metrics log, the harness's results logs), so the report
can be rebuilt from a finished run directory alone. Files are written atomically.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mllm_jax import __version__
from mllm_jax.data.shards import read_manifests
from mllm_jax.demo.evaluate import GROUPS, MODEL_METHOD
from mllm_jax.demo.generate import corpus_dir
from mllm_jax.eval.report import dataset_average, seed_means, split_records
from mllm_jax.eval.results_io import read_log, write_json
from mllm_jax.foundation.files import atomic_write_bytes, atomic_write_text

REPORT_DIR = "report"
BASELINE_FLOOR = "majority"


# ------------------------------------------------------------------------------ reading


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records, _ = read_log(path) if path.exists() else ([], False)
    return records


def corpus_summary(out: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per corpus, from its generate manifests: tasks drawn, accepted (written), invalid
    (every prior attempt failed), rejected by the filter and why, acceptance rate, the
    share of consensus rows kept (None without consensus masks)."""
    summary = {}
    for name in names:
        manifests = read_manifests(corpus_dir(out, name))
        drawn = sum(m["count"] for m in manifests)
        accepted = sum(m["tasks_written"] for m in manifests)
        reasons: Counter[str] = Counter()
        for manifest in manifests:
            reasons.update(manifest["rejected_by_reason"])
        kept = sum(m["report"].get("consensus_rows_kept", 0) for m in manifests)
        rows = sum(m["report"].get("consensus_rows_total", 0) for m in manifests)
        summary[name] = {
            "tasks": drawn,
            "accepted": accepted,
            "invalid": sum(m["invalid"] for m in manifests),
            "rejected": sum(m["rejected"] for m in manifests),
            "acceptance_rate": accepted / drawn,
            "rejected_by_reason": dict(sorted(reasons.items())),
            "consensus_rows_kept": kept / rows if rows else None,
        }
    return summary


def training_summary(train_dir: Path) -> dict[str, Any]:
    """First/last training loss and accuracy, last validation, steps, throughput."""
    records = _read_jsonl(train_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("event") == "train"]
    validations = [r for r in records if r.get("event") == "validation"]
    start = next((r for r in records if r.get("event") == "start"), {})
    if not steps:
        raise ValueError(f"{train_dir}/metrics.jsonl: no training steps logged")
    rates = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    out = {
        "steps": steps[-1]["step"],
        "parameters": start.get("trainable_params"),
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "final_answer_token_accuracy": steps[-1].get("accuracy"),
        "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
    }
    if validations:
        last = validations[-1]
        out["validation_loss"] = last.get("val_loss")
        out["validation_answer_token_accuracy"] = last.get("val_accuracy")
        # Label-only: the answer-token accuracy is mostly the JSON frame.
        for key in ("label_accuracy", "majority_accuracy", "label_loss", "prior_loss"):
            if f"val_{key}" in last:
                out[f"validation_{key}"] = last[f"val_{key}"]
    return out


def eval_frames(out: Path) -> dict[str, tuple[pd.DataFrame, list[dict]]]:
    """group -> (results frame, open errors) of each harness run that exists."""
    frames = {}
    for group in GROUPS:
        log = out / "eval" / group / "results.jsonl"
        if log.exists():
            frames[group] = split_records(_read_jsonl(log))
    return frames


def skipped_tables(out: Path, group: str) -> list[dict[str, str]]:
    """Tables the harness could not evaluate (e.g. a class too rare to split), with why."""
    path = out / "eval" / group / "run.json"
    return json.loads(path.read_text()).get("skipped", []) if path.exists() else []


def accuracy_table(frame: pd.DataFrame) -> dict[str, dict[int, float]]:
    """method -> shots -> accuracy averaged over seeds and the shared tables."""
    average = dataset_average(frame, "accuracy")
    table: dict[str, dict[int, float]] = {}
    for row in average.itertuples():
        table.setdefault(str(row.method), {})[int(row.shots)] = float(row.mean)
    return table


def per_table(frame: pd.DataFrame) -> dict[str, dict[str, dict[int, float]]]:
    """table -> method -> shots -> accuracy (mean over seeds)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for row in seed_means(frame, "accuracy").itertuples():
        out.setdefault(str(row.dataset), {}).setdefault(str(row.method), {})[int(row.shots)] = (
            float(row.mean)
        )
    return out


def verdict(table: Mapping[str, Mapping[int, float]]) -> dict[str, Any] | None:
    """The model against the majority floor and the best baseline, over all shot counts."""
    if MODEL_METHOD not in table:
        return None

    def mean(method: str) -> float:
        values = list(table[method].values())
        return sum(values) / len(values)

    baselines = [m for m in table if m != MODEL_METHOD]
    best = max(baselines, key=mean) if baselines else None
    model = mean(MODEL_METHOD)
    result: dict[str, Any] = {"model_mean_accuracy": model}
    if BASELINE_FLOOR in table:
        result["majority_mean_accuracy"] = mean(BASELINE_FLOOR)
        result["model_minus_majority"] = model - mean(BASELINE_FLOOR)
    if best is not None:
        result["best_baseline"] = best
        result["best_baseline_mean_accuracy"] = mean(best)
    return result


# ------------------------------------------------------------------------------ plots


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_loss(train_dir: Path, stage_bounds: Sequence[tuple[str, int]], path: Path) -> None:
    """Training loss per logged step, validation loss, stage starts as vertical lines."""
    records = _read_jsonl(train_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("event") == "train"]
    validations = [r for r in records if r.get("event") == "validation"]
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
    if validations:
        axes.plot(
            [r["step"] for r in validations],
            [r["val_loss"] for r in validations],
            marker="o",
            label="validation (held-out tasks)",
        )
    for name, start in stage_bounds:
        axes.axvline(start, color="grey", alpha=0.4, linestyle="--")
        axes.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                      xytext=(3, -12), textcoords="offset points")  # fmt: skip
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy on answer tokens (nats)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("training loss", fontsize=10)
    _save(figure, path)


def plot_accuracy(tables: Mapping[str, Mapping[str, Mapping[int, float]]], path: Path) -> None:
    """One panel per group: accuracy vs shots (log2), one line per method."""
    groups = [g for g in GROUPS if g in tables]
    figure = Figure(figsize=(5.2 * len(groups), 4.0))
    for i, group in enumerate(groups):
        axes = figure.add_subplot(1, len(groups), i + 1)
        shots = sorted({s for by_shots in tables[group].values() for s in by_shots})
        for method, by_shots in tables[group].items():
            xs = sorted(by_shots)
            style: dict[str, Any] = {"marker": "o", "linewidth": 1.2}
            if method == MODEL_METHOD:
                style = {"marker": "o", "linewidth": 2.5, "color": "black", "zorder": 3}
            elif method == BASELINE_FLOOR:  # drawn over the model: they often coincide
                style = {"linestyle": "--", "color": "grey", "zorder": 4}
            axes.plot(xs, [by_shots[s] for s in xs], label=method, **style)
        axes.set_xscale("log", base=2)
        axes.set_xticks(shots, [str(s) for s in shots])
        axes.minorticks_off()
        axes.set_xlabel("shots")
        axes.set_ylabel("accuracy")
        axes.set_title(f"{group} tables (mean)", fontsize=10)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    _save(figure, path)


# ------------------------------------------------------------------------------ writing


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _accuracy_markdown(table: Mapping[str, Mapping[Any, float]]) -> list[str]:
    # Shot counts are strings once read back from metrics.json.
    table = {m: {int(s): v for s, v in by_shots.items()} for m, by_shots in table.items()}
    shots = sorted({s for by_shots in table.values() for s in by_shots})
    lines = [
        "| method | " + " | ".join(f"{s} shots" for s in shots) + " |",
        "|---|" + "---|" * len(shots),
    ]
    for method, by_shots in table.items():
        name = f"**{method}** (ours)" if method == MODEL_METHOD else method
        lines.append(f"| {name} | " + " | ".join(_fmt(by_shots.get(s)) for s in shots) + " |")
    return lines


def _verdict_sentence(group: str, v: Mapping[str, Any] | None) -> str:
    if v is None:
        return f"- {group}: the model has no results."
    parts = [f"- {group}: the model's mean accuracy is {_fmt(v['model_mean_accuracy'])}"]
    if "majority_mean_accuracy" in v:
        diff = v["model_minus_majority"]
        where = (
            "about the majority-class baseline"
            if abs(diff) < 0.02
            else ("above" if diff > 0 else "below") + " the majority-class baseline"
        )
        parts.append(f"{where} ({_fmt(v['majority_mean_accuracy'])}, {diff:+.3f})")
    if "best_baseline" in v:
        parts.append(f"best baseline {v['best_baseline']} {_fmt(v['best_baseline_mean_accuracy'])}")
    return ", ".join(parts) + "."


def _label_lines(train: Mapping[str, Any]) -> list[str]:
    """The label-only sentence (held-out validation prompts), if the run measured it."""
    if train.get("validation_label_accuracy") is None:
        return []
    return [
        "Query labels alone on the held-out validation prompts (the answer-token accuracy "
        "is mostly the JSON frame): accuracy "
        f"{_fmt(train['validation_label_accuracy'])} against "
        f"{_fmt(train.get('validation_majority_accuracy'))} for the shots' majority class; "
        f"label loss {_fmt(train.get('validation_label_loss'))} against "
        f"{_fmt(train.get('validation_prior_loss'))} for the shots' class frequencies as a "
        "guess. A model above the majority reads its shots. The small-scale learning "
        "recipe, and why it does not get there on a CPU yet: `configs/mini.yaml`, "
        "docs/mini.md.",
        "",
    ]


def summary_markdown(metrics: Mapping[str, Any]) -> str:
    model, train = metrics["model"], metrics["train"]
    lines = [
        "# mllm-jax demo report",
        "",
        f"mllm-jax {metrics['version']}, jax {metrics['jax_version']} on "
        f"{metrics['backend']}, {metrics['cpu_count']} CPU cores, {metrics['platform']}.",
        "",
        "## What ran",
        "",
        "| stage | seconds | budget | CPU seconds | load (1 min) |",
        "|---|---|---|---|---|",
    ]
    for name, r in metrics["stages"].items():
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {_fmt(r.get('budget_seconds'), 0)} | "
            f"{r['cpu_seconds']:.1f} | {r.get('load_avg_1m')} |"
        )
    lines += [
        f"| **total** | **{metrics['total_seconds']:.1f}** | "
        f"{_fmt(metrics.get('total_budget_seconds'), 0)} | | |",
        "",
        "Corpora (synthetic tasks from the prior, filtered by a random forest):",
        "",
    ]
    for name, c in metrics["generate"].items():
        consensus = (
            f", consensus keeps {c['consensus_rows_kept']:.0%} of their rows"
            if c["consensus_rows_kept"] is not None
            else ""
        )
        invalid = f", {c['invalid']} invalid" if c.get("invalid") else ""
        lines.append(
            f"- `{name}`: {c['accepted']} of {c['tasks']} tasks accepted "
            f"({c['acceptance_rate']:.0%}){invalid}{consensus}"
        )
    lines += [
        "",
        f"Model: Qwen2 architecture, {model['layers']} layers, hidden {model['hidden']}, "
        f"vocabulary {model['vocab']:,} (Qwen2.5's tokenizer), {model['parameters']:,} "
        f"parameters, trained from "
        + (f"`{train['base']}`" if train.get("base") else "random initialisation")
        + f" ({train['mode']} fine-tuning) for "
        f"{train['steps']} steps: answer-token loss {train['first_loss']:.3f} -> "
        f"{train['final_loss']:.3f}"
        + (
            f", held-out validation loss {train['validation_loss']:.3f}"
            if train.get("validation_loss") is not None
            else ""
        )
        + ". Exported as a Hugging Face checkpoint: `model/`.",
        "",
        *_label_lines(train),
        "![training loss](loss.png)",
        "",
        "## Accuracy",
        "",
    ]
    for group, g in metrics["eval"].items():
        lines += [f"### {group} tables: {_table_names(g['tables'])}", ""]
        lines += _accuracy_markdown(g["accuracy"])
        if g["errors"]:
            lines += ["", f"{len(g['errors'])} entries failed:"]
            lines += [f"- {e['dataset']} shots={e['shots']} {e['method']}: {e['error']}"
                      for e in g["errors"]]  # fmt: skip
        if g.get("skipped"):
            lines += ["", "Not evaluated:"]
            lines += [f"- {t['dataset']}: {t['reason']}" for t in g["skipped"]]
        lines.append("")
    lines += ["![accuracy vs shots](accuracy.png)", "", "## Verdict", ""]
    for group, g in metrics["eval"].items():
        lines.append(_verdict_sentence(group, g["verdict"]))
    lines += [
        "",
        "These are the honest numbers of a "
        f"{model['parameters'] / 1e6:.1f}M-parameter model trained for a few minutes on "
        "a few hundred tasks. Expect it near the majority-class baseline (it learns the "
        "answer format and the label frequencies, not many-shot in-context learning); the "
        "demo shows that every stage runs end to end. The paper's model is Qwen2.5-7B-"
        "Instruct trained with LoRA on millions of tasks (`configs/qwen2.5-7b-lora.yaml`).",
        "",
    ]
    return "\n".join(lines)


def _table_names(names: Sequence[str], most: int = 6) -> str:
    if len(names) <= most:
        return ", ".join(names)
    return f"{len(names)} tables ({', '.join(names[:3])}, ..., {names[-1]})"


def _error_fields(error: Mapping[str, Any]) -> dict[str, Any]:
    return {k: error.get(k) for k in ("dataset", "shots", "method", "error")}


def write_report(
    out: Path,
    *,
    stages: Mapping[str, Mapping[str, Any]],
    budgets: Mapping[str, float],
    corpora: Sequence[str],
    train_dir: Path,
    stage_bounds: Sequence[tuple[str, int]],
    model: Mapping[str, Any],
    mode: str,
    base: str | None = None,
) -> dict[str, Any]:
    """Writes `<out>/report/` (metrics.json, summary.md, loss.png, accuracy.png).

    base: the HF checkpoint training started from (None: random initialisation).
    """
    import jax

    report = out / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    evals: dict[str, Any] = {}
    tables: dict[str, dict[str, dict[int, float]]] = {}
    for group, (frame, errors) in eval_frames(out).items():
        if not len(frame):
            continue
        tables[group] = accuracy_table(frame)
        evals[group] = {
            "tables": sorted(frame["dataset"].unique().tolist()),
            "accuracy": tables[group],
            "per_table": per_table(frame),
            "errors": [_error_fields(e) for e in errors],
            "skipped": skipped_tables(out, group),
            "verdict": verdict(tables[group]),
        }
    metrics = {
        "version": __version__,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "stages": dict(stages),
        "total_seconds": round(sum(r["seconds"] for r in stages.values()), 2),
        "total_budget_seconds": sum(budgets.values()),
        "generate": corpus_summary(out, corpora),
        "model": dict(model),
        "train": {"mode": mode, "base": base, **training_summary(train_dir)},
        "eval": evals,
    }
    plot_loss(train_dir, stage_bounds, report / "loss.png")
    if tables:
        plot_accuracy(tables, report / "accuracy.png")
    write_json(report / "metrics.json", metrics)
    atomic_write_text(report / "summary.md", summary_markdown(metrics))
    return metrics


def update_timings(out: Path, stages: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Rewrites metrics.json and summary.md with the final stage timings (the report
    stage's own time is known only after it wrote them)."""
    path = out / REPORT_DIR / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["stages"] = dict(stages)
    metrics["total_seconds"] = round(sum(r["seconds"] for r in stages.values()), 2)
    write_json(path, metrics)
    atomic_write_text(out / REPORT_DIR / "summary.md", summary_markdown(metrics))
    return metrics
