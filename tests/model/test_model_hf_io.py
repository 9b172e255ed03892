"""HF checkpoint round trips (ours <-> transformers) and bad input."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_checkpoints import hf_logits, save_hf_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from mllm_jax.model import CheckpointError, ConfigError, init_model, load_hf, preset, save_hf
from mllm_jax.model import hf as hf_module

FORWARD = nnx.jit(lambda model, ids: model(ids))
IDS = np.random.default_rng(0).integers(0, 160, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    untied = tmp_path_factory.mktemp("hf_untied")
    tied = tmp_path_factory.mktemp("hf_tied")
    save_hf_model(untied, seed=10)
    save_hf_model(tied, seed=11, tie_word_embeddings=True, num_key_value_heads=1)
    return {"untied": untied, "tied": tied}


def _tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_save_hf_loads_in_transformers_with_same_logits(tmp_path):
    model = init_model(preset("tiny", vocab_size=160, initializer_range=0.2), key=1)
    save_hf(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["dtype"] == "float32"
    generation = json.loads((tmp_path / "ours" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    torch_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    np.testing.assert_allclose(
        np.asarray(FORWARD(model, jnp.asarray(IDS))), hf_logits(torch_model, IDS), atol=1e-4
    )


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_hf_to_ours_to_hf_gives_identical_tensors(hf_dirs, tmp_path, kind):
    source = hf_dirs[kind]
    save_hf(load_hf(source), tmp_path / "again")
    before, after = _tensors(source), _tensors(tmp_path / "again")
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["tie_word_embeddings"] is (kind == "tied")


def test_sharded_bfloat16_export_round_trips(hf_dirs, tmp_path):
    model = load_hf(hf_dirs["untied"])
    out = save_hf(model, tmp_path / "sharded", dtype="bfloat16", max_shard_bytes=40_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_hf(out)
    assert back.config.param_dtype == "bfloat16"
    ours = dict(nnx.to_flat_state(nnx.state(model)))
    for path, var in nnx.to_flat_state(nnx.state(back)):
        expected = np.asarray(ours[path].get_value()).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(var.get_value()), expected)
    torch_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(
        hf_logits(torch_model, IDS),
        np.asarray(FORWARD(load_hf(out, dtype="float32"), jnp.asarray(IDS))),
        atol=1e-4,
    )


# ------------------------------------------------------------------------- bad input


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_files(hf_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_hf(tmp_path / "nope")
    ckpt = _copy(hf_dirs["untied"], tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_hf(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_hf(ckpt)


def test_index_naming_a_missing_file(hf_dirs, tmp_path):
    ckpt = save_hf(load_hf(hf_dirs["untied"]), tmp_path / "sharded", max_shard_bytes=40_000)
    second = sorted(ckpt.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=second.name):
        load_hf(ckpt)


def test_truncated_safetensors(hf_dirs, tmp_path):
    ckpt = _copy(hf_dirs["untied"], tmp_path)
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(ckpt)


def test_another_architecture(hf_dirs, tmp_path):
    ckpt = _copy(hf_dirs["untied"], tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json.*'llama'"):
        load_hf(ckpt)


def test_shape_mismatch_names_the_tensor(hf_dirs, tmp_path):
    ckpt = _copy(hf_dirs["untied"], tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape"):
        load_hf(ckpt)


def test_missing_and_unexpected_tensors(hf_dirs, tmp_path):
    ckpt = _copy(hf_dirs["untied"], tmp_path)
    file = ckpt / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"lacks tensors \['model\.layers\.1\.self_attn\.k_proj\.bias'\]"
    ):
        load_hf(ckpt)
    tensors["model.layers.0.self_attn.k_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.k_norm.weight'"
    ):
        load_hf(ckpt)


def test_interrupted_export_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    model = load_hf(hf_dirs["untied"])
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path / "export", max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []
    # An existing export is kept intact when the replacement fails.
    monkeypatch.setattr(hf_module, "save_file", save_file)
    save_hf(model, tmp_path / "export")
    with pytest.raises(FileExistsError):
        save_hf(model, tmp_path / "export")
    calls.clear()
    monkeypatch.setattr(hf_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path / "export", max_shard_bytes=40_000, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" in set(f.keys())
