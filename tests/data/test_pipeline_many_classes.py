"""Training batches from tasks with 15 classes: multi-token labels, all in the loss."""

import json
import re

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from mllm_jax.data.pipeline import PipelineConfig, build_pipeline
from mllm_jax.encoding.sampling import SamplingConfig, TaskEncodingError
from mllm_jax.encoding.tokens import PromptTokenizer, TokenKind, load_backend_tokenizer
from mllm_jax.foundation.tasks import Task, encode_task

N_CLASSES = 15


def fifteen_class_task(rng, index):
    rows = 90
    X = rng.normal(size=(rows, 3)).astype(np.float32)
    y = np.concatenate([np.arange(N_CLASSES), rng.integers(0, N_CLASSES, rows - N_CLASSES)])
    y[60:75] = np.arange(N_CLASSES)  # every class among the train rows and the test rows
    return Task(X, y.astype(np.int32), N_CLASSES, 60, np.zeros(3, bool), "mlp", 5, index)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("many") / "tasks-00000.array_record"
    rng = np.random.default_rng(0)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(4):
        writer.write(encode_task(fifteen_class_task(rng, i)))
    writer.close()
    return path


@pytest.fixture(scope="module")
def backend():
    return load_backend_tokenizer()


def batches(shard, backend, max_classes):
    sampling = SamplingConfig(
        min_shots=60, max_shots=60, max_queries=30, token_budget=2048, max_classes=max_classes
    )
    config = PipelineConfig(sampling=sampling, seq_len=2048, batch_size=1, packing=False)
    return iter(
        build_pipeline(
            [shard], config, seed=0, process_index=0, process_count=1,
            tokenizer=PromptTokenizer(backend),
        )
    )  # fmt: skip


def test_fifteen_class_batches_mark_every_label_digit(shard, backend):
    it = batches(shard, backend, max_classes=16)
    multi = 0
    for _ in range(3):
        batch = next(it)
        n = int((batch["segment_ids"][0] == 1).sum())
        ids, targets = batch["input_ids"][0, :n], batch["targets"][0, :n]
        kind, mask = batch["token_kind"][0, :n], batch["loss_mask"][0, :n].astype(bool)
        text = backend.decode(ids.tolist(), skip_special_tokens=False)
        assert f"Label set = {list(range(N_CLASSES))}." in text
        answer = backend.decode(targets[mask].tolist(), skip_special_tokens=False)
        records = json.loads(answer.removesuffix("<|im_end|>"))
        labels = [r["label"] for r in records]
        assert max(labels) >= 10
        # the label tokens of the answer, run by run, spell the labels
        label = kind == TokenKind.LABEL
        assert not (label & ~mask).any()
        edges = np.diff(np.concatenate([[0], label.astype(np.int8), [0]]))
        spans = zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)
        assert [backend.decode(targets[a:b].tolist()) for a, b in spans] == [str(v) for v in labels]
        shots = [int(v) for v in re.findall(r"^[\d,]+\|(\d+)$", text, flags=re.M)]
        assert "".join(backend.decode([t]) for t in targets[kind == TokenKind.SHOT_LABEL]) == (
            "".join(str(v) for v in shots)
        )
        multi += sum(v >= 10 for v in labels)
    assert multi > 0


def test_the_default_max_classes_refuses_fifteen_classes_naming_the_setting(shard, backend):
    with pytest.raises(TaskEncodingError, match="sampling.max_classes"):
        next(batches(shard, backend, max_classes=10))
