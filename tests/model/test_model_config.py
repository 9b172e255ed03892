"""Qwen2Config: presets, HF config.json in both transformers layouts, errors."""

import pytest
from transformers import Qwen2Config as HFQwen2Config

from mllm_jax.model import ConfigError, Qwen2Config, preset
from mllm_jax.model.qwen2 import rope_frequencies


@pytest.mark.parametrize(
    ("name", "vocab", "tied", "billions"),
    [
        ("qwen2.5-0.5b", 151936, True, 0.494),
        ("qwen2.5-1.5b", 151936, True, 1.544),
        ("qwen2.5-3b", 151936, True, 3.086),
        ("qwen2.5-7b", 152064, False, 7.616),
    ],
)
def test_presets_match_published_sizes(name, vocab, tied, billions):
    cfg = preset(name)
    assert (cfg.vocab_size, cfg.tie_word_embeddings) == (vocab, tied)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e6, 1e-6, 32768)
    assert cfg.head_dim == (64 if name == "qwen2.5-0.5b" else 128)
    # Parameter counts from the Qwen2.5 model cards.
    assert cfg.num_parameters() / 1e9 == pytest.approx(billions, abs=0.005)


def test_transformers_4_and_5_layouts_read_the_same():
    legacy = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rope_theta": 1000000.0,
        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": 131072,
    }
    ours = Qwen2Config.from_hf_dict(legacy)
    assert ours.rope_scaling.factor == 4.0 and ours.param_dtype == "bfloat16"
    # transformers 5 re-reads what we write, and we re-read it to the same config.
    written = ours.to_hf_dict()
    hf = HFQwen2Config(
        **{k: v for k, v in written.items() if k not in ("architectures", "model_type")}
    )
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert Qwen2Config.from_hf_dict(hf.to_dict()) == ours
    assert Qwen2Config.from_hf_dict(written) == ours
    inv_freq, attention_factor = rope_frequencies(ours)
    assert inv_freq.shape == (64,) and attention_factor == pytest.approx(0.1 * 1.3862943611 + 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"vocab_size": None}, r"missing required keys \['vocab_size'\]"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    base = preset("tiny").to_hf_dict()
    with pytest.raises(ConfigError, match=message):
        Qwen2Config.from_hf_dict({**base, **change}, source="x/config.json")
