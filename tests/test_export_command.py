"""`mllm-jax export` on a real (tiny) LoRA training run: the merged checkpoint loads in
transformers and the adapter in peft, both with the trained model's logits."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mllm_jax.cli import app
from mllm_jax.config import load_config
from mllm_jax.export import ADAPTER_CONFIG
from mllm_jax.model import load_hf
from mllm_jax.model.lora import LoRAParam, copy_adapters, lora_layers
from mllm_jax.model.testing import hf_logits
from mllm_jax.train.config import TrainConfig
from mllm_jax.train.loop import load_trained, train

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
