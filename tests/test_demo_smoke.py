"""`mllm-jax demo` end to end, as a user runs it (a fresh process)."""

import json
import subprocess
import sys

from safetensors.numpy import load_file


def test_demo_command_writes_a_checkpoint_and_generates(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mllm_jax.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "generate" in proc.stdout
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["roundtrip_max_abs_diff"] == 0.0
    assert 3 <= metrics["generated_tokens"] <= 36
    checkpoint = out / "tiny-qwen2"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].shape == (
        config["vocab_size"],
        config["hidden_size"],
    )
    assert not list(out.glob(".tiny-qwen2.tmp-*"))
