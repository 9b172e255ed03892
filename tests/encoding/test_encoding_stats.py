"""`mllm-jax stats`: token counts against the tokenizer, outputs on disk."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mllm_jax.cli import app
from mllm_jax.encoding.stats import table_token_stats
from mllm_jax.encoding.tokens import PromptTokenizer, load_backend_tokenizer


@pytest.fixture(scope="module")
def backend():
    return load_backend_tokenizer()


@pytest.fixture()
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            "x": rng.normal(size=80).round(4),
            "color": rng.choice(["red", "green"], 80),
            "label": rng.choice(["yes", "no"], 80),
        }
    ).to_csv(tmp_path / "small.csv", index=False)
    pd.DataFrame({"a": rng.integers(0, 3, 60), "label": rng.integers(0, 2, 60)}).to_csv(
        tmp_path / "ints.csv.gz", index=False
    )
    return tmp_path


def test_counts_equal_the_tokenizer(data_dir, backend):
    stats = table_token_stats(data_dir / "small.csv", PromptTokenizer(backend), rows=50, seed=1)
    table = pd.read_csv(data_dir / "small.csv")
    sample = table.iloc[np.random.default_rng(1).permutation(len(table))[:50]]
    csv_tokens = len(backend.encode(sample.to_csv(index=False, header=False)).ids)
    assert stats.csv_tokens_per_row == round(csv_tokens / 50, 2)
    assert stats.features == 2 and stats.text_features == 1 and stats.rows_sampled == 50
    # ours: "v,color|label" with v in 0..~1000 -> at most 3 digit tokens + separators
    assert 4 <= stats.ours_tokens_per_row <= 9
    assert stats.ours_rows_per_context == int(32000 // stats.ours_tokens_per_row)
    assert stats.ratio == pytest.approx(stats.csv_tokens_per_row / stats.ours_tokens_per_row)


def test_command_writes_jsonl_and_png(data_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["stats", "--data-dir", str(data_dir), "--out", str(out), "--rows", "40"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "stats.jsonl").read_text().splitlines()]
    assert [x.get("dataset") for x in lines[:2]] == ["small", "ints"]
    assert lines[-1]["summary"] and lines[-1]["datasets"] == 2
    assert (out / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rows per context" in result.output


def test_missing_data_dir_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["stats", "--data-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_natural_language_rows_are_tabllm_lines_of_the_raw_values(data_dir, backend):
    """The paper's comparator: `name is value, ..., Label is label` per row, with the raw
    values as the CSV prints them, counted by the tokenizer."""
    stats = table_token_stats(data_dir / "small.csv", PromptTokenizer(backend), rows=50, seed=1)
    table = pd.read_csv(data_dir / "small.csv")
    sample = table.iloc[np.random.default_rng(1).permutation(len(table))[:50]]
    codes = {"no": 0, "yes": 1}
    text = "".join(
        f"x is {x}, color is {color}, Label is {codes[label]}\n"
        for x, color, label in sample[["x", "color", "label"]].itertuples(index=False)
    )
    assert stats.natural_tokens_per_row == round(len(backend.encode(text).ids) / 50, 2)
    assert stats.natural_rows_per_context == int(32000 // stats.natural_tokens_per_row)
    assert stats.natural_ratio == pytest.approx(
        stats.natural_tokens_per_row / stats.ours_tokens_per_row
    )
    # Names repeated on every row: natural language costs more than CSV and than ours.
    assert stats.natural_tokens_per_row > stats.csv_tokens_per_row > stats.ours_tokens_per_row
    assert stats.ours_natural_tokens_per_row > stats.ours_tokens_per_row
