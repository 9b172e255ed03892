"""The `mllm-jax` command line: the canonical sub-commands, each with its help, the
config + override convention, and defaults that work on a fresh install."""

import json

import pytest
from typer.testing import CliRunner

from mllm_jax.cli import app

CANONICAL = ["generate", "stats", "train", "export", "eval", "predict", "demo"]
WITH_CONFIG = ["train", "demo"]


def _registered() -> list[str]:
    return [command.name for command in app.registered_commands]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_every_command_is_canonical():
    registered = _registered()
    assert len(set(registered)) == len(registered)
    assert sorted(registered) == sorted(CANONICAL)


def test_root_help_lists_the_commands():
    result = _invoke("--help")
    assert result.exit_code == 0, result.output
    for name in _registered():
        assert name in result.output


@pytest.mark.parametrize("name", _registered())
def test_each_command_explains_itself(name):
    result = _invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output
    # A one-line description from the command's docstring, not just the option table.
    first_line = app.registered_commands[_registered().index(name)].callback.__doc__
    assert first_line and first_line.split()[0] in result.output


@pytest.mark.parametrize("name", WITH_CONFIG)
def test_config_commands_take_a_file_and_overrides(name):
    result = _invoke(name, "--help")
    assert "--config" in result.output and "--set" in result.output
    assert "dotted.key=value" in result.output


def test_demo_refuses_a_bad_override_naming_the_key(tmp_path):
    result = _invoke("demo", "--out", str(tmp_path / "run"), "--set", "train.stagse=[]")
    assert result.exit_code == 2
    assert "train.stagse: unknown key" in result.stderr and not result.stdout
    assert not (tmp_path / "run").exists()  # nothing written for a refused config
    (tmp_path / "file").write_text("x")  # --out that is or lies below a file: tracebacks
    for out, message in [
        (tmp_path / "file", "is a file, not a directory"),
        (tmp_path / "file" / "run", "cannot create the directory (Not a directory)"),
    ]:
        # a narrow terminal does not break the line (rich wrapped it at 80 columns)
        result = CliRunner().invoke(app, ["demo", "--out", str(out)], env={"COLUMNS": "40"})
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"error: --out {out}") and line.endswith(message)


def test_train_refuses_a_bad_override_naming_the_key(tmp_path):
    result = _invoke(
        "train", "--config", "configs/train_tiny.yaml", "--set", "optimizer.lr=1", "--set",
        f"run_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "optimizer.lr: unknown key" in result.output


def test_train_refuses_shards_under_the_default_synthetic_kind(tmp_path):
    """data.kind defaults to synthetic: shards listed without kind: shards were ignored
    and the run trained on the toy task (exit 0)."""
    result = _invoke(
        "train", "--config", "configs/train_tiny.yaml", "--set", f"run_dir={tmp_path / 'run'}",
        "--set", "stages.0.data={seed: 1, shards: [corpus/*.array_record]}",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "stages[0].data: data.shards given but data.kind is 'synthetic'" in result.output
    assert "set data.kind: shards" in result.output
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_bad_stop_at_and_a_run_dir_it_cannot_make(tmp_path):
    """--stop-at 0 or negative (ran nothing, exit 0, left a run directory), a run_dir that
    is a file or lies below one (FileExistsError/NotADirectoryError tracebacks): one
    line, exit 2."""
    (tmp_path / "file").write_text("x")
    cases = [
        (["--stop-at", "0"], tmp_path / "run", "stop_at (--stop-at) must be a step >= 1, got 0"),
        (["--stop-at", "-3"], tmp_path / "run", "must be a step >= 1, got -3"),
        ([], tmp_path / "file", f"run_dir {tmp_path / 'file'} is a file, not a directory"),
        ([], tmp_path / "file" / "run", "cannot create the directory (Not a directory)"),
    ]
    for extra, run_dir, message in cases:
        result = _invoke(
            "train", "--config", "configs/train_tiny.yaml", "--set", f"run_dir={run_dir}", *extra
        )
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_stats_defaults_to_the_bundled_tables(tmp_path):
    out = tmp_path / "stats"
    result = _invoke("stats", "--out", str(out), "--rows", "24")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    names = {line["dataset"] for line in lines if not line.get("summary")}
    assert names == {"cmc", "eucalyptus", "golf_play_dataset_extended"}
    assert (out / "stats.png").stat().st_size > 0


def test_stats_reports_bad_input_in_one_line(tmp_path, monkeypatch):
    """A table without a label column, an empty directory, a model directory without
    tokenizer.json, --rows 0 and an edited packaged tokenizer: one line, exit 2, no
    output directory (were tracebacks; --context 0 plotted an empty log axis)."""
    import mllm_jax.encoding.tokens as tokens

    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "stats"
    for args, message in [
        (["--data-dir", str(tmp_path / "tables")], "t.csv: no 'label' column"),
        (["--data-dir", str(tmp_path / "empty")], "no *.csv or *.csv.gz files in"),
        (["--model-dir", str(tmp_path)], f"no tokenizer.json in model directory {tmp_path}"),
        (["--rows", "0"], "--rows and --context must be >= 1, got 0, 32000"),
        (["--context", "0"], "--rows and --context must be >= 1, got 512, 0"),
    ]:
        result = _invoke("stats", "--out", str(out), *args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output
        assert "Traceback" not in result.output
    edited = tmp_path / "tokenizer"
    edited.mkdir()
    text = (tokens.packaged_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8")
    (edited / "tokenizer.json").write_text(text.replace('"Hello"', '"Hellp"', 1), "utf-8")
    monkeypatch.setattr(tokens, "packaged_tokenizer_dir", lambda: edited)
    result = _invoke("stats", "--out", str(out), "--rows", "8")
    assert result.exit_code == 2, result.output
    assert "tokenizer.json has sha256" in result.output and "not the pinned" in result.output
    assert not out.exists()


def test_the_runs_group_has_show():
    assert [group.name for group in app.registered_groups] == ["runs"]
    assert "runs" in _invoke("--help").output
    result = _invoke("runs", "show", "--help")
    assert result.exit_code == 0, result.output
    assert "RUN" in result.output and "--json" in result.output
    assert "A run's stages, checkpoints" in result.output
