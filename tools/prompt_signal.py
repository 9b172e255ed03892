"""How much the training prompts themselves tell about their query labels.

Reads batches exactly as training does (a run's config: its stage's or its validation
data through the grain pipeline), decodes every packed prompt back to text, parses its
shot rows (`v1,v2,...|label`), query rows (`ID i:v1,v2,...`) and answer labels, and
scores simple readers of the same prompts on the query labels:

- `majority`: the shots' most frequent label (what a model that only counts labels gets);
- `knn`: k nearest shots by Euclidean distance on the printed integers (k=5, or fewer);
- `nn1`: the nearest shot.

A reader of features above `majority` here shows the prompts carry the signal a model
has to learn to read (no defect between the tables and the tokens); the model's own
`val_label_accuracy` is comparable with these numbers on the validation data.

    python tools/prompt_signal.py --config runs/mini-sep/train/config.yaml --batches 40
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

SHOT = re.compile(r"^(\d+(?:,\d+)*)\|(\d+)$")
QUERY = re.compile(r"^ID (\d+):(\d+(?:,\d+)*)$")
ANSWER = re.compile(r'\{"id": (\d+), "label": (\d+)\}')


def parse_prompt(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(shot X i64[k, f], shot y i64[k], query X i64[m, f], query y i64[m]) of one decoded
    prompt + answer; None when it has no numeric rows (e.g. text columns)."""
    user, _, answer = text.partition("<|im_start|>assistant\n")
    shots = [SHOT.match(line) for line in user.splitlines()]
    shots = [m for m in shots if m]
    queries = {int(m[1]): m[2] for m in map(QUERY.match, user.splitlines()) if m}
    labels = {int(i): int(label) for i, label in ANSWER.findall(answer)}
    if not shots or not queries or not labels:
        return None
    sx = np.array([[int(v) for v in m[1].split(",")] for m in shots])
    sy = np.array([int(m[2]) for m in shots])
    ids = sorted(i for i in queries if i in labels)
    qx = np.array([[int(v) for v in queries[i].split(",")] for i in ids])
    qy = np.array([labels[i] for i in ids])
    return sx, sy, qx, qy


def read_prompts(tokenizer, batch: dict[str, np.ndarray]) -> list[str]:
    """Every packed segment of every row, decoded (answer included)."""
    texts = []
    for ids, segments in zip(batch["input_ids"], batch["segment_ids"], strict=True):
        for segment in np.unique(segments[segments > 0]):
            texts.append(tokenizer.decode(ids[segments == segment].tolist()))
    return texts


def score(prompts: list[tuple], k: int) -> dict[str, float]:
    hits: Counter[str] = Counter()
    total = 0
    for sx, sy, qx, qy in prompts:
        majority = Counter(sy.tolist()).most_common(1)[0][0]
        distances = ((qx[:, None, :] - sx[None, :, :]) ** 2).sum(-1)  # [m, shots]
        order = np.argsort(distances, axis=1, kind="stable")
        for row, label in enumerate(qy):
            near = sy[order[row, : min(k, len(sy))]]
            hits["majority"] += majority == label
            hits["knn"] += Counter(near.tolist()).most_common(1)[0][0] == label
            hits["nn1"] += near[0] == label
            total += 1
    return {name: hits[name] / total for name in ("majority", "knn", "nn1")} | {"queries": total}


BINS = ((0, 8, "<8"), (8, 16, "8-15"), (16, 32, "16-31"), (32, 64, "32-63"), (64, 10**9, "64+"))


def shot_score(prompts: list[tuple], k: int, threshold: int | None) -> dict[str, dict]:
    """The readers of `score` on every shot slot after the first, each shot's label read
    from the shots before it, binned by how many came before (as the trainer's
    `val_shot_by_before`); with `threshold`, also a reader that ignores the shots: class
    1 where the first feature's printed value exceeds `threshold`, else 0; and one that
    reads only the earlier shots' label counts and feature values, not which label went
    with which row (`count_quantile`: class 1 above the quantile of the earlier first
    features at one minus their share of class 1)."""
    hits: dict[str, Counter[str]] = {name: Counter() for _, _, name in BINS}
    for sx, sy, _, _ in prompts:
        for i in range(1, len(sy)):
            name = next(b for lo, hi, b in BINS if lo <= i < hi)
            before, label = sy[:i], sy[i]
            order = np.argsort(((sx[:i] - sx[i]) ** 2).sum(-1), kind="stable")
            near = before[order[:k]]
            h = hits[name]
            h["slots"] += 1
            h["majority"] += Counter(before.tolist()).most_common(1)[0][0] == label
            h["knn"] += Counter(near.tolist()).most_common(1)[0][0] == label
            h["nn1"] += near[0] == label
            if threshold is not None:
                h["threshold"] += int(sx[i, 0] > threshold) == label
                # Label counts without pairing: the earlier shots' share of class 1 puts
                # the cut at that quantile of their first feature (blind to which shot
                # had which label, as permuting the labels among the shots keeps it).
                cut = np.quantile(sx[:i, 0], 1.0 - np.mean(before == 1))
                h["count_quantile"] += int(sx[i, 0] > cut) == label
    return {
        name: {"slots": h["slots"]} | {r: round(h[r] / h["slots"], 4) for r in h if r != "slots"}
        for name, h in hits.items()
        if h["slots"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a training config YAML")
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--data", default="validation", help="'validation' or a stage name")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument(
        "--shots", action="store_true", help="also score every shot slot from the shots before it"
    )
    parser.add_argument(
        "--threshold",
        type=int,
        help="with --shots: also a shot-blind reader, class 1 where feature 1 > THRESHOLD",
    )
    args = parser.parse_args()

    from mllm_jax.encoding.tokens import load_tokenizer
    from mllm_jax.foundation.config import load_config
    from mllm_jax.runs.config import TrainConfig
    from mllm_jax.train.data import default_data

    config = load_config(TrainConfig, args.config, args.set)
    if args.data == "validation":
        data = config.validation.data
    else:
        (data,) = [s.data for s in config.stages if s.name == args.data] or [None]
    if data is None or data.kind != "shards":
        raise SystemExit(f"{args.config}: no task-shard data named {args.data!r}")
    tokenizer = load_tokenizer()
    batches = default_data(data, args.data)
    prompts, unparsed = [], 0
    for _ in range(args.batches):
        for text in read_prompts(tokenizer, next(batches)):
            parsed = parse_prompt(text)
            if parsed is None:
                unparsed += 1
            else:
                prompts.append(parsed)
    result = score(prompts, args.k)
    if args.shots:
        result["shot_slots"] = shot_score(prompts, args.k, args.threshold)
    print(
        json.dumps(
            {"name": "prompt_signal", "data": args.data, "prompts": len(prompts),
             "unparsed": unparsed, "k": args.k, **result}
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
