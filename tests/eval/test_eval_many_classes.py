"""Tables with more than 10 classes are evaluated, the in-context learner included."""

import json

import numpy as np
import pandas as pd
from scoring_models import save_tiny_scoring_model
from typer.testing import CliRunner

from mllm_jax.cli import app
from mllm_jax.eval.baselines import BASELINES
from mllm_jax.eval.protocol import Protocol
from mllm_jax.eval.run import RUN_FILE, run_evaluation
from mllm_jax.foundation.tables import from_frame

N_CLASSES = 15


def fifteen_class_frame(rows=150):
    rng = np.random.default_rng(0)
    label = np.arange(rows) % N_CLASSES
    return pd.DataFrame({"x": label + rng.normal(0, 0.3, rows), "z": rng.normal(size=rows)}).assign(
        label=label
    )


def test_cli_reports_a_fifteen_class_table_for_the_llm(tmp_path):
    model = tmp_path / "model"
    save_tiny_scoring_model(model, 0)
    csv = tmp_path / "fifteen.csv"
    fifteen_class_frame().to_csv(csv, index=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "eval", "--data", str(csv), "--shots", "32", "--seeds", "0",
            "--methods", "majority", "--model", str(model), "--max-test", "15",
            "--model-options", "chunk_size=8,batch_size=2,dtype=float32",
            "--out", str(out), "--no-plots",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "results.csv")
    assert set(table["method"]) == {"majority", "mllm"}
    ours = table[table["method"] == "mllm"]
    assert len(ours) == 1 and (ours["n_test"] == 15).all()
    assert (ours["shot_classes"] > 10).all()  # two-token labels among the shots
    assert np.isfinite(ours["log_loss"]).all() and ours["accuracy"].between(0, 1).all()
    assert json.loads((out / RUN_FILE).read_text())["skipped"] == []


def test_a_run_that_skipped_the_table_resumes_and_adds_it(tmp_path):
    """max_classes only chooses the tables: a run directory of the paper's limit (the old
    default, 10) resumes under no limit and evaluates the table it skipped."""
    fifteen = from_frame(fifteen_class_frame(), "label", name="fifteen")
    methods = {"majority": BASELINES["majority"]}
    first = run_evaluation([fifteen], methods, [8], [0], tmp_path, Protocol(max_classes=10))
    assert first.completed == 0 and [s.dataset for s in first.skipped] == ["fifteen"]
    again = run_evaluation([fifteen], methods, [8], [0], tmp_path, Protocol())
    assert again.completed == 1 and again.skipped == ()
    assert json.loads((tmp_path / RUN_FILE).read_text())["skipped"] == []
