"""Task shards on disk and the grain pipelines that read them."""

from mllm_jax.foundation.tasks import Task, TaskRecordError, decode_task, encode_task

__all__ = ["Task", "TaskRecordError", "decode_task", "encode_task"]
