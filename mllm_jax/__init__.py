"""mllm_jax: MachineLearningLM (arXiv 2509.06806) in JAX/Flax.

Stages (one sub-package each): prior -> filtering -> encoding/data -> model/train
-> export -> infer/eval. The README's sections and docs/ describe each stage.
"""

__version__ = "0.1.0"
