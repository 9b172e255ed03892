"""The runner: reports, resume without duplicates, refusals, errors, plug-ins, the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
from locations import TABLES
from scoring_models import save_tiny_scoring_model
from typer.testing import CliRunner

from mllm_jax.cli import app
from mllm_jax.eval import methods as methods_module
from mllm_jax.eval.baselines import BASELINES
from mllm_jax.eval.methods import MethodUnavailableError, resolve_methods
from mllm_jax.eval.protocol import Protocol
from mllm_jax.eval.results_io import read_log
from mllm_jax.eval.run import RESULTS_LOG, RunDirectoryError, run_evaluation
from mllm_jax.foundation.tables import from_frame, load_csv, load_dataset

DATA = str(TABLES)
SHOTS, SEEDS = [8, 32], [0, 1]
PROTOCOL = Protocol(max_test=100)
TIMINGS = {"fit_seconds", "predict_seconds"}


@pytest.fixture(scope="module")
def datasets():
    return [load_dataset("iris"), load_csv(f"{DATA}/golf_play_dataset_extended.csv.gz")]


def _quick_methods():
    return {"rf": BASELINES["rf"], "majority": BASELINES["majority"]}


def _without_timings(records):
    return sorted(
        (tuple((k, v) for k, v in sorted(r.items()) if k not in TIMINGS) for r in records),
    )


def test_run_writes_every_report(tmp_path, datasets):
    summary = run_evaluation(datasets, _quick_methods(), SHOTS, SEEDS, tmp_path, PROTOCOL)
    n = len(datasets) * len(SHOTS) * len(SEEDS) * 2
    assert (summary.completed, summary.resumed, summary.errors) == (n, 0, [])

    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == n
    assert set(table["method"]) == {"rf", "majority"}
    assert set(table["n_test"]) == {30, 100}  # iris has 30 test rows, golf 219 capped at 100
    assert table["accuracy"].between(0, 1).all()

    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["results"]) == n and results["protocol"]["max_test"] == 100
    averages = results["average_over_datasets"]["accuracy"]
    assert {(a["method"], a["shots"]) for a in averages} == {
        (m, s) for m in ("rf", "majority") for s in SHOTS
    }
    rf32 = (
        table[(table.method == "rf") & (table.shots == 32)]
        .groupby("dataset")["accuracy"]
        .mean()
        .mean()
    )
    assert next(
        a["mean"] for a in averages if (a["method"], a["shots"]) == ("rf", 32)
    ) == pytest.approx(rf32)

    summary_md = (tmp_path / "summary.md").read_text()
    assert "## accuracy, mean over seeds and shared datasets" in summary_md
    assert "| golf_play_dataset_extended | rf |" in summary_md

    for name in (
        "accuracy_iris.png",
        "accuracy_golf_play_dataset_extended.png",
        "accuracy_mean.png",
    ):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


class Interrupt(KeyboardInterrupt):
    pass


def _interrupting(after: int):
    """rf that is 'killed' (KeyboardInterrupt) at its fit number `after`."""
    count = {"fits": 0}

    def make(seed):
        model = BASELINES["rf"](seed)
        fit = model.fit

        def counting_fit(X, y):
            count["fits"] += 1
            if count["fits"] == after:
                raise Interrupt
            return fit(X, y)

        model.fit = counting_fit
        return model

    return make


def test_interrupted_run_resumes_without_duplicates(tmp_path, datasets):
    reference_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = run_evaluation(
        datasets, _quick_methods(), SHOTS, SEEDS, reference_dir, PROTOCOL, write_plots=False
    )

    methods = {"rf": _interrupting(after=5), "majority": BASELINES["majority"]}
    with pytest.raises(Interrupt):
        run_evaluation(datasets, methods, SHOTS, SEEDS, resumed_dir, PROTOCOL, write_plots=False)
    kept, partial = read_log(resumed_dir / RESULTS_LOG)
    assert len(kept) == 8 and not partial  # 4 rf fits done + 4 majority, then the kill
    # A kill during a write leaves half a line; the next run must drop it, not choke on it.
    with open(resumed_dir / RESULTS_LOG, "a") as log:
        log.write('{"dataset": "iris", "seed": 1, "sho')

    summary = run_evaluation(
        datasets, _quick_methods(), SHOTS, SEEDS, resumed_dir, PROTOCOL, write_plots=False
    )
    assert (summary.resumed, summary.completed) == (8, len(straight.records) - 8)
    records, partial = read_log(resumed_dir / RESULTS_LOG)
    keys = [(r["dataset"], r["seed"], r["shots"], r["method"]) for r in records]
    assert len(keys) == len(set(keys)) == len(straight.records) and not partial
    assert _without_timings(records) == _without_timings(straight.records)

    again = run_evaluation(
        datasets, _quick_methods(), SHOTS, SEEDS, resumed_dir, PROTOCOL, write_plots=False
    )
    assert (again.completed, again.resumed) == (0, len(straight.records))
    assert len(read_log(resumed_dir / RESULTS_LOG)[0]) == len(straight.records)


def test_new_methods_and_shots_extend_a_run(tmp_path, datasets):
    run_evaluation(
        datasets[:1], {"rf": BASELINES["rf"]}, [8], [0], tmp_path, PROTOCOL, write_plots=False
    )
    summary = run_evaluation(
        datasets[:1], _quick_methods(), [8, 32], [0], tmp_path, PROTOCOL, write_plots=False
    )
    assert (summary.resumed, summary.completed) == (1, 3)


def test_other_protocol_or_changed_dataset_is_refused(tmp_path, datasets):
    run_evaluation(
        datasets[:1],
        {"majority": BASELINES["majority"]},
        [8],
        [0],
        tmp_path,
        PROTOCOL,
        write_plots=False,
    )
    with pytest.raises(RunDirectoryError, match="another protocol"):
        run_evaluation(
            datasets[:1],
            {"majority": BASELINES["majority"]},
            [8],
            [0],
            tmp_path,
            Protocol(),
            write_plots=False,
        )
    iris = datasets[0]
    changed = from_frame(iris.features.assign(label=iris.labels).iloc[::-1], "label", name="iris")
    with pytest.raises(RunDirectoryError, match="dataset 'iris' differs"):
        run_evaluation(
            [changed],
            {"majority": BASELINES["majority"]},
            [8],
            [0],
            tmp_path,
            PROTOCOL,
            write_plots=False,
        )


class Flaky:
    """A Classifier that fails while `broken` is set."""

    broken = True

    def __init__(self, seed):
        self.inner = BASELINES["majority"](seed)

    def fit(self, X, y):
        if Flaky.broken:
            raise RuntimeError("device out of memory")
        self.inner.fit(X, y)
        self.classes_ = self.inner.classes_
        return self

    def predict_proba(self, X):
        return self.inner.predict_proba(X)


def test_failing_method_is_recorded_and_retried(tmp_path, datasets):
    Flaky.broken = True
    methods = {"flaky": Flaky, "majority": BASELINES["majority"]}
    summary = run_evaluation(
        datasets[:1], methods, [8], [0, 1], tmp_path, PROTOCOL, write_plots=False
    )
    assert len(summary.errors) == 2 and summary.completed == 2
    assert summary.errors[0]["error"] == "RuntimeError: device out of memory"
    assert "## Errors" in (tmp_path / "summary.md").read_text()
    with pytest.raises(RuntimeError, match="out of memory"):
        run_evaluation(
            datasets[:1],
            methods,
            [8],
            [0, 1],
            tmp_path,
            PROTOCOL,
            on_error="raise",
            write_plots=False,
        )

    Flaky.broken = False
    summary = run_evaluation(
        datasets[:1], methods, [8], [0, 1], tmp_path, PROTOCOL, write_plots=False
    )
    assert (summary.completed, summary.resumed, summary.errors) == (2, 2, [])
    assert "## Errors" not in (tmp_path / "summary.md").read_text()
    assert len(pd.read_csv(tmp_path / "results.csv")) == 4


class WrongClasses(Flaky):
    def fit(self, X, y):
        self.inner.fit(X, y)
        self.classes_ = np.arange(7)
        return self


def test_plug_in_classes_are_checked(tmp_path, datasets):
    summary = run_evaluation(
        datasets[:1], {"bad": WrongClasses}, [8], [0], tmp_path, PROTOCOL, write_plots=False
    )
    assert (
        "classes_ [0, 1, 2, 3, 4, 5, 6] must be distinct label codes seen in the shots"
        in summary.errors[0]["error"]
    )


def test_llm_classifier_plugs_in_as_one_more_method(tmp_path, datasets):
    """The real MLLMClassifier on a tiny random Qwen2 checkpoint, beside kNN, through the
    harness: one entry per seed, probabilities the harness could score, and the same
    numbers as the classifier fitted by hand on that entry's shots."""
    from mllm_jax.infer import MLLMClassifier

    model = tmp_path / "model"
    save_tiny_scoring_model(model, 0)
    options = {"chunk_size": 8, "batch_size": 4, "dtype": "float32"}
    methods = resolve_methods(["knn"], model_dir=model, model_options=options)
    protocol = Protocol(max_test=12)
    summary = run_evaluation(
        datasets[:1], methods, [8], [0, 1], tmp_path / "out", protocol, write_plots=False
    )
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert summary.errors == [] and set(table["method"]) == {"knn", "mllm"}
    ours = table[table["method"] == "mllm"].sort_values("seed")
    assert ours["seed"].tolist() == [0, 1] and (ours["n_test"] == 12).all()
    assert np.isfinite(ours["log_loss"]).all()
    # the harness's number is the classifier's own, on the rows the harness drew
    from mllm_jax.eval.protocol import build_plan

    dataset = datasets[0]
    entry = build_plan([dataset], [8], [0], protocol).entries[0]
    (episode,) = entry.episodes
    features = dataset.features.iloc[:, list(entry.columns)]
    clf = MLLMClassifier(str(model), random_state=0, **options)
    clf.fit(features.iloc[episode.train].reset_index(drop=True), dataset.labels[episode.train])
    proba = np.zeros((len(episode.test), dataset.n_classes))
    proba[:, clf.classes_] = clf.predict_proba(features.iloc[episode.test].reset_index(drop=True))
    from mllm_jax.eval.metrics import compute_metrics

    expected = compute_metrics(dataset.labels[episode.test], proba)
    assert ours.iloc[0]["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-9)
    assert ours.iloc[0]["accuracy"] == pytest.approx(expected["accuracy"])


def test_cli_runs_baselines_and_reports_missing_llm(tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "eval",
            "--data",
            "iris",
            "--shots",
            "8,16",
            "--seeds",
            "0",
            "--methods",
            "rf,majority",
            "--out",
            str(out),
            "--no-plots",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "results.csv")) == 4
    assert not (out / "plots").exists()

    monkeypatch.setattr(methods_module, "LLM_PACKAGE", "mllm_jax.no_such_package")
    result = runner.invoke(
        app, ["eval", "--data", "iris", "--out", str(tmp_path / "x"), "--model", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "not available yet" in result.output and "run without --model" in result.output
    with pytest.raises(MethodUnavailableError):
        resolve_methods(["rf"], model_dir=tmp_path)

    for arguments, message in [
        (["--data", "nope.csv"], "nope.csv: no such file"),
        (["--data", "iris", "--methods", "rf,svm"], "unknown methods ['svm']"),
        (["--data", "iris", "--shots", "8,x"], "--shots: expected comma-separated integers"),
        (["--data", "iris", "--protocol", "fancy"], "--protocol must be 'nested' or 'reference'"),
        (["--data", "iris", "--shots", "0"], "shots must be >= 1, got [0]"),
        (["--data", "iris", "--shots", "-8"], "shots must be >= 1, got [-8]"),
    ]:
        result = runner.invoke(app, ["eval", "--out", str(tmp_path / "y"), *arguments])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "y").exists()  # a refused run leaves no output directory
    (tmp_path / "file").write_text("x")  # an --out that is or lies below a file
    for out, message in [
        (tmp_path / "file", "is a file, not a directory"),
        (tmp_path / "file" / "y", "cannot create the directory (Not a directory)"),
    ]:
        result = runner.invoke(app, ["eval", "--data", "iris", "--out", str(out)])
        assert result.exit_code == 2 and f"error: --out {out}" in result.output, result.output
        assert message in result.output


def test_worker_processes_give_the_same_results(tmp_path, datasets):
    args = (datasets, _quick_methods(), SHOTS, SEEDS)
    serial = run_evaluation(*args, tmp_path / "serial", PROTOCOL, write_plots=False)
    parallel = run_evaluation(*args, tmp_path / "parallel", PROTOCOL, write_plots=False, jobs=2)
    assert parallel.errors == [] and parallel.completed == len(serial.records)
    assert _without_timings(parallel.records) == _without_timings(serial.records)
    with pytest.raises(ValueError, match="method 'local' cannot run in worker processes"):
        run_evaluation(
            datasets, {"local": lambda seed: Flaky(seed)}, [8], [0], tmp_path / "x", jobs=2
        )


class _VotesLastClass:
    """A plug-in that decides its labels apart from its probabilities (as MLLMClassifier
    with vote="reference"): probabilities favour the first class, labels are the last."""

    vote = "reference"

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict_details(self, X):
        from types import SimpleNamespace

        k = len(self.classes_)
        proba = np.full((len(X), k), 0.5 / max(k - 1, 1))
        proba[:, 0] = 0.5 if k > 1 else 1.0
        return SimpleNamespace(proba=proba, codes=np.full(len(X), k - 1))

    def predict_proba(self, X):
        raise AssertionError("the harness must read predict_details for a voting method")


def test_a_method_that_votes_is_scored_on_its_labels(tmp_path, datasets):
    dataset = datasets[1]  # golf: its classes are not equally frequent
    run_evaluation(
        [dataset], {"voter": lambda seed: _VotesLastClass()}, [32], [0], tmp_path, PROTOCOL,
        write_plots=False,
    )  # fmt: skip
    (record,), _ = read_log(tmp_path / RESULTS_LOG)
    from mllm_jax.eval.protocol import build_plan

    entry = build_plan([dataset], [32], [0], PROTOCOL).entries[0]
    shots_last = [dataset.labels[e.train].max() for e in entry.episodes]
    truth = dataset.labels[entry.test]
    labels = np.concatenate(
        [np.full(len(e.test), last) for e, last in zip(entry.episodes, shots_last, strict=True)]
    )
    assert set(labels) == {1}  # 32 shots hold both classes
    assert record["accuracy"] == pytest.approx(np.mean(truth == labels))
    assert record["accuracy"] != pytest.approx(np.mean(truth == 0))  # not the argmax
