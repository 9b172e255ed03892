"""Samples the reference prior (tabicl 0.1.4) i.i.d. and writes its task statistics.

The reference does not report which columns it made categorical, so this script
records it: it wraps ``Reg2Cls._num2cat`` (which columns changed) and
``Reg2Cls._process_features`` (the feature permutation it draws) without changing what
they compute or the random numbers they consume. Tasks are drawn one per ``get_batch``
call with ``batch_size_per_gp=1``, so every task has its own hyperparameters and split.

    .venv/bin/python tools/make_prior_fixture.py --count 600 --seed 0 \
        --out tests/fixtures/prior_reference_stats.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def _instrument_reference() -> dict:
    """Patches Reg2Cls to record the categorical mask of the last task it processed."""
    import torch
    from tabicl.prior import reg2cls
    from tabicl.prior.dataset import SCMPrior

    last: dict = {}
    num2cat = reg2cls.Reg2Cls._num2cat
    process = reg2cls.Reg2Cls._process_features
    forward = reg2cls.Reg2Cls.forward
    generate = SCMPrior.generate_dataset

    def num2cat_spy(self, X):
        before = X.clone()
        out = num2cat(self, X)
        same = (before == out) | (torch.isnan(before) & torch.isnan(out))
        self._cat_mask = ~same.all(dim=0)
        return out

    def process_spy(self, X):
        real = torch.randperm
        perms = []

        def randperm(*args, **kwargs):
            perm = real(*args, **kwargs)
            perms.append(perm)
            return perm

        torch.randperm = randperm
        try:
            out = process(self, X)
        finally:
            torch.randperm = real
        self._cat_mask = self._cat_mask[perms[0]] if perms else self._cat_mask
        return out

    def forward_spy(self, X, y):
        Xo, yo = forward(self, X, y)
        last["categorical"] = self._cat_mask.numpy().copy()
        last["X"] = Xo.numpy().copy()
        return Xo, yo

    def generate_spy(self, params):
        result = generate(self, params)
        last["params"] = {
            "prior_type": params["prior_type"],
            "num_classes": int(params["num_classes"]),
            "num_features": int(params["num_features"]),
        }
        return result

    reg2cls.Reg2Cls._num2cat = num2cat_spy
    reg2cls.Reg2Cls._process_features = process_spy
    reg2cls.Reg2Cls.forward = forward_spy
    SCMPrior.generate_dataset = generate_spy
    return last


def sample_reference(
    count: int,
    seed: int,
    max_features: int = 50,
    rows: int = 1024,
    prior_type: str = "mix_scm",
):
    """Yields (X, y, n_train, categorical, info) for `count` i.i.d. reference tasks
    (`prior_type`: "mix_scm", or one family: "mlp_scm", "tree_scm")."""
    import torch
    from tabicl.prior.dataset import PriorDataset

    torch.set_num_threads(1)  # the fixture was made single-threaded: same float sums
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    last = _instrument_reference()
    prior = PriorDataset(
        batch_size=1,
        batch_size_per_gp=1,
        prior_type=prior_type,
        min_features=5,
        max_features=max_features,
        max_classes=10,
        min_seq_len=rows,
        max_seq_len=rows + 1,
        n_jobs=1,
    )
    for _ in range(count):
        X, y, d, _, train_size = prior.get_batch()
        d = int(d[0])
        Xr = last["X"][:, : last["params"]["num_features"]]
        kept = np.array([len(np.unique(Xr[:, j])) > 1 for j in range(Xr.shape[1])])
        categorical = last["categorical"][kept]
        assert len(categorical) == d, (len(categorical), d)
        yield (
            X[0, :, :d].numpy(),
            y[0].numpy().astype(np.int32),
            int(train_size[0]),
            categorical,
            dict(last["params"]),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-tasks", type=Path, help="also save the raw tasks (npz)")
    args = parser.parse_args()

    from importlib.metadata import version

    import torch

    from mllm_jax.prior.stats import STATISTICS, task_statistics

    torch.set_num_threads(1)
    columns: dict[str, list[float]] = {name: [] for name in STATISTICS}
    info: dict[str, list] = {"family": [], "num_classes_drawn": [], "num_features_drawn": []}
    raw: dict[str, list] = {"X": [], "y": [], "n_train": [], "categorical": []}
    start = time.perf_counter()
    for i, (X, y, n_train, cat, params) in enumerate(sample_reference(args.count, args.seed)):
        for name, value in task_statistics(X, y, n_train, cat).items():
            columns[name].append(round(value, 6))
        info["family"].append("mlp" if params["prior_type"] == "mlp_scm" else "tree")
        info["num_classes_drawn"].append(params["num_classes"])
        info["num_features_drawn"].append(params["num_features"])
        if args.save_tasks:
            for key, value in zip(raw, (X, y, n_train, cat), strict=True):
                raw[key].append(value)
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{args.count} tasks, {time.perf_counter() - start:.0f}s", flush=True)

    payload = {
        "reference": f"tabicl=={version('tabicl')}",
        "settings": {
            "prior_type": "mix_scm",
            "min_features": 5,
            "max_features": 50,
            "max_classes": 10,
            "rows": 1024,
            "batch_size_per_gp": 1,
            "seed": args.seed,
            "count": args.count,
        },
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - start, 1),
        "statistics": columns,
        "info": info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, separators=(",", ":"))
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    if args.save_tasks:
        np.savez_compressed(
            args.save_tasks,
            **{f"{key}_{i}": v for key, vals in raw.items() for i, v in enumerate(vals)},
        )
    print(json.dumps({"count": args.count, "seconds": payload["seconds"]}))


if __name__ == "__main__":
    main()
