"""Random-forest filters for synthetic tasks, run in host processes beside the generator.

Task level (:func:`filter_task`): keep a task only where a forest fit on its train split
beats chance and majority baselines on its test split without collapsing onto one class.
Sample level (:func:`consensus_mask`): keep the rows a forest predicts correctly out of
fold (the warm-up corpus). :class:`FilterPool` / :func:`filter_stream` run both over a
stream of tasks in worker processes, in order, surviving worker crashes.
"""

from mllm_jax.filtering.config import FilterConfig
from mllm_jax.filtering.consensus import consensus_mask
from mllm_jax.filtering.metrics import ForestMetrics, forest_metrics
from mllm_jax.filtering.pool import FilteredTask, FilterPool, filter_stream
from mllm_jax.filtering.report import FilterReport
from mllm_jax.filtering.result import FilterResult, Reason
from mllm_jax.filtering.task_filter import annotate, apply_filters, filter_task

__all__ = [
    "FilterConfig",
    "FilterPool",
    "FilterReport",
    "FilterResult",
    "FilteredTask",
    "ForestMetrics",
    "Reason",
    "annotate",
    "apply_filters",
    "consensus_mask",
    "filter_stream",
    "filter_task",
    "forest_metrics",
]
