from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mllm_jax.foundation.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int


@dataclass(frozen=True)
class Run:
    optim: Optim = field(default_factory=Optim)
    stages: list[Stage] = field(default_factory=list)
    out: Path = Path("runs/x")
    seed: int | None = None
    verbose: bool = False


def test_builds_nested_dataclasses_and_round_trips():
    data = {
        "optim": {"lr": 3, "betas": [0.8, 0.9]},
        "stages": [{"name": "warmup", "steps": 10}, {"name": "full", "steps": 20}],
        "out": "runs/y",
        "seed": 7,
    }
    run = from_dict(Run, data)
    assert run.optim == Optim(lr=3.0, betas=(0.8, 0.9))
    assert isinstance(run.optim.lr, float)
    assert run.stages[1] == Stage("full", 20)
    assert run.out == Path("runs/y")
    assert from_dict(Run, to_dict(run)) == run


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lrr": 1.0}}, r"optim\.lrr: unknown key \(did you mean 'lr'\?\)"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number, got 'fast'"),
        ({"optim": {"schedule": "linear"}}, r"optim\.schedule: 'linear' is not one of"),
        ({"optim": {"lr": -1.0}}, r"optim: lr must be positive"),
        ({"stages": [{"name": "a"}]}, r"stages\[0\]\.steps: required key is missing"),
        ({"stages": [{"name": "a", "steps": 1.5}]}, r"stages\[0\]\.steps: expected an integer"),
        ({"verbose": "yes"}, r"verbose: expected true/false"),
        ({"optim": {"betas": [0.9]}}, r"optim\.betas: expected 2 items, got 1"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Run, data)


def test_overrides_parse_yaml_scalars_and_create_sections():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=2e-5", "seed=3", "verbose=true"])
    assert data == {"optim": {"lr": 2e-5}, "seed": 3, "verbose": True}
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 5e-1\nseed: 1\n")
    run = load_config(Run, path, ["optim.schedule=constant"])
    assert run.optim == Optim(lr=0.5, schedule="constant")
    path.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML"):
        load_config(Run, path)
    path.write_text("seeed: 1\n")
    with pytest.raises(ConfigError, match=r"run.yaml: seeed: unknown key"):
        load_config(Run, path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Run, tmp_path / "missing.yaml")


def test_a_bad_override_is_reported_against_the_overrides_not_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 5e-1\n")
    with pytest.raises(
        ConfigError, match=r"^--set optim\.lr=-1: optim: lr must be positive"
    ) as error:
        load_config(Run, path, ["optim.lr=-1"])
    assert "run.yaml" not in str(error.value)
    with pytest.raises(ConfigError, match=r"^--set sed=1: sed: unknown key"):
        load_config(Run, path, ["sed=1"])


def test_save_config_is_atomic_and_reloadable(tmp_path):
    run = Run(optim=Optim(lr=0.25), stages=[Stage("a", 1)], seed=None)
    path = tmp_path / "sub" / "resolved.yaml"
    save_config(run, path)
    assert load_config(Run, path) == run
    assert [p.name for p in path.parent.iterdir()] == ["resolved.yaml"]
