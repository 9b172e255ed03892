"""The grain pipeline: format, answers and statistics, consensus, host sharding, resume."""

import json
import re

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from mllm_jax.data.pipeline import (
    PipelineConfig,
    build_pipeline,
    iterator_state,
    restore_iterator_state,
)
from mllm_jax.encoding.pack import BATCH_KEYS
from mllm_jax.encoding.prompt import SYSTEM_PROMPT
from mllm_jax.encoding.sampling import SamplingConfig, TaskEncodingError
from mllm_jax.encoding.tokens import PromptTokenizer, load_backend_tokenizer
from mllm_jax.foundation.tasks import Task, encode_task

N_TASKS = 40
SAMPLING = SamplingConfig(min_shots=8, max_shots=64, max_queries=10, token_budget=4096)


def make_task(rng, index):
    """Task ``index`` has 5 + index features (so a prompt names its task) and labels
    0/1 on consensus rows, 2 on the others."""
    rows = int(rng.integers(40, 120))
    n_features = 5 + index
    X = rng.normal(size=(rows, n_features)).astype(np.float32) * 3 + 1
    consensus = rng.random(rows) < 0.8
    consensus[:3] = True
    consensus[-3:] = True
    y = np.where(consensus, rng.integers(0, 2, rows), 2).astype(np.int32)
    categorical = np.zeros(n_features, dtype=bool)
    return Task(X, y, 3, int(rows * 0.7), categorical, "mlp", 11, index, consensus=consensus)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    tasks = [make_task(rng, i) for i in range(N_TASKS)]
    paths = []
    for s in range(2):
        path = root / f"tasks-{s:05d}.array_record"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for task in tasks[s::2]:
            writer.write(encode_task(task))
        writer.close()
        paths.append(path)
    return paths, {t.n_features: t for t in tasks}


@pytest.fixture(scope="module")
def backend():
    return load_backend_tokenizer()


@pytest.fixture(scope="module")
def fast(backend):
    return PromptTokenizer(backend)


def pipeline(shards, fast, **overrides):
    paths, _ = shards
    settings = {"sampling": SAMPLING, "seq_len": 4096, "batch_size": 2, "packing_bins": 4}
    settings.update(overrides)
    seed = settings.pop("seed", 3)
    hosts = settings.pop("hosts", (0, 1))
    config = PipelineConfig(**settings)
    return build_pipeline(
        paths, config, seed=seed, process_index=hosts[0], process_count=hosts[1], tokenizer=fast
    )


def segments(batch):
    """Yields (row, start, stop) of every packed sequence in a batch."""
    for r, seg in enumerate(batch["segment_ids"]):
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()
            yield r, int(where[0]), int(where[-1]) + 1


def parse(text):
    """(n_features, label set, train rows, train labels, answer ids/labels) of a prompt."""
    n_features = int(re.search(r"Each sample = (\d+) features", text).group(1))
    classes = json.loads(re.search(r"Label set = (\[[\d, ]*\])", text).group(1))
    train = re.findall(r"^([\d,]+)\|(\d+)$", text, flags=re.M)
    rows = np.array([[int(v) for v in line.split(",")] for line, _ in train])
    labels = [int(label) for _, label in train]
    return n_features, classes, rows, labels


def test_batches_hold_whole_valid_sequences(shards, fast, backend):
    _, tasks = shards
    it = iter(pipeline(shards, fast))
    checked = 0
    for _ in range(3):
        batch = next(it)
        assert set(batch) == set(BATCH_KEYS)
        assert all(v.shape == (2, 4096) for v in batch.values())
        for r, start, stop in segments(batch):
            ids = batch["input_ids"][r, start:stop]
            text = backend.decode(ids.tolist(), skip_special_tokens=False)
            assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
            assert text.endswith("<|im_end|>\n")
            # canonical: the ids are exactly what the tokenizer makes of this text
            assert backend.encode(text, add_special_tokens=False).ids == ids.tolist()
            np.testing.assert_array_equal(
                batch["positions"][r, start:stop], np.arange(stop - start)
            )
            np.testing.assert_array_equal(batch["targets"][r, start : stop - 1], ids[1:])

            mask = batch["loss_mask"][r, start:stop]
            answer = backend.decode(
                batch["targets"][r, start:stop][mask].tolist(), skip_special_tokens=False
            )
            assert answer.endswith("<|im_end|>")
            records = json.loads(answer.removesuffix("<|im_end|>"))
            assert text.endswith(f"<|im_start|>assistant\n{answer}\n")
            assert [r_["id"] for r_ in records] == list(range(len(records)))
            assert 1 <= len(records) <= SAMPLING.max_queries

            n_features, classes, rows, labels = parse(text)
            task = tasks[n_features]
            assert rows.shape[1] == n_features and 1 <= len(rows) <= SAMPLING.max_shots
            assert classes == sorted(set(labels))
            assert set(labels) <= set(task.y[: task.n_train].tolist())
            assert len(batch["input_ids"][r, start:stop]) <= SAMPLING.token_budget
            if len(rows) >= 8:
                # statistics come from the shots shown: each column's z-scores over the
                # shots have mean 0 and std 1, so the printed values (truncated) have a
                # mean in (499, 500] and a std within a unit of 120.
                clean = rows[:, (rows > 0).all(axis=0)]
                assert ((clean.mean(axis=0) > 499) & (clean.mean(axis=0) <= 500)).all()
                assert np.allclose(clean.std(axis=0, ddof=1), 120, atol=1.0)
            checked += 1
    assert checked >= 6


def labels_seen(dataset, backend):
    seen = set()
    for batch in dataset:
        for r, start, stop in segments(batch):
            text = backend.decode(batch["input_ids"][r, start:stop].tolist())
            seen |= set(parse(text)[1])
            seen |= {int(v) for v in re.findall(r'"label": (\d+)', text)}
    return seen


def test_consensus_only_uses_consensus_rows(shards, fast, backend):
    warmup = SamplingConfig(**{**SAMPLING.__dict__, "consensus_only": True})
    assert labels_seen(pipeline(shards, fast, sampling=warmup, num_epochs=1), backend) == {0, 1}
    assert 2 in labels_seen(pipeline(shards, fast, num_epochs=1), backend)


def test_hosts_read_disjoint_halves(shards, fast, backend):
    per_host = []
    for host in range(2):
        features = []
        for batch in pipeline(shards, fast, num_epochs=1, batch_size=1, hosts=(host, 2)):
            for r, start, stop in segments(batch):
                text = backend.decode(batch["input_ids"][r, start:stop].tolist())
                features.append(parse(text)[0])
        per_host.append(features)
    assert len(per_host[0]) == len(set(per_host[0])) == N_TASKS // 2
    assert len(per_host[1]) == len(set(per_host[1])) == N_TASKS // 2
    assert set(per_host[0]) | set(per_host[1]) == {5 + i for i in range(N_TASKS)}


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_restored_iterator_yields_the_uninterrupted_batches(shards, fast):
    # 40 tasks per epoch on one host, ~5 sequences per batch: 14 batches cross an epoch.
    it = iter(pipeline(shards, fast))
    head = [next(it) for _ in range(6)]
    state = iterator_state(it)
    assert isinstance(state, bytes)
    json.loads(state)
    tail = [next(it) for _ in range(8)]

    resumed = iter(pipeline(shards, fast))
    restore_iterator_state(resumed, state)
    assert_same_batches([next(resumed) for _ in range(8)], tail)

    again = iter(pipeline(shards, fast))
    assert_same_batches([next(again) for _ in range(6)], head)
    other_seed = iter(pipeline(shards, fast, seed=4))
    assert not np.array_equal(next(other_seed)["input_ids"], head[0]["input_ids"])


def test_each_epoch_draws_new_shots(tmp_path, fast):
    path = tmp_path / "one.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(encode_task(make_task(np.random.default_rng(1), 3)))
    writer.close()
    config = PipelineConfig(SAMPLING, seq_len=4096, batch_size=1, packing_bins=1, num_epochs=3)
    rows = list(build_pipeline([path], config, seed=0, process_index=0, process_count=1,
                               tokenizer=fast))  # fmt: skip
    sequences = [
        batch["input_ids"][r, start:stop].tolist()
        for batch in rows
        for r, start, stop in segments(batch)
    ]
    assert len(sequences) == 3  # one per epoch
    assert len({tuple(s) for s in sequences}) == 3


def test_bad_input_gets_clear_errors(shards, fast, tmp_path):
    paths, tasks = shards
    with pytest.raises(ValueError, match="shorter than the token budget"):
        PipelineConfig(SAMPLING, seq_len=1024)
    with pytest.raises(FileNotFoundError, match="missing.array_record"):
        build_pipeline([tmp_path / "missing.array_record"], PipelineConfig(SAMPLING, seq_len=4096),
                       seed=0, process_index=0, process_count=1, tokenizer=fast)  # fmt: skip
    with pytest.raises(ValueError, match="seed"):
        build_pipeline(paths, PipelineConfig(SAMPLING, seq_len=4096), seed=-1,
                       process_index=0, process_count=1, tokenizer=fast)  # fmt: skip

    hopeless = SamplingConfig(min_shots=8, max_shots=64, max_queries=10, token_budget=300)
    with pytest.raises(TaskEncodingError, match="in a row fit no sequence .* budget 300"):
        next(iter(pipeline(shards, fast, sampling=hopeless, seq_len=300)))

    from mllm_jax.encoding.sequence import TaskSequenceEncoder

    many = Task(np.zeros((30, 2), np.float32), np.arange(30, dtype=np.int32) % 12, 12, 20,
                np.zeros(2, bool), "tree", 11, 77)  # fmt: skip
    encoder = TaskSequenceEncoder(fast, SamplingConfig(min_shots=20, max_shots=20))
    with pytest.raises(TaskEncodingError, match=r"index=77\): 12 classes .* more than the 10"):
        encoder(many, np.random.default_rng(0))

    task = tasks[5]
    consensus = task.consensus.copy()
    consensus[task.n_train :] = False
    no_queries = Task(task.X, task.y, 3, task.n_train, task.categorical, "mlp", 11, 999,
                      consensus=consensus)  # fmt: skip
    path = tmp_path / "bad.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(encode_task(no_queries))
    writer.close()
    warmup = SamplingConfig(**{**SAMPLING.__dict__, "consensus_only": True})
    config = PipelineConfig(warmup, seq_len=4096)
    dataset = build_pipeline([path], config, seed=0, process_index=0, process_count=1,
                             tokenizer=fast)  # fmt: skip
    with pytest.raises(
        TaskEncodingError, match=r"index=999\) has no test rows among its consensus"
    ):
        next(iter(dataset))


@pytest.mark.parametrize(
    ("workers", "before", "after"),
    [(1, 2, 3), pytest.param(2, 4, 6, marks=pytest.mark.slow)],
    ids=["one_worker", "two_workers"],
)
def test_worker_processes_resume_exactly(shards, fast, workers, before, after):
    """grain's worker processes: a restored iterator state gives the uninterrupted batches."""
    it = iter(pipeline(shards, fast, worker_count=workers))
    head = [next(it) for _ in range(before)]
    state = iterator_state(it)
    tail = [next(it) for _ in range(after)]
    it.close()
    resumed = iter(pipeline(shards, fast, worker_count=workers))
    restore_iterator_state(resumed, state)
    got = [next(resumed) for _ in range(after)]
    resumed.close()
    assert_same_batches(got, tail)
    assert head


def test_over_budget_tasks_draw_fewer_queries_or_are_skipped(shards, fast, caplog):
    """A task over the budget with min_shots keeps fewer queries; one that does not fit
    even with one query is skipped with a warning naming it; the run goes on."""
    _, tasks = shards
    tight = SamplingConfig(min_shots=8, max_shots=64, max_queries=10, token_budget=600)
    from mllm_jax.encoding.sequence import TaskSequenceEncoder

    encoder = TaskSequenceEncoder(fast, tight)
    fitted = encoder(tasks[8], np.random.default_rng(0))  # 10 queries do not fit
    assert 1 <= fitted.n_queries < 10 and len(fitted.ids) <= 600
    with pytest.raises(TaskEncodingError, match="over the token budget of 600"):
        encoder(tasks[4 + N_TASKS], np.random.default_rng(0))

    it = iter(pipeline(shards, fast, sampling=tight, seq_len=600))
    for _ in range(3):
        batch = next(it)
        assert batch["loss_mask"].any(axis=1).all()
    assert "skipped a task that fits no training sequence" in caplog.text


def test_token_kinds_mark_query_and_shot_labels(shards, fast):
    batch = next(iter(pipeline(shards, fast)))
    kind, targets = batch["token_kind"], batch["targets"]
    digits = set(fast.digit_ids.tolist())
    assert ((kind == 1) | (kind == 2)).tolist() == batch["loss_mask"].tolist()
    assert set(targets[kind == 2].tolist()) <= digits
    assert set(targets[kind == 3].tolist()) <= digits
    for r, start, stop in segments(batch):
        row_kind = kind[r, start:stop]
        # every answered row has its label, every shot row its label (single digits here)
        assert (row_kind == 2).sum() >= 1 and (row_kind == 3).sum() >= 8


def test_without_packing_every_row_holds_one_task(shards, fast, backend):
    """The reference's setting: one task per sequence, padded; the same sequences as
    with packing, only laid out one per row."""
    packed = iter(pipeline(shards, fast, shuffle=False, batch_size=1))
    single = iter(pipeline(shards, fast, shuffle=False, batch_size=1, packing=False))
    seen_packed, seen_single = [], []
    for _ in range(4):
        batch = next(single)
        assert batch["segment_ids"].max() == 1
        row = batch["segment_ids"][0]
        n = int((row == 1).sum())
        assert (row[:n] == 1).all() and (row[n:] == 0).all()
        np.testing.assert_array_equal(batch["positions"][0, :n], np.arange(n))
        assert not batch["loss_mask"][0, n:].any() and (batch["token_kind"][0, n:] == 0).all()
        seen_single.append(batch["input_ids"][0, :n].tolist())
    while len(seen_packed) < 12:
        batch = next(packed)
        for r, start, stop in segments(batch):
            seen_packed.append(batch["input_ids"][r, start:stop].tolist())
    assert all(sequence in seen_packed for sequence in seen_single)
