"""Synthetic classification tasks from structural causal models (the TabICL v1 prior) in JAX.

from mllm_jax.prior import PriorConfig, sample_tasks
batch = sample_tasks(seed=0, start=0, count=256, config=PriorConfig())
tasks = batch.to_tasks()  # mllm_jax.foundation.tasks.Task objects
"""

from mllm_jax.prior.batch import TaskBatch
from mllm_jax.prior.config import PriorConfig, PriorConfigError
from mllm_jax.prior.sampler import iter_task_batches, sample_tasks

__all__ = ["PriorConfig", "PriorConfigError", "TaskBatch", "iter_task_batches", "sample_tasks"]
