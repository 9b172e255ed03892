"""Test session setup.

JAX reads XLA_FLAGS once, when its CPU backend starts, so the simulated devices for the
sharding tests are requested here, before any test module imports jax. Single-device
tests are unaffected: unsharded arrays live on device 0.
"""

import os

import pytest
from hf_checkpoints import save_hf_model

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    """One random tiny transformers Qwen2 checkpoint (`hf_checkpoints.TINY_HF_CONFIG`,
    seed 21), saved once per test run for every test that only reads it."""
    directory = tmp_path_factory.mktemp("tiny_hf")
    save_hf_model(directory, seed=21)
    return directory
