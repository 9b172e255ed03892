"""`mllm-jax export` on a real (tiny) LoRA training run: the merged checkpoint loads in
transformers and the adapter in peft, both with the trained model's logits; an output
place that cannot be written is a one-line error that leaves nothing behind."""

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_checkpoints import hf_logits
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mllm_jax.cli import app
from mllm_jax.export import ADAPTER_CONFIG, save_peft_adapter
from mllm_jax.foundation import directories
from mllm_jax.foundation.config import load_config
from mllm_jax.foundation.directories import OutputDirectoryError
from mllm_jax.model import init_model, load_hf, preset, save_hf
from mllm_jax.model.lora import LoRAConfig, LoRAParam, apply_lora, copy_adapters, lora_layers
from mllm_jax.runs.config import TrainConfig
from mllm_jax.runs.loading import load_trained
from mllm_jax.train.loop import train

DATA = "synthetic: {batch_size: 8, seq_len: 32}"
CONFIG = f"""
mode: lora
lora: {{rank: 4, alpha: 12.0}}
model: {{overrides: {{num_hidden_layers: 1, vocab_size: 256}}, compute_dtype: float32}}
stages:
  - {{name: only, steps: 2, learning_rate: 0.05, data: {{seed: 1, {DATA}}}}}
max_answer_tokens: 8
checkpoint: {{every: 2, keep: 1, async_save: false}}
logging: {{progress: false}}
"""
IDS = np.random.default_rng(0).integers(0, 256, (2, 10)).astype(np.int32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_run")
    (root / "run.yaml").write_text(CONFIG)
    config = load_config(TrainConfig, root / "run.yaml", [f"run_dir={root / 'run'}"])
    train(config)
    return root / "run"


def _ours(run):
    """The trained adapters on the base as stored (float32), and its logits."""
    trained, _ = load_trained(run)
    assert all(np.any(np.asarray(lin.lora.b.get_value())) for lin in lora_layers(trained).values())
    model = load_hf(run / "base")
    copy_adapters(trained, model)
    trained_lora = dict(nnx.to_flat_state(nnx.state(trained, LoRAParam)))
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        np.testing.assert_array_equal(
            np.asarray(var.get_value()), np.asarray(trained_lora[path].get_value())
        )
    return np.asarray(model(jnp.asarray(IDS)))


@pytest.mark.slow
def test_export_command_writes_merged_and_adapter_matching_transformers_and_peft(run, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--run",
            str(run),
            "--merged",
            str(tmp_path / "m"),
            "--adapter",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "merged model ->" in result.output and "PEFT adapter ->" in result.output
    expected = _ours(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(merged, IDS), expected, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    assert (tmp_path / "a" / ADAPTER_CONFIG).exists()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    np.testing.assert_allclose(hf_logits(peft_model, IDS), expected, atol=1e-4)


@pytest.mark.slow
def test_export_command_names_a_missing_step(run, tmp_path):
    args = ["export", "--run", str(run), "--adapter", str(tmp_path / "a"), "--step", "99"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no checkpoint 99" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to export"),
        (["--adapter", "{tmp}/a", "--step", "last"], "--step must be a step number"),
        (["--adapter", "{tmp}/a"], "not a training run directory (no config.yaml)"),
    ],
)
def test_export_command_usage_errors(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_export_of_a_missing_or_unreadable_checkpoint_is_a_one_line_error(run, tmp_path):
    """No checkpoint yet, a damaged one (meta deleted), a --dtype that is no float: one
    line, exit 2, nothing written (the damaged step and the dtype were tracebacks, no
    checkpoint said 'no checkpoint  (have [])'); a training run given to the classifier
    with a damaged checkpoint is a ModelLoadError."""
    from mllm_jax.infer import MLLMClassifier
    from mllm_jax.infer.loading import ModelLoadError

    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (step,) = (damaged / "checkpoints").iterdir()
    shutil.rmtree(step / "meta")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    out = tmp_path / "out"
    for run_dir, extra, message in [
        (empty, [], f"{empty / 'checkpoints'}: no checkpoint: the run has not saved one yet"),
        (empty, ["--step", "best"], f"{empty / 'best'}: no best checkpoint"),
        (damaged, [], f"checkpoint {step} cannot be read (KeyError: "),
        (run, ["--dtype", "float7"], "--dtype must be a floating type such as float32"),
        (run, ["--dtype", "int8"], "got 'int8'"),
    ]:
        result = _export(run_dir, "--merged", out, *extra)
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error: ") and message in line, line
        assert not out.exists()
    with pytest.raises(ModelLoadError, match=f"checkpoint {step} cannot be read"):
        MLLMClassifier(str(damaged)).fit(np.zeros((4, 2)), np.arange(4) % 2)


# ------------------------------------------------------------------ unwritable places


@contextlib.contextmanager
def read_only(path: Path):
    """Makes directory `path` refuse new, renamed and removed entries for this process.
    chmod does not stop root: as root the directory is made immutable (chattr +i, which
    stops root too; skipped where the filesystem or the container does not allow it)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a read-only directory")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"running as root and chattr +i fails: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _tree(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory` (hidden ones included)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _export(run, flag: str, out: Path, *extra: str):
    return CliRunner().invoke(app, ["export", "--run", str(run), flag, str(out), *extra])


@pytest.mark.parametrize("flag", ["--merged", "--adapter"])
def test_export_into_a_read_only_directory_is_a_one_line_error(run, tmp_path, flag):
    parent = tmp_path / "read-only"
    parent.mkdir()
    with read_only(parent):
        result = _export(run, flag, parent / "out")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: cannot write {parent / 'out'}: directory {parent} is not writable "
        "(nothing was written)"
    )
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("read_only_place", ["output", "parent"])
def test_export_overwrite_of_a_read_only_output_leaves_it_and_nothing_else(
    run, tmp_path, read_only_place
):
    """--overwrite on an existing output that may not be replaced (the directory itself
    read-only, or its parent): one line, the output as it was, no .tmp-/.old- siblings."""
    parent = tmp_path / "exports"
    out = parent / "merged"
    assert _export(run, "--merged", out).exit_code == 0
    before = _tree(parent)
    again = _export(run, "--merged", out)
    assert again.exit_code == 2 and "exists and is not empty; pass overwrite" in again.output
    with read_only(out if read_only_place == "output" else parent):
        result = _export(run, "--merged", out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    where = f"directory {out if read_only_place == 'output' else parent} is not writable"
    assert where in result.output and str(out) in result.output
    assert [p.name for p in parent.iterdir()] == ["merged"]
    assert _tree(parent) == before


def test_export_below_a_file_is_a_one_line_error(run, tmp_path):
    (tmp_path / "file").write_text("x")
    result = _export(run, "--adapter", tmp_path / "file" / "out")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: cannot write {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is not a directory"
    )


@pytest.fixture(scope="module")
def small_model():
    return init_model(preset("tiny", num_hidden_layers=1), 0)


def _failing_rename(monkeypatch, fails):
    """os.rename in the atomic writer, raising EPERM for the (source, target) `fails`
    accepts: what the kernel answers for a directory it may not move (a sticky parent
    of another owner), which no permission check beforehand tells."""
    real = os.rename

    def rename(source, target):
        if fails(Path(source), Path(target)):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(source))
        return real(source, target)

    monkeypatch.setattr(directories.os, "rename", rename)


@pytest.mark.parametrize("step", ["move_existing_aside", "move_new_into_place"])
def test_replacing_that_fails_midway_leaves_the_old_output_and_nothing_else(
    small_model, tmp_path, monkeypatch, step
):
    out = save_hf(small_model, tmp_path / "model")
    before = _tree(tmp_path)
    if step == "move_existing_aside":
        _failing_rename(monkeypatch, lambda source, target: source == out)
    else:
        _failing_rename(monkeypatch, lambda source, target: source.name.startswith(".model.tmp-"))
    with pytest.raises(OutputDirectoryError, match=rf"cannot replace {out}: .*left as it was"):
        save_hf(small_model, out, "bfloat16", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert _tree(tmp_path) == before


def test_an_immutable_output_the_check_misses_is_refused_by_the_move(
    small_model, tmp_path, monkeypatch
):
    """The kernel's own refusal (not a stand-in): an immutable output, the check
    beforehand told it is writable, so the move aside is what fails."""
    out = save_hf(small_model, tmp_path / "model")
    before = _tree(tmp_path)
    monkeypatch.setattr(directories, "_writable_dir", lambda path: True)
    with read_only(out), pytest.raises(OutputDirectoryError, match="cannot be moved"):
        save_peft_adapter(_with_lora(small_model), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert _tree(tmp_path) == before


def test_a_write_that_fails_leaves_no_directory_it_made(tmp_path):
    with (
        pytest.raises(RuntimeError, match="disk full"),
        directories.atomic_directory(tmp_path / "a" / "b" / "out") as tmp,
    ):
        (tmp / "part").write_text("half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def _with_lora(model):
    copy = nnx.clone(model)
    apply_lora(copy, LoRAConfig(rank=2), key=0)
    return copy
