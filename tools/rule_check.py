"""Can the model read its own row? A control for the "It learns" runs (docs/mini.md).

Writes two task corpora of one-feature tables (x ~ N(0, 1), 256 rows, 2 classes) that the
training pipeline reads like the prior's, and a training config for each:

- ``fixed``: y = 1 where x > 0, in every task. The shots are not needed: a model that
  reads the digits of its own row at the label slot learns this in-weights rule, and
  its label accuracy goes towards 1 (the labels are not permuted per prompt).
- ``shifted``: y = 1 where x > t, t ~ U(-1, 1) drawn per task. After the per-task
  normalisation the boundary moves from task to task, so only the shots tell it: the
  in-context version of the same rule.

- ``lookup``: x takes one of 3-8 values drawn per task, each value with its own class
  drawn per task (both classes present). Rows with equal x print the same integer, so
  the label of a row is the label of the earlier rows that print the same number: an
  exact-match lookup in the shots (the induction-like step that feature reading needs),
  with nothing to gain from a rule on x or from the label counts beyond the majority.

If the ``fixed`` run does not leave the majority, the defect is upstream of in-context
learning (the label slot does not see its row); if it does and ``shifted`` does not, the
model reads rows but not shots. ``score`` then tells the two readings apart on held-out
tasks: the exported model fitted on true and on permuted shot labels, beside the shots'
majority, kNN on the shots, and the fixed rule itself (x > 0, no shots), which is right
on ~81% of rows of ``shifted`` tasks without reading a single shot; and fitted on shots
whose two classes trade names (truth swapped alike), where the fixed rule is wrong on
~81% of rows and a reader of the shots loses nothing. Binary tasks only.

    python tools/rule_check.py write --out runs/rule --base runs/mini-one/model-1410 \\
        --from-config runs/mini-one/train/config.yaml --steps 400 [--rules lookup]
    mllm-jax train --config runs/rule/fixed/train.yaml
    python tools/learning_curve.py runs/rule/fixed/train
    python tools/rule_check.py score --model runs/rule/shifted/model \\
        --corpus runs/rule/shifted/data/heldout --tasks 60 --shots 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from mllm_jax.data.shards import ShardWriter
from mllm_jax.foundation.files import atomic_write_text
from mllm_jax.foundation.tasks import Task, decode_task

ROWS = 256


RULES = ("fixed", "shifted", "lookup")


def _labels(rng: np.random.Generator, x: np.ndarray, rule: str) -> tuple[np.ndarray, float]:
    """(y i32[rows], threshold) for the rule; lookup redraws x from a few values."""
    if rule == "lookup":
        values = rng.standard_normal(int(rng.integers(3, 9))).astype(np.float32)
        while np.diff(np.sort(values)).min() < 0.1:  # apart after printing (1/120 std)
            values = rng.standard_normal(len(values)).astype(np.float32)
        classes = rng.permutation(np.arange(len(values)) % 2)  # both classes present
        which = rng.integers(0, len(values), x.shape[0])
        x[:] = values[which]
        return classes[which].astype(np.int32), float("nan")
    threshold = rng.uniform(-1.0, 1.0) if rule == "shifted" else 0.0
    return (x > threshold).astype(np.int32), float(threshold)


def rule_task(rng: np.random.Generator, index: int, seed: int, rule: str) -> Task:
    """One 1-feature, 2-class task; resampled until both classes have >= 8 rows."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {RULES}")
    while True:
        x = rng.standard_normal(ROWS).astype(np.float32)
        y, threshold = _labels(rng, x, rule)
        if min(y.sum(), ROWS - y.sum()) >= 8:
            break
    return Task(
        X=x[:, None],
        y=y,
        n_classes=2,
        n_train=ROWS // 2,
        categorical=np.zeros(1, bool),
        family="mlp",  # the record's family field; these tasks come from no SCM
        seed=seed,
        index=index,
        extra={"rule": rule, "threshold": threshold},
    )


def write_corpus(directory: Path, count: int, seed: int, rule: str) -> list[Path]:
    """`count` tasks of `rule` into ArrayRecord shards under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with ShardWriter(directory, shard_size=1000) as writer:
        for index in range(count):
            writer.add(rule_task(rng, index, seed, rule))
    return writer.paths


def train_config(
    template: dict, out: Path, base: str | None, steps: int, shards: Path, heldout: Path
) -> dict:
    """The template run's config with this corpus, labels not permuted, `steps` steps;
    the model continues `base`, or is the template's own (from scratch) when None."""
    config = dict(template)
    config["run_dir"] = str(out / "train")
    if base is not None:
        config["model"] = {**template["model"], "base": base}
    stage = dict(template["stages"][0])
    data = dict(stage["data"])
    pipeline = dict(data["pipeline"])
    pipeline["sampling"] = {**pipeline["sampling"], "permute_labels": False}
    data.update(shards=[str(shards / "*.array_record")], pipeline=pipeline)
    stage.update(name="rule", steps=steps, data=data, epochs=None)
    config["stages"] = [stage]
    validation = dict(template["validation"])
    validation["data"] = {**validation["data"], "shards": [str(heldout / "*.array_record")]}
    config["validation"] = validation
    return config


def read_corpus(directory: Path, limit: int) -> list[Task]:
    """The first `limit` tasks of the shards in `directory`, in file order."""
    from array_record.python.array_record_module import ArrayRecordReader

    tasks: list[Task] = []
    for shard in sorted(directory.glob("*.array_record")):
        reader = ArrayRecordReader(str(shard))
        try:
            tasks += [decode_task(record) for record in reader.read_all()]
        finally:
            reader.close()
        if len(tasks) >= limit:
            break
    if not tasks:
        raise SystemExit(f"{directory}: no task shards")
    return tasks[:limit]


def score(model: str, tasks: list[Task], shots: int, test_rows: int, queries: int) -> dict:
    """Mean accuracy over tasks of the model (true and permuted shot labels) and of the
    readers that need no model, with the standard error over tasks of the differences."""
    from sklearn.neighbors import KNeighborsClassifier

    from mllm_jax.infer import MLLMClassifier

    rows: dict[str, list[float]] = {
        k: [] for k in ("mllm", "mllm_permuted", "mllm_swapped", "majority", "knn", "fixed_rule")
    }
    rng = np.random.default_rng(0)
    for task in tasks:
        X_train, y_train, X_test, y_test = task.split()
        pick = rng.choice(len(y_train), size=min(shots, len(y_train)), replace=False)
        xs, ys = X_train[pick], y_train[pick]
        xt, yt = X_test[:test_rows], y_test[:test_rows]
        if len(np.unique(ys)) < 2:
            continue  # one class among the shots: every reader says it
        # permuted: labels shuffled among the shots (the feature-label link is gone);
        # swapped: the two classes trade names in shots and truth alike (a reader of the
        # shots is unaffected, a model that learned "class 1 is above" loses).
        conditions = (
            ("mllm", ys, yt),
            ("mllm_permuted", rng.permutation(ys), yt),
            ("mllm_swapped", 1 - ys, 1 - yt),
        )
        for name, labels, truth in conditions:
            clf = MLLMClassifier(model, chunk_size=queries, random_state=0)
            rows[name].append(float(np.mean(clf.fit(xs, labels).predict(xt) == truth)))
        majority = np.bincount(ys).argmax()
        rows["majority"].append(float(np.mean(yt == majority)))
        knn = KNeighborsClassifier(5).fit(xs, ys)
        rows["knn"].append(float(np.mean(knn.predict(xt) == yt)))
        rows["fixed_rule"].append(float(np.mean((xt[:, 0] > 0).astype(int) == yt)))
    out: dict = {name: float(np.mean(v)) for name, v in rows.items()}
    for other in ("mllm_permuted", "mllm_swapped", "majority", "fixed_rule"):
        diff = np.array(rows["mllm"]) - np.array(rows[other])
        out[f"mllm_minus_{other}"] = float(diff.mean())
        out[f"se_mllm_minus_{other}"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    out["tasks"] = len(rows["mllm"])
    return out


def write(args: argparse.Namespace) -> None:
    template = yaml.safe_load(args.from_config.read_text())
    for rule in args.rules:
        root, seed = args.out / rule, RULES.index(rule)
        if (root / "train.yaml").exists():
            raise SystemExit(f"{root}: already written; remove it to start over")
        write_corpus(root / "data" / "full", args.tasks, seed, rule)
        write_corpus(root / "data" / "heldout", args.heldout, 1000 + seed, rule)
        config = train_config(
            template, root, args.base, args.steps, root / "data" / "full", root / "data" / "heldout"
        )
        atomic_write_text(root / "train.yaml", yaml.safe_dump(config, sort_keys=False))
        print(
            f"{rule}: {args.tasks} + {args.heldout} tasks; mllm-jax train --config {root}/train.yaml"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="the two corpora and their training configs")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument(
        "--base", help="the model to continue (HF directory); default: the template's model"
    )
    w.add_argument("--from-config", type=Path, required=True, help="a run's config.yaml")
    w.add_argument("--steps", type=int, default=400)
    w.add_argument("--tasks", type=int, default=4000)
    w.add_argument("--heldout", type=int, default=300)
    w.add_argument("--rules", nargs="+", choices=RULES, default=["fixed", "shifted"])
    sc = sub.add_parser("score", help="an exported model on held-out tasks of one corpus")
    sc.add_argument("--model", required=True, help="exported HF checkpoint directory")
    sc.add_argument("--corpus", type=Path, required=True, help="a directory of task shards")
    sc.add_argument("--tasks", type=int, default=60)
    sc.add_argument("--shots", type=int, default=32)
    sc.add_argument("--test-rows", type=int, default=30)
    sc.add_argument("--queries", type=int, default=2, help="test rows per prompt (as trained)")
    args = parser.parse_args()
    if args.command == "write":
        write(args)
    else:
        result = score(
            args.model,
            read_corpus(args.corpus, args.tasks),
            args.shots,
            args.test_rows,
            args.queries,
        )
        print(
            json.dumps({"name": "rule_check", "model": args.model, "shots": args.shots, **result})
        )


if __name__ == "__main__":
    main()
