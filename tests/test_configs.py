"""The shipped configs load strictly, say what the docs say, and bad ones fail at load
naming the key and the reason."""

import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from mllm_jax.assets import demo_config
from mllm_jax.demo.config import DemoConfig, load_demo_config, resolve_paths
from mllm_jax.foundation.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    to_dict,
)
from mllm_jax.model.config import REMAT_NAMES
from mllm_jax.runs.config import RematPolicy, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RECIPES = ["qwen2.5-7b-lora.yaml", "qwen2.5-1.5b-lora.yaml", "qwen2.5-0.5b-lora.yaml"]


def _load(path: Path):
    if path.name.startswith(("demo", "mini")):
        return load_demo_config(path)
    return load_config(TrainConfig, path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = _load(path)
    assert isinstance(config, DemoConfig | TrainConfig)


def _leaves(data: Any, where: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every scalar of nested YAML data."""
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in _leaves(v, (*where, k))]
    if isinstance(data, list):
        return [leaf for i, v in enumerate(data) for leaf in _leaves(v, (*where, i))]
    return [(where, data)]


def test_the_packaged_yaml_is_the_demo_and_its_only_copy():
    packaged = load_yaml(demo_config())
    default = load_demo_config(None)
    # `mllm-jax demo` without --config runs the packaged file, which sets every value the
    # demo chooses on its own: the dataclasses hold none of them.
    assert default == from_dict(DemoConfig, packaged)
    with pytest.raises(TypeError, match="required keyword-only arguments"):
        DemoConfig()
    resolved = to_dict(default)
    for path, value in _leaves(packaged):
        node = resolved
        for key in path:
            node = node[key]
        assert node == value, path
    # The repository's configs/demo.yaml only points at it: the same demo.
    assert load_yaml(CONFIGS / "demo.yaml") == {}
    assert load_demo_config(CONFIGS / "demo.yaml") == default


def test_the_packaged_yaml_ships_in_the_wheel():
    # setuptools copies the package-data globs (relative to the package) into the wheel.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mllm_jax"]
    shipped = {p.resolve() for pattern in patterns for p in (ROOT / "mllm_jax").glob(pattern)}
    assert demo_config().resolve() in shipped


def test_paper_recipe():
    config = load_config(TrainConfig, CONFIGS / "qwen2.5-7b-lora.yaml")
    assert config.mode == "lora"
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (8, 16.0, 0.0)
    assert set(config.lora.targets) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert config.model.base.endswith("Qwen2.5-7B-Instruct")
    assert [(s.name, s.learning_rate) for s in config.stages] == [
        ("warmup", 1e-5),
        ("full_1", 1e-7),
        ("full_2", 1e-6),
    ]
    assert config.optimizer.warmup_ratio == 0.05
    assert config.optimizer.min_lr_ratio == 0.0  # cosine down to 0, as HF's schedule
    assert config.grad_accum == 8 and config.checkpoint.every == 100
    for stage in config.stages:
        pipeline = stage.data.pipeline
        assert pipeline["sampling"]["token_budget"] == 32000
        assert pipeline["seq_len"] == 32768
        assert pipeline["packing"] is False  # one task per sequence, as the reference
        assert stage.epochs == 1 and stage.steps is None  # one epoch per stage, as the paper
        assert pipeline["sampling"].get("consensus_only", False) == (stage.name == "warmup")


@pytest.mark.parametrize("name", RECIPES[1:])
def test_single_gpu_variants_follow_the_recipe(name):
    paper = to_dict(load_config(TrainConfig, CONFIGS / RECIPES[0]))
    variant = to_dict(load_config(TrainConfig, CONFIGS / name))
    for key in ("mode", "lora", "optimizer", "grad_accum", "remat", "max_answer_tokens"):
        assert variant[key] == paper[key], key
    for ours, theirs in zip(variant["stages"], paper["stages"], strict=True):
        assert (ours["name"], ours["learning_rate"]) == (theirs["name"], theirs["learning_rate"])
        assert ours["data"]["pipeline"]["sampling"] == theirs["data"]["pipeline"]["sampling"]
    assert variant["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    size = name.split("-")[1].upper()
    assert variant["model"]["base"].endswith(f"Qwen2.5-{size}-Instruct")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stagse=[]"], r"train\.stagse: unknown key \(did you mean 'stages'\?\)"),
        (["train.stages.0.steps=many"], r"train\.stages\[0\]\.steps: expected an integer"),
        (["train.stages.0.steps=0"], r"steps must be >= 1"),
        (["train.stages.5.steps=1"], r"train\.stages\.5: the list has 2 items"),
        (["generate.prior.min_features=20"], r"generate\.prior: min_features=20 > max_features"),
        (["generate.corpora.0.count=0"], r"generate\.corpora\[0\]: corpus 'warmup': need"),
        (["generate.corpora.1.start=10"], r"corpora 'warmup' and 'full' overlap"),
        (["generate.filter.max_features=cube"], r"generate\.filter\.max_features"),
        (["eval.heldout=nope"], r"eval\.heldout: no corpus named 'nope'"),
        (["eval.shots=[]"], r"shots must be a non-empty list"),
        (["budgets.train=-1"], r"budgets: must be positive"),
        (["budgets.trian=10"], r"budgets: unknown stages \['trian'\]"),
        (
            ["train.stages.1.data.shards=[data/missing/*.array_record]"],
            r"train\.stages\[1\]\.data: 'data/missing/\*\.array_record' reads corpus 'missing'",
        ),
        (
            ["generate.prior.max_classes=20"],
            r"train\.stages\[0\]\.data\.pipeline\.sampling\.max_classes is 10, below "
            r"generate\.prior\.max_classes=20",
        ),
        (
            ["train.stages.1.data.shards=[data/full]"],
            r"'data/full' names the corpus directory; .* 'data/full/\*\.array_record'",
        ),
    ],
)
def test_bad_demo_configs_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_demo_config(None, overrides)


def test_bad_config_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIGS / "qwen2.5-7b-lora.yaml").read_text().replace("rank: 8", "rnak: 8"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: lora\.rnak: unknown key"):
        load_config(TrainConfig, path)
    demo = tmp_path / "demo.yaml"
    demo.write_text("train:\n  mode: lorra\n")
    with pytest.raises(ConfigError, match=r"demo\.yaml: train\.mode: 'lorra' is not one of"):
        load_demo_config(demo)


@pytest.mark.parametrize("name", REMAT_NAMES)
def test_every_model_remat_policy_is_a_valid_train_setting(name):
    """The train config's `remat` accepts exactly the names the model implements."""
    assert from_dict(TrainConfig, {"remat": name}).remat == name
    assert set(typing.get_args(RematPolicy)) == set(REMAT_NAMES)


def test_partial_demo_file_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("train:\n  stages:\n    - {name: only, steps: 3, learning_rate: 1.0e-3}\n")
    config = load_demo_config(path, ["eval.shots=[8]"])
    assert [s.name for s in config.train.stages] == ["only"]  # lists replace
    assert config.train.model == load_demo_config(None).train.model  # mappings merge
    assert config.eval.shots == [8]


def test_overrides_index_lists():
    data = {"stages": [{"steps": 1}, {"steps": 2}]}
    assert apply_overrides(data, ["stages.1.steps=5", "stages.-2.steps=7"]) == {
        "stages": [{"steps": 7}, {"steps": 5}]
    }
    assert data == {"stages": [{"steps": 1}, {"steps": 2}]}  # the input is not changed
    with pytest.raises(ConfigError, match="stages.x: the list has 2 items"):
        apply_overrides(data, ["stages.x.steps=1"])
    with pytest.raises(ConfigError, match="stages.0.steps is a value, not a section"):
        apply_overrides(data, ["stages.0.steps.x=1"])


def test_demo_paths_resolve_under_the_output_directory(tmp_path):
    train = resolve_paths(load_demo_config(None), tmp_path)
    assert train.run_dir == str(tmp_path / "train")
    assert train.stages[0].data.shards == [str(tmp_path / "data/warmup/*.array_record")]
    assert train.validation.data.shards == [str(tmp_path / "data/heldout/*.array_record")]
    absolute = load_demo_config(None, ["train.run_dir=/elsewhere/run"])
    assert resolve_paths(absolute, tmp_path).run_dir == "/elsewhere/run"
