"""Label-only learning curves of a training run, from its metrics.jsonl.

Prints one markdown row per validation: the query labels' accuracy (over the classes the
shots show) beside the shots' majority class, the label loss beside the shots'
class-frequency guess, and the shot labels' accuracy (each shot's label predicted from
the shots before it). With --plot, writes a PNG of the same. The last line is one JSON
object with the final validation's numbers, by shot count.

    python tools/learning_curve.py runs/mini/train [--plot docs/mini_curve.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mllm_jax.train.label_metrics import SHOT_BUCKETS, bucket_name


def validations(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (not a training run directory?)")
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if record.get("event") == "validation" and "val_label_accuracy" in record:
            out.append(record)
    return out


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def table(records: list[dict]) -> str:
    head = (
        "| step | label acc | majority | label loss | freq. guess loss | shot-label acc |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['step']} | {_number(r['val_label_accuracy']):.3f} | "
        f"{_number(r['val_majority_accuracy']):.3f} | {_number(r['val_label_loss']):.3f} | "
        f"{_number(r['val_prior_loss']):.3f} | {_number(r.get('val_shot_label_accuracy')):.3f} |"
        for r in records
    ]
    return head + "\n".join(rows)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, [_number(r["val_label_accuracy"]) for r in records], label="query labels")
    left.plot(steps, [_number(r["val_majority_accuracy"]) for r in records], "--",
              label="shots' majority")  # fmt: skip
    left.plot(steps, [_number(r.get("val_shot_label_accuracy")) for r in records],
              label="shot labels (argmax of all 10 digits)")  # fmt: skip
    left.set_xlabel("step")
    left.set_ylabel("held-out accuracy")
    left.legend()
    curves = {
        what: records[-1].get(key) or {}
        for key, what in (("val_by_shots", "query"), ("val_shot_by_before", "next shot"))
    }
    order = [bucket_name(b) for b in (0, *SHOT_BUCKETS)]
    names = [n for n in order if any(n in curve for curve in curves.values())]
    for what, curve in curves.items():
        x = [names.index(n) for n in names if n in curve]
        shown = [n for n in names if n in curve]
        right.plot(x, [curve[n]["label_accuracy"] for n in shown], "o-",
                   label=f"{what} label: model")  # fmt: skip
        right.plot(x, [curve[n]["majority_accuracy"] for n in shown], "s--",
                   label=f"{what} label: majority of the shots")  # fmt: skip
    right.set_xticks(range(len(names)), names)
    right.set_xlabel(f"shots before it in the prompt (step {records[-1]['step']})")
    right.set_ylabel("held-out accuracy")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a training run directory")
    parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
    args = parser.parse_args()
    records = validations(args.run_dir)
    if not records:
        raise SystemExit(f"error: {args.run_dir} has no validation with label metrics yet")
    print(table(records))
    if args.plot:
        plot(records, args.plot)
    last = records[-1]
    print(
        json.dumps(
            {
                "name": "learning_curve",
                "step": last["step"],
                "label_accuracy": last["val_label_accuracy"],
                "majority_accuracy": last["val_majority_accuracy"],
                "label_loss": last["val_label_loss"],
                "prior_loss": last["val_prior_loss"],
                "shot_label_accuracy": last.get("val_shot_label_accuracy"),
                "by_shots": last["val_by_shots"],
                "shot_by_before": last.get("val_shot_by_before"),
            }
        )
    )


if __name__ == "__main__":
    main()
