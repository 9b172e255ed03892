"""Atomically written outputs get the umask's usual modes, not mkstemp's private ones."""

import os
import stat

import pytest

from mllm_jax.foundation.config import save_config
from mllm_jax.foundation.files import atomic_write_json, current_umask, default_mode
from mllm_jax.model import init_model, preset, save_hf
from mllm_jax.runs.config import TrainConfig


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_are_readable_by_others(tmp_path, umask_022):
    assert current_umask() == 0o022
    save_config(TrainConfig(), tmp_path / "config.yaml")
    atomic_write_json(tmp_path / "manifest.json", {"a": 1})
    save_hf(init_model(preset("tiny"), 0), tmp_path / "model")
    assert mode(tmp_path / "config.yaml") == 0o644
    assert mode(tmp_path / "manifest.json") == 0o644
    assert mode(tmp_path / "model") == 0o755
    assert all(mode(p) == 0o644 for p in (tmp_path / "model").iterdir())


def test_default_mode_follows_the_umask(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    old = os.umask(0o077)
    try:
        default_mode(path)
        assert mode(path) == 0o600
        os.umask(0o002)
        default_mode(path)
        assert mode(path) == 0o664
        default_mode(tmp_path, directory=True)
        assert mode(tmp_path) == 0o775
    finally:
        os.umask(old)


def test_a_peft_adapter_is_readable_by_others(tmp_path, umask_022):
    from mllm_jax.model.lora import LoRAConfig, apply_lora
    from mllm_jax.model.peft import save_peft_adapter

    model = init_model(preset("tiny"), 0)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0), 0)
    save_peft_adapter(model, tmp_path / "adapter")
    assert mode(tmp_path / "adapter") == 0o755
    assert {p.name: mode(p) for p in (tmp_path / "adapter").iterdir()} == {
        p.name: 0o644 for p in (tmp_path / "adapter").iterdir()
    }
