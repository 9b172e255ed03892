"""`mllm-jax demo`: the whole pipeline on a laptop CPU in minutes.

    from mllm_jax.demo import load_demo_config, run_demo
    metrics = run_demo(load_demo_config(None, ["eval.shots=[8,32]"]), Path("runs/demo"))

Generates and filters synthetic tasks, trains a tiny Qwen2 from scratch on them through
the real prompt format and data pipeline, exports it as a Hugging Face checkpoint,
evaluates it against the baselines on held-out synthetic tasks and bundled real tables,
and writes a report. See `mllm_jax.demo.run` for the run directory.
"""

from mllm_jax.demo.config import DemoConfig, load_demo_config
from mllm_jax.demo.run import RunDirectoryError, run_demo

__all__ = ["DemoConfig", "RunDirectoryError", "load_demo_config", "run_demo"]
