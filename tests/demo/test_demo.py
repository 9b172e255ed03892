"""`mllm-jax demo` end to end on a demo config shrunk to well under a minute of CPU: every
artifact exists and is well-formed (each corpus is a `mllm-jax generate` corpus), and the
exported model loads in transformers with our logits. The generate stage alone, on the
numpy stand-in prior of tests/fake_prior.py: consensus masks, resuming, an empty corpus.
(Ctrl-C and rerun: tests/demo/test_demo_interrupt.py, marked slow.)

The demo runs as a user runs it, in a child process with one CPU device (not the test
session's 8 simulated devices), into a fresh run directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_prior import fake_batches, records, stops_after

from mllm_jax.data.generate import generate
from mllm_jax.data.shards import list_corpus_shards, read_manifests
from mllm_jax.demo.config import CorpusConfig, GenerateConfig, load_demo_config
from mllm_jax.demo.generate import (
    EmptyCorpusError,
    corpus_dir,
    corpus_settings,
    finished_corpus,
    generate_corpus,
)
from mllm_jax.eval.datasets import load_corpus_tables
from mllm_jax.filtering import FilterConfig
from mllm_jax.foundation.tasks import decode_task


def _sampling(**extra):
    return {"min_shots": 8, "max_shots": 32, "max_queries": 4, "token_budget": 1024, **extra}


def shrunk_config(
    steps: tuple[int, int], *, count: int, heldout: int, eval_: dict, generate: dict | None = None
) -> dict:
    """demo.yaml with small corpora and tables, a few steps, smaller evaluation."""

    def stage(name, n, lr, seed, **extra):
        data = {
            "kind": "shards",
            "shards": [f"data/{name}/*.array_record"],
            "seed": seed,
            "pipeline": {"sampling": _sampling(**extra), "seq_len": 1024, "batch_size": 2},
        }
        return {"name": name, "steps": n, "learning_rate": lr, "data": data}

    return {
        "generate": {
            "batch_size": 16,
            "prior": {"rows": 128, **(generate or {}).get("prior", {})},
            "filter": {"n_estimators": 10},
            "workers": (generate or {}).get("workers"),
            "corpora": [
                {"name": "warmup", "start": 0, "count": count, "consensus": True},
                {"name": "full", "start": count, "count": count},
                {"name": "heldout", "start": 1000000, "count": heldout},
            ],
        },
        "train": {
            "stages": [
                stage("warmup", steps[0], 1e-2, 1, consensus_only=True),
                stage("full", steps[1], 5e-3, 2),
            ],
            "validation": {"every": 2, "batches": 1},
            "checkpoint": {"every": 2, "keep": 2},
            "logging": {"every": 1},
        },
        "eval": {"heldout_tables": 1, "max_test": 16, **eval_},
    }


# MLP-SCM tasks only (compiling the tree-SCM family too costs ~17 CPU s; the slow
# interrupt test runs the mixture) and one filter process, to keep the default suite short.
FAST = shrunk_config(
    (2, 2),
    count=16,
    heldout=12,
    eval_={"shots": [8], "methods": ["majority"], "max_test": 10},
    generate={"prior": {"tree_prob": 0.0}, "workers": 1},
)


def write_config(directory: Path, config: dict) -> Path:
    path = directory / "shrunk.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_demo(out: Path, config: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", COLUMNS="120", NO_COLOR="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mllm_jax.cli", "demo", "--out", str(out), "--config",
         str(config), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )  # fmt: skip


def check_artifacts(out: Path, config: dict) -> dict:
    """Asserts every file of a finished demo run directory is there and well-formed;
    returns the report's metrics."""
    steps = sum(s["steps"] for s in config["train"]["stages"])
    shots = {str(s) for s in config["eval"]["shots"]}
    methods = {"mllm", *config["eval"]["methods"]}

    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["generate", "train", "export", "eval", "report"]
    for record in stages.values():
        assert record["seconds"] > 0 and record["cpu_seconds"] >= 0
    assert load_demo_config(out / "demo.yaml") == load_demo_config(write_config(out, config))

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for corpus in config["generate"]["corpora"]:
        # A corpus `mllm-jax generate` wrote: one finished process, its shards readable.
        directory = out / "data" / corpus["name"]
        (manifest,) = read_manifests(directory)
        assert (manifest["start"], manifest["count"]) == (corpus["start"], corpus["count"])
        assert manifest["consensus"] == corpus.get("consensus", False)
        written = manifest["tasks_written"]
        assert written > 0
        assert written + manifest["invalid"] + manifest["rejected"] == corpus["count"]
        shards = list_corpus_shards(directory)
        assert sorted(directory.glob("*.array_record")) == shards
        assert not list(directory.glob(".*")), "a journal or temporary shard was left behind"
        summary = metrics["generate"][corpus["name"]]
        assert (summary["tasks"], summary["accepted"]) == (corpus["count"], written)
        assert summary["rejected_by_reason"] == manifest["rejected_by_reason"]
        assert (summary["consensus_rows_kept"] is not None) == manifest["consensus"]

    for name in ("config.json", "model.safetensors"):
        assert (out / "model" / name).stat().st_size > 0

    train = metrics["train"]
    assert train["steps"] == steps and train["mode"] == "full"
    assert np.isfinite([train["first_loss"], train["final_loss"]]).all()
    # random init: near-uniform over the vocabulary; then training lowers it
    assert train["first_loss"] == pytest.approx(np.log(151936), rel=0.15)
    assert 0 < train["final_loss"] < train["first_loss"]
    # label-only numbers beside the shots' majority (the answer accuracy is mostly frame)
    for key in ("validation_label_accuracy", "validation_majority_accuracy"):
        assert 0.0 <= train[key] <= 1.0
    assert train["validation_label_loss"] > 0 and train["validation_prior_loss"] > 0
    assert set(metrics["eval"]) == {"real", "synthetic"}
    assert set(metrics["eval"]["real"]["tables"]) == {
        "cmc", "eucalyptus", "golf_play_dataset_extended"
    }  # fmt: skip
    assert len(metrics["eval"]["synthetic"]["tables"]) == config["eval"]["heldout_tables"]
    for group in metrics["eval"].values():
        assert group["errors"] == []
        assert set(group["accuracy"]) == methods
        for by_shots in group["accuracy"].values():
            assert set(by_shots) == shots
            assert all(0.0 <= acc <= 1.0 for acc in by_shots.values())
        assert 0.0 <= group["verdict"]["model_mean_accuracy"] <= 1.0
    # The report's means are those of the harness's raw per-table records.
    for name, group in metrics["eval"].items():
        records = [
            json.loads(line)
            for line in (out / "eval" / name / "results.jsonl").read_text().splitlines()
        ]
        for method, by_shots in group["accuracy"].items():
            for shots_, mean in by_shots.items():
                values = [
                    r["accuracy"]
                    for r in records
                    if r["method"] == method and str(r["shots"]) == shots_ and r["status"] == "ok"
                ]
                assert values and mean == pytest.approx(np.mean(values)), (name, method, shots_)
    assert metrics["total_seconds"] == pytest.approx(sum(r["seconds"] for r in stages.values()))
    summary = (out / "report" / "summary.md").read_text()
    assert "## Accuracy" in summary and "majority" in summary and "honest" in summary
    assert "Query labels alone on the held-out validation prompts" in summary
    for plot in ("loss.png", "accuracy.png"):
        assert (out / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return metrics


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = root / "run"
    demo = start_demo(out, write_config(root, FAST))
    output, _ = demo.communicate(timeout=900)
    assert demo.returncode == 0, output
    return out, output


def test_fast_config_is_the_demo_with_fewer_of_everything(tmp_path):
    config = load_demo_config(write_config(tmp_path, FAST))
    assert config.train.model == load_demo_config(None).train.model  # the same tiny Qwen2
    assert config.train.mode == "full" and config.train.total_steps == 4


def test_every_artifact_is_well_formed(demo_run):
    out, output = demo_run
    check_artifacts(out, FAST)
    for stage in ("generate", "train", "export", "eval", "report"):
        assert f"{stage} " in output and "budget" in output  # each stage's timing line
    assert "total" in output and "summary.md" in output


def test_export_loads_in_transformers_and_agrees_with_ours(demo_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from mllm_jax.model import load_hf

    model_dir = demo_run[0] / "model"
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert theirs.config.vocab_size == 151936 and theirs.config.num_hidden_layers == 2
    ids = np.array([[151644, 8948, 198, 16, 11, 17, 91, 15, 151645]], np.int64)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(load_hf(model_dir)(ids.astype(np.int32)), np.float32)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_evaluation_asks_as_many_queries_per_prompt_as_training_showed(tmp_path, monkeypatch):
    import mllm_jax.demo.evaluate as stage
    from mllm_jax.demo.evaluate import run_eval, trained_queries

    config = load_demo_config(write_config(tmp_path, FAST))
    assert trained_queries(config.train) == 4
    assert "chunk_size" not in config.eval.model_options
    seen = {}

    def resolve_methods(names, **kwargs):
        seen.update(kwargs["model_options"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(stage, "resolve_methods", resolve_methods)
    with pytest.raises(RuntimeError, match="stop here"):
        run_eval(tmp_path, tmp_path / "model", config.eval, None, config.train)
    assert seen["chunk_size"] == 4  # the eval stage passes it on as the model's chunk_size


# The generate stage on the stand-in prior: 60-row tasks, learnable when the index is even,
# invalid when it is 3 mod 7.
STAGE = GenerateConfig(
    seed=3,
    batch_size=8,
    tasks_per_shard=4,
    workers=1,
    filter=FilterConfig(n_estimators=5, consensus_folds=3),
    corpora=[CorpusConfig("warmup", 10, 40, consensus=True), CorpusConfig("full", 50, 16)],
)


def test_a_corpus_is_the_generate_corpus_of_its_settings_and_survives_an_interrupt(tmp_path):
    warmup, full = STAGE.corpora
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(out, warmup, STAGE, progress=False, batches=stops_after(3))
    assert finished_corpus(out, "warmup") is None  # nothing half-written looks finished

    manifest = generate_corpus(out, warmup, STAGE, progress=False, batches=fake_batches)
    assert finished_corpus(out, "warmup")["shards"] == manifest["shards"]
    assert finished_corpus(out, "full") is None
    directory = corpus_dir(out, "warmup")
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [s["file"] for s in manifest["shards"]] + ["manifest-p00000.json"]
    )
    # The same bytes `mllm-jax generate --filter --consensus` writes for these settings.
    settings = corpus_settings(warmup, STAGE)
    straight = generate(settings, tmp_path / "straight", progress=False, batches=fake_batches)
    assert records(directory) == records(tmp_path / "straight")
    assert manifest["tasks_written"] == straight["tasks_written"] > 0
    assert manifest["filter"]["consensus"] and manifest["filter"]["n_estimators"] == 5
    assert all(decode_task(r).consensus is not None for r in records(directory))
    tables = load_corpus_tables(directory)  # the eval stage's reader
    assert len(tables) == manifest["tasks_written"]

    other = generate_corpus(out, full, STAGE, progress=False, batches=fake_batches)
    assert not other["consensus"]  # consensus masks only where the corpus asks for them
    assert all(decode_task(r).consensus is None for r in records(corpus_dir(out, "full")))


def test_a_corpus_the_filter_empties_is_a_clear_error_and_not_finished(tmp_path):
    # Task 3 is invalid (3 mod 7): nothing reaches the filter, nothing is written.
    empty = CorpusConfig("empty", 3, 1)
    with pytest.raises(
        EmptyCorpusError,
        match=r"corpus 'empty': the filter accepted none of its 1 tasks \(1 invalid",
    ):
        generate_corpus(tmp_path, empty, STAGE, progress=False, batches=fake_batches)
    assert finished_corpus(tmp_path, "empty") is None
    assert not (corpus_dir(tmp_path, "empty") / "manifest-p00000.json").exists()
