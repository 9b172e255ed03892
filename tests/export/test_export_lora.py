"""LoRA export checked against transformers and peft: merged HF checkpoint, PEFT adapter
out (loaded by peft) and in (made by peft), round trip, bad input, atomic writes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_checkpoints import hf_logits
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from mllm_jax.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_peft_adapter,
    save_merged_hf,
    save_peft_adapter,
)
from mllm_jax.model import init_model, load_hf, peft, preset
from mllm_jax.model.lora import LoRAConfig, LoRAError, LoRAParam, apply_lora, lora_layers

FORWARD = nnx.jit(lambda model, ids: model(ids))
IDS = np.random.default_rng(0).integers(0, 160, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_checkpoint):
    return tiny_hf_checkpoint


def _torch_base(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _randomize_b(model, key=7, std=0.3):
    for i, linear in enumerate(lora_layers(model).values()):
        b = linear.lora.b
        b.set_value(jax.random.normal(jax.random.fold_in(jax.random.key(key), i), b.shape) * std)


@pytest.fixture(scope="module")
def trained(hf_dir):
    """Our model from the HF base with adapters on every default target, B non-zero (as
    after training), rank 4 / alpha 12 so the scale is not 2; its logits."""
    model = load_hf(hf_dir)
    apply_lora(model, LoRAConfig(rank=4, alpha=12.0), key=3)
    _randomize_b(model)
    return model, np.asarray(FORWARD(model, jnp.asarray(IDS)))


def test_merged_export_loads_in_transformers_with_our_lora_logits(trained, hf_dir, tmp_path):
    model, logits = trained
    assert np.abs(logits - hf_logits(_torch_base(hf_dir), IDS)).max() > 1e-2  # LoRA matters
    out = save_merged_hf(model, tmp_path / "merged")
    assert not (out / ADAPTER_CONFIG).exists()
    torch_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(torch_model, IDS), logits, atol=1e-4)
    assert all(not lin.lora.merged for lin in lora_layers(model).values())  # not mutated


def test_peft_adapter_files_have_peft_names_shapes_and_config(trained, tmp_path):
    model, _ = trained
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="some/base")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    expected = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 12,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": "some/base",
        "target_modules": sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    }
    assert {k: config[k] for k in expected} == expected
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert len(tensors) == 2 * 7 * model.config.num_hidden_layers
    q = model.layers[1].self_attn.q_proj
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, q.in_features) and b.shape == (q.out_features, 4)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(q.lora.a.get_value()).T)
    np.testing.assert_array_equal(b, np.asarray(q.lora.b.get_value()).T)


def test_peft_loads_our_adapter_with_our_logits(trained, hf_dir, tmp_path):
    model, logits = trained
    out = save_peft_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(_torch_base(hf_dir), str(out)).eval()
    np.testing.assert_allclose(hf_logits(peft_model, IDS), logits, atol=1e-4)


def test_peft_made_adapter_imports_with_peft_logits(hf_dir, tmp_path):
    """An adapter trained elsewhere: peft makes it (non-zero B, its own r/alpha, a subset
    of modules and layers); our import reproduces peft's logits."""
    torch.manual_seed(5)
    config = LoraConfig(
        r=6,
        lora_alpha=9,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        layers_to_transform=[1],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(_torch_base(hf_dir), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.eval()
    expected = hf_logits(peft_model, IDS)
    peft_model.save_pretrained(str(tmp_path / "theirs"))

    ours = load_hf(hf_dir)
    paths = load_peft_adapter(ours, tmp_path / "theirs")
    assert paths == [
        "layers.1.mlp.down_proj",
        "layers.1.mlp.up_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]
    adapter = ours.layers[1].mlp.up_proj.lora
    assert adapter.rank == 6 and adapter.scale == 1.5 and adapter.a.dtype == jnp.float32
    assert np.abs(expected - hf_logits(_torch_base(hf_dir), IDS)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(FORWARD(ours, jnp.asarray(IDS))), expected, atol=1e-4)

    # Exported again, the adapter needs a regex for its layer subset; peft reads it back.
    out = save_peft_adapter(ours, tmp_path / "again")
    target = json.loads((out / ADAPTER_CONFIG).read_text())["target_modules"]
    assert isinstance(target, str) and "layers\\.1\\." in target
    again = PeftModel.from_pretrained(_torch_base(hf_dir), str(out)).eval()
    np.testing.assert_allclose(hf_logits(again, IDS), expected, atol=1e-4)


def test_round_trip_through_peft_format_is_exact(trained, hf_dir, tmp_path):
    model, logits = trained
    out = save_peft_adapter(model, tmp_path / "adapter")
    back = load_hf(hf_dir)
    assert load_peft_adapter(back, out) == list(lora_layers(model))
    ours = dict(nnx.to_flat_state(nnx.state(model, LoRAParam)))
    for path, var in nnx.to_flat_state(nnx.state(back, LoRAParam)):
        np.testing.assert_array_equal(
            np.asarray(var.get_value()), np.asarray(ours[path].get_value())
        )
    np.testing.assert_array_equal(np.asarray(FORWARD(back, jnp.asarray(IDS))), logits)


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def adapter_dir(trained, tmp_path):
    return save_peft_adapter(trained[0], tmp_path / "adapter")


def _edit_config(directory, **changes):
    file = directory / ADAPTER_CONFIG
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(peft_type="IA3"), "peft_type is 'IA3'"),
        (dict(use_dora=True), "use_dora"),
        (dict(use_rslora=True), "use_rslora"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out"),
        (dict(bias="all"), "bias 'all'"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
        (dict(r=0), "r must be"),
        (dict(target_modules=["q_proj", "qkv_proj", "fc1"]), r"\['qkv_proj', 'fc1'\] name no"),
        (dict(target_modules=["q_proj"]), "tensors not targeted"),
    ],
)
def test_bad_adapter_config_is_refused(hf_dir, adapter_dir, changes, message):
    _edit_config(adapter_dir, **changes)
    model = load_hf(hf_dir)
    with pytest.raises(LoRAError, match=message):
        load_peft_adapter(model, adapter_dir)
    assert not lora_layers(model)  # nothing half-attached


def test_missing_files_are_named(hf_dir, adapter_dir, tmp_path):
    model = load_hf(hf_dir)
    with pytest.raises(LoRAError, match="adapter directory not found"):
        load_peft_adapter(model, tmp_path / "nowhere")
    (adapter_dir / ADAPTER_WEIGHTS).rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(LoRAError, match="only safetensors"):
        load_peft_adapter(model, adapter_dir)
    (adapter_dir / ADAPTER_CONFIG).unlink()
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_peft_adapter(model, adapter_dir)


def test_adapter_for_another_base_is_refused(adapter_dir):
    """Same module names, other widths: the shape error names the tensor."""
    other = init_model(preset("tiny", vocab_size=160, hidden_size=32, num_attention_heads=2))
    with pytest.raises(
        LoRAError, match=r"lora_A\.weight has shape \(4, \d+\), this model.*another base"
    ):
        load_peft_adapter(other, adapter_dir)
    assert not lora_layers(other)


def test_incomplete_or_foreign_tensors_are_refused(hf_dir, adapter_dir):
    file = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_file(str(file))
    model = load_hf(hf_dir)
    b_key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != b_key}, str(file))
    with pytest.raises(LoRAError, match="lacking lora_A or lora_B.*layers.0.mlp.up_proj"):
        load_peft_adapter(model, adapter_dir)
    save_file(
        {**tensors, "base_model.model.model.embed_tokens.lora_A.weight": tensors[b_key]}, str(file)
    )
    with pytest.raises(LoRAError, match="embed_tokens.*not a linear layer"):
        load_peft_adapter(model, adapter_dir)
    apply_lora(model, LoRAConfig(targets=("q_proj",)), 0)
    save_file(tensors, str(file))
    with pytest.raises(LoRAError, match="already has a LoRA adapter"):
        load_peft_adapter(model, adapter_dir)


def test_exports_are_atomic_and_do_not_overwrite(trained, tmp_path, monkeypatch):
    model, _ = trained
    target = save_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_peft_adapter(model, target)
    before = (target / ADAPTER_WEIGHTS).read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(model, target, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(model, tmp_path / "fresh")
    # The old export is intact, no partial directory, no temporary left behind.
    assert (target / ADAPTER_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_export_without_adapters_is_an_error(hf_dir, tmp_path):
    model = load_hf(hf_dir)
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        save_peft_adapter(model, tmp_path / "a")
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        save_merged_hf(model, tmp_path / "m")
    assert not list(tmp_path.iterdir())
