"""`mllm-jax stats`: how many table rows fit a context, our encoding vs plain CSV text and
vs natural-language serialisation.

For each real dataset (a CSV with a ``label`` column), a random sample of rows is written
two ways and tokenized with the Qwen2.5 tokenizer:

- ours: the prompt's training rows, ``v1,...,vF|label`` with the numbers encoded (column
  statistics from the sample itself, labels mapped to 0..n-1), one row per line;
- CSV: the same rows' raw values as ``pandas.to_csv`` prints them (no header, no index),
  label included;
- reference as printed: our rows with ``pandas2_floats=True``, i.e. what the reference's
  code prints under its pinned pandas 2.3.2 (``512.0`` in float-typed columns);
- natural language: TabLLM's serialisation of the same raw values,
  ``name is value, ..., Label is label`` (the reference's "tabllm" row format, with the
  values as the CSV prints them): the comparator of the paper's claim;
- ours in natural language: that format with our encoded values (the reference's
  "tabllm" prompt style).

Tokens per row is the block's token count over the rows; rows per context is the
context (default 32,000 tokens) over that. The paper claims 3-6x more examples per
context than natural-language serialisation.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mllm_jax.encoding.table import encode_table
from mllm_jax.encoding.tokens import PromptTokenizer
from mllm_jax.foundation.files import atomic_path, atomic_write_bytes


@dataclass(frozen=True)
class TableTokenStats:
    """Token cost of one dataset's rows, ours vs CSV."""

    dataset: str
    rows_sampled: int
    features: int
    text_features: int
    ours_tokens_per_row: float
    csv_tokens_per_row: float
    ours_rows_per_context: int
    csv_rows_per_context: int
    reference_printed_tokens_per_row: float
    natural_tokens_per_row: float
    natural_rows_per_context: int
    ours_natural_tokens_per_row: float

    @property
    def ratio(self) -> float:
        """How many times more rows fit a context with our encoding than as CSV."""
        return self.csv_tokens_per_row / self.ours_tokens_per_row

    @property
    def natural_ratio(self) -> float:
        """How many times more rows fit a context with our encoding than in natural
        language (the paper's comparison)."""
        return self.natural_tokens_per_row / self.ours_tokens_per_row


def natural_language_rows(names: Sequence[str], cells: Sequence[Sequence[str]], labels) -> str:
    """TabLLM's serialisation: one ``name is value, ..., Label is label`` line per row."""
    lines = (
        ", ".join(f"{name} is {value}" for name, value in zip(names, row, strict=True))
        + f", Label is {label}"
        for row, label in zip(cells, labels, strict=True)
    )
    return "\n".join(lines) + "\n"


def table_token_stats(
    path: str | os.PathLike,
    tokenizer: PromptTokenizer,
    *,
    rows: int = 512,
    context: int = 32000,
    seed: int = 0,
    label_column: str = "label",
) -> TableTokenStats:
    """Tokens per row of one dataset, ours vs plain CSV, on a seeded sample of rows."""
    table = pd.read_csv(path)
    if label_column not in table.columns:
        raise ValueError(f"{path}: no {label_column!r} column")
    rng = np.random.default_rng(seed)
    sample = table.iloc[rng.permutation(len(table))[: min(rows, len(table))]]
    sample = sample.reset_index(drop=True)
    X = sample.drop(columns=label_column)
    classes = {v: k for k, v in enumerate(sorted(table[label_column].unique()))}
    y = sample[label_column].map(classes).to_numpy()

    def rows_tokens(pandas2_floats: bool) -> tuple[int, list[list[str]]]:
        features = encode_table(X, X.iloc[:1], pandas2_floats=pandas2_floats)
        cells = features.cells("train").tolist()
        lines = (",".join(row) + f"|{label}" for row, label in zip(cells, y, strict=True))
        return len(tokenizer.text_ids("\n".join(lines) + "\n")), cells

    ours_tokens, cells = rows_tokens(False)
    reference_tokens, _ = rows_tokens(True)
    csv_text = sample.to_csv(index=False, header=False)
    csv_tokens = len(tokenizer.text_ids(csv_text))
    # The raw values exactly as the CSV prints them (missing: empty), for natural language.
    raw_text = X.to_csv(index=False, header=False)
    raw_cells = (
        pd.read_csv(
            io.StringIO(raw_text), header=None, dtype=str, keep_default_na=False
        ).values.tolist()
        if X.shape[1]
        else [[] for _ in range(len(X))]
    )
    names = [str(name) for name in X.columns]
    natural_tokens = len(tokenizer.text_ids(natural_language_rows(names, raw_cells, y)))
    ours_natural_tokens = len(tokenizer.text_ids(natural_language_rows(names, cells, y)))

    n = len(sample)
    ours_per_row = ours_tokens / n
    csv_per_row = csv_tokens / n
    natural_per_row = natural_tokens / n
    text_features = 0
    if not all(isinstance(v, str) and v.isdigit() for row in cells for v in row):
        numeric = pd.DataFrame(cells).apply(pd.to_numeric, errors="coerce").notna().all()
        text_features = int((~numeric).sum())
    return TableTokenStats(
        dataset=Path(path).name.removesuffix(".gz").removesuffix(".csv"),
        rows_sampled=n,
        features=X.shape[1],
        text_features=text_features,
        ours_tokens_per_row=round(ours_per_row, 2),
        csv_tokens_per_row=round(csv_per_row, 2),
        ours_rows_per_context=int(context // ours_per_row),
        csv_rows_per_context=int(context // csv_per_row),
        reference_printed_tokens_per_row=round(reference_tokens / n, 2),
        natural_tokens_per_row=round(natural_per_row, 2),
        natural_rows_per_context=int(context // natural_per_row),
        ours_natural_tokens_per_row=round(ours_natural_tokens / n, 2),
    )


def plot_stats(stats: Sequence[TableTokenStats], path: Path, context: int) -> None:
    """Rows per context, ours vs CSV, one pair of bars per dataset (sorted by ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(stats, key=lambda s: s.ratio)
    x = np.arange(len(order))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(10, len(order) * 0.16), 8), gridspec_kw={"height_ratios": [3, 2]}
    )
    top.bar(x - 0.2, [s.ours_rows_per_context for s in order], 0.4, label="ours (0..999 + |)")
    top.bar(x + 0.2, [s.csv_rows_per_context for s in order], 0.4, label="plain CSV")
    top.set_yscale("log")
    top.set_ylabel(f"rows per {context:,}-token context")
    top.set_xticks(x, [s.dataset[:18] for s in order], rotation=90, fontsize=5)
    top.legend()
    ratios = [s.ratio for s in order]
    bottom.bar(x, ratios, color="tab:green")
    bottom.axhline(np.median(ratios), color="black", lw=1, ls="--",
                   label=f"median {np.median(ratios):.2f}x")  # fmt: skip
    bottom.set_ylabel("ours / CSV rows per context")
    bottom.set_xticks(x, [s.dataset[:18] for s in order], rotation=90, fontsize=5)
    bottom.legend()
    fig.suptitle("Qwen2.5 tokens: compact encoding vs plain CSV, real datasets")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as temporary:
            fig.savefig(temporary, dpi=150)
    finally:
        plt.close(fig)


def run_stats(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: PromptTokenizer,
    *,
    rows: int = 512,
    context: int = 32000,
    seed: int = 0,
) -> list[TableTokenStats]:
    """Stats for every ``*.csv`` / ``*.csv.gz`` in ``data_dir``; writes ``stats.jsonl``
    (one line per dataset, then a summary line) and ``stats.png`` to ``out_dir``."""
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    paths = sorted(Path(data_dir).glob("*.csv")) + sorted(Path(data_dir).glob("*.csv.gz"))
    if not paths:
        raise FileNotFoundError(f"no *.csv or *.csv.gz files in {data_dir}")
    stats = [
        table_token_stats(p, tokenizer, rows=rows, context=context, seed=seed)
        for p in track(paths, description="tokenizing datasets")
    ]
    out = Path(out_dir)  # created once every table was read: a bad one leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    ratios = np.array([s.ratio for s in stats])
    natural_ratios = np.array([s.natural_ratio for s in stats])
    summary = {
        "summary": True,
        "datasets": len(stats),
        "context": context,
        "rows_sampled_max": rows,
        "seed": seed,
        "ratio_median": round(float(np.median(ratios)), 3),
        "ratio_mean": round(float(ratios.mean()), 3),
        "ratio_min": round(float(ratios.min()), 3),
        "ratio_max": round(float(ratios.max()), 3),
        "natural_ratio_median": round(float(np.median(natural_ratios)), 3),
        "natural_ratio_min": round(float(natural_ratios.min()), 3),
        "natural_ratio_max": round(float(natural_ratios.max()), 3),
        "natural_ratio_p10": round(float(np.percentile(natural_ratios, 10)), 3),
        "natural_ratio_p90": round(float(np.percentile(natural_ratios, 90)), 3),
        "ours_tokens_per_row_median": float(np.median([s.ours_tokens_per_row for s in stats])),
        "natural_tokens_per_row_median": float(
            np.median([s.natural_tokens_per_row for s in stats])
        ),
        "csv_tokens_per_row_median": float(np.median([s.csv_tokens_per_row for s in stats])),
        "reference_printed_tokens_per_row_median": float(
            np.median([s.reference_printed_tokens_per_row for s in stats])
        ),
    }
    lines = [
        json.dumps(
            {**asdict(s), "ratio": round(s.ratio, 3), "natural_ratio": round(s.natural_ratio, 3)}
        )
        for s in stats
    ]
    atomic_write_bytes(
        out / "stats.jsonl", ("\n".join([*lines, json.dumps(summary)]) + "\n").encode()
    )
    plot_stats(stats, out / "stats.png", context)

    table = Table(title=f"Tokens per row and rows per {context:,}-token context")
    for name in ("dataset", "feat", "text", "ours tok/row", "CSV tok/row", "ref. printed",
                 "NL tok/row", "ours rows", "CSV rows", "NL rows", "vs CSV",
                 "vs NL"):  # fmt: skip
        table.add_column(name, justify="left" if name == "dataset" else "right")
    for s in stats:
        table.add_row(
            s.dataset[:40], str(s.features), str(s.text_features), f"{s.ours_tokens_per_row:.1f}",
            f"{s.csv_tokens_per_row:.1f}", f"{s.reference_printed_tokens_per_row:.1f}",
            f"{s.natural_tokens_per_row:.1f}", str(s.ours_rows_per_context),
            str(s.csv_rows_per_context), str(s.natural_rows_per_context), f"{s.ratio:.2f}x",
            f"{s.natural_ratio:.2f}x",
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"median {summary['ratio_median']}x more rows per context than plain CSV "
        f"(min {summary['ratio_min']}x, max {summary['ratio_max']}x), "
        f"median {summary['natural_ratio_median']}x more than natural language "
        f"(TabLLM style; min {summary['natural_ratio_min']}x, max {summary['natural_ratio_max']}x); "
        f"wrote {out / 'stats.jsonl'} and {out / 'stats.png'}"
    )
    return stats
