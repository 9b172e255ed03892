"""`mllm-jax predict` and `mllm-jax eval --model` end to end on a tiny random model."""

import json

import numpy as np
import pandas as pd
import pytest
from scoring_models import save_tiny_scoring_model
from typer.testing import CliRunner

from mllm_jax.cli import app

# The shapes of tests/infer/test_infer.py, so a run of both compiles each program once.
OPTIONS = [
    "--chunk-size",
    "3",
    "--batch-size",
    "2",
    "--prefill-chunk",
    "1024",
    "--dtype",
    "float32",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("infer_cli") / "tiny"
    save_tiny_scoring_model(directory, 0)
    return directory


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 19
    frame = pd.DataFrame(
        {
            "size": rng.normal(5, 2, n).round(2),
            "colour": rng.choice(["red", "green", "?"], n),  # "?" reads as missing
            "count": rng.integers(0, 40, n),
            "label": rng.choice(["no", "yes"], n),
        }
    )
    directory = tmp_path_factory.mktemp("infer_csv")
    frame.iloc[:12].to_csv(directory / "train.csv", index=False)
    test = frame.iloc[12:].copy()
    test.loc[test.index[0], "label"] = "maybe"  # a label the training file never shows
    test.to_csv(directory / "test.csv", index=False)
    return directory


def test_predict_writes_probabilities_and_predictions(ckpt, csvs, tmp_path):
    out = tmp_path / "preds.csv"
    metrics = tmp_path / "metrics.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            *("--model", str(ckpt), "--train", str(csvs / "train.csv")),
            *("--test", str(csvs / "test.csv"), "--out", str(out)),
            *("--metrics", str(metrics), *OPTIONS),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # progress, description and summary all on stderr
    preds = pd.read_csv(out)
    assert list(preds.columns) == ["proba_no", "proba_yes", "prediction", "label"]
    assert len(preds) == 7
    proba = preds[["proba_no", "proba_yes"]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(preds["prediction"], np.array(["no", "yes"])[proba.argmax(1)])
    assert "labels never seen in" in result.output and "'maybe'" in result.output
    summary = json.loads(metrics.read_text().splitlines()[-1])
    assert summary["rows"] == 7 and summary["unseen_label_rows"] == 1
    truth = preds["label"].to_numpy()
    assert summary["accuracy"] == pytest.approx(np.mean(preds["prediction"].to_numpy() == truth))
    assert summary["rows_per_second"] > 0 and summary["prompt_tokens"] > 0


def test_predict_refuses_bad_input(ckpt, csvs, tmp_path):
    runner = CliRunner()
    test = pd.read_csv(csvs / "test.csv").drop(columns=["count"])
    test.to_csv(tmp_path / "short.csv", index=False)
    infinite = pd.read_csv(csvs / "test.csv")
    infinite.loc[2, "size"] = np.inf
    infinite.to_csv(tmp_path / "inf.csv", index=False)
    out = tmp_path / "preds.csv"
    base = ["predict", "--model", str(ckpt), "--train", str(csvs / "train.csv"), "--out", str(out)]
    cases = [
        (["--test", str(tmp_path / "short.csv")], "missing ['count'], unexpected []"),
        (["--test", str(csvs / "test.csv"), "--target", "nope"], "no target column 'nope'"),
        (["--test", str(tmp_path / "absent.csv")], "absent.csv: no such file"),
        (["--test", str(csvs / "test.csv"), "--mode", "vote"], "mode must be one of"),
        (["--test", str(tmp_path)], f"{tmp_path}: not a file"),
        # named by file like the training file's (was "X: column 'size' holds ...")
        (["--test", str(tmp_path / "inf.csv")], "inf.csv: column 'size' has 1 infinite values"),
        (["--test", str(csvs / "test.csv"), "--dtype", "float8"], "dtype must be a floating"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, [*base, *arguments])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not out.exists()  # nothing half-written


def test_predict_refuses_an_output_place_it_cannot_write_before_the_model_runs(
    ckpt, csvs, tmp_path, monkeypatch
):
    """--out below a file (was a FileExistsError after the whole prediction), in a
    directory that is not writable, --train naming a directory, a --metrics file that is
    an input, the output or below a file: one line, exit 2, inputs untouched."""
    import mllm_jax.infer.command as command

    (tmp_path / "file").write_text("x")
    before = (csvs / "train.csv").read_bytes()
    base = ["predict", "--model", str(ckpt), "--test", str(csvs / "test.csv"), *OPTIONS]
    train = ["--train", str(csvs / "train.csv")]
    cases = [
        ([*train, "--out", str(tmp_path / "file" / "p.csv")], f"{tmp_path / 'file'} is not a"),
        (["--train", str(tmp_path), "--out", str(tmp_path / "p.csv")], f"{tmp_path}: not a file"),
        # --metrics is appended to after the work: was written into the training CSV, or
        # failed after the predictions were written
        (
            [*train, "--out", str(tmp_path / "p.csv"), "--metrics", str(csvs / "train.csv")],
            "is the --train file",
        ),
        (
            [*train, "--out", str(tmp_path / "p.csv"), "--metrics", str(tmp_path / "p.csv")],
            "is the --out file",
        ),
        (
            [*train, "--out", str(tmp_path / "p.csv"), "--metrics", str(tmp_path / "file" / "m")],
            f"--metrics {tmp_path / 'file' / 'm'}: {tmp_path / 'file'} is not a directory",
        ),
    ]
    for arguments, message in cases:
        result = CliRunner().invoke(app, [*base, *arguments])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output
    monkeypatch.setattr(command, "_writable", lambda directory: False)
    result = CliRunner().invoke(app, [*base, *train, "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2, result.output
    assert f"directory {tmp_path} is not writable" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert before == (csvs / "train.csv").read_bytes()


def test_eval_with_model_end_to_end(ckpt, tmp_path):
    out = tmp_path / "eval"
    options = "chunk_size=3,batch_size=2,prefill_chunk=1024,dtype=float32"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            *("--data", "iris", "--shots", "8", "--seeds", "0", "--methods", "majority"),
            *("--max-test", "7", "--out", str(out), "--no-plots", "--fail-fast"),
            *("--model", str(ckpt), "--model-options", options, "--permuted-shots"),
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "results.csv")
    assert set(table["method"]) == {"majority", "mllm", "mllm_permuted"}
    row = table[table["method"] == "mllm"].iloc[0]
    assert row["n_test"] == 7 and 0.0 <= row["accuracy"] <= 1.0
    assert np.isfinite(row["log_loss"])
    # the control sees the same rows with the shot labels shuffled: another prompt
    control = table[table["method"] == "mllm_permuted"].iloc[0]
    assert control["n_test"] == 7 and control["log_loss"] != row["log_loss"]

    bad = CliRunner().invoke(
        app,
        [
            *("eval", "--data", "iris", "--out", str(tmp_path / "x"), "--model", str(ckpt)),
            *("--model-options", "chunks=3"),
        ],
    )
    assert bad.exit_code == 2 and "unknown model options ['chunks']" in bad.output


def test_predict_protects_its_inputs_and_existing_outputs(ckpt, csvs, tmp_path):
    runner = CliRunner()
    train, test = csvs / "train.csv", csvs / "test.csv"
    before = {p: p.read_bytes() for p in (train, test)}
    base = ["predict", "--model", str(ckpt), "--train", str(train), "--test", str(test)]
    for out, flag in ((test, "--test"), (train, "--train")):
        result = runner.invoke(app, [*base, "--out", str(out), "--overwrite", *OPTIONS])
        assert result.exit_code == 2, result.output
        assert f"is the {flag} file" in result.output
    existing = tmp_path / "old.csv"
    existing.write_text("keep me\n")
    result = runner.invoke(app, [*base, "--out", str(existing), *OPTIONS])
    assert result.exit_code == 2 and "pass --overwrite" in result.output
    assert existing.read_text() == "keep me\n"
    assert {p: p.read_bytes() for p in (train, test)} == before
    result = runner.invoke(app, [*base, "--out", str(existing), "--overwrite", *OPTIONS])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(existing).columns[-1] == "label"
