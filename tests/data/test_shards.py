"""Task corpus files: shard writer (atomic shards, abort), manifests, listing complete shards."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from mllm_jax.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    CorpusError,
    ShardWriter,
    list_corpus_shards,
    manifest_name,
    remove_process_files,
)
from mllm_jax.foundation.files import atomic_write_json
from mllm_jax.foundation.tasks import Task, decode_task, encode_task


def make_task(index: int) -> Task:
    rng = np.random.default_rng(index)
    X = rng.normal(size=(12, 3)).astype(np.float32)
    y = (np.arange(12) % 2).astype(np.int32)
    return Task(X, y, 2, 8, np.zeros(3, bool), "mlp", 5, index)


def read_records(paths) -> list[bytes]:
    records = []
    for path in paths:
        reader = ArrayRecordReader(str(path))
        records.extend(reader.read_all())
        reader.close()
    return records


def manifest(process_index: int, process_count: int, shards: list[dict], **changes) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "seed": 5,
        "corpus_start": 0,
        "corpus_count": 10,
        "process_index": process_index,
        "process_count": process_count,
        "shards": shards,
        **changes,
    }


def test_writer_fills_shards_in_order_and_hides_the_open_one(tmp_path):
    tasks = [make_task(i) for i in range(7)]
    with ShardWriter(tmp_path, 3, process_index=2) as writer:
        for task in tasks[:4]:
            writer.add(task)
        # Shard 0 is complete; shard 1 is open and must not look like a shard yet.
        assert sorted(p.name for p in tmp_path.glob("*.array_record")) == [
            "tasks-p00002-00000.array_record"
        ]
        assert (tmp_path / ".tasks-p00002-00001.array_record.tmp").is_file()
        for task in tasks[4:]:
            writer.add(task)
    assert [p.name for p in writer.paths] == [
        "tasks-p00002-00000.array_record",
        "tasks-p00002-00001.array_record",
        "tasks-p00002-00002.array_record",
    ]
    assert writer.shards[1] == {
        "file": "tasks-p00002-00001.array_record",
        "tasks": 3,
        "first_index": 3,
        "last_index": 5,
    }
    assert writer.shards[2]["tasks"] == 1
    assert writer.count == 7
    assert not list(tmp_path.glob(".*"))
    assert read_records(writer.paths) == [encode_task(t) for t in tasks]


def test_exception_removes_everything_the_writer_wrote(tmp_path):
    (tmp_path / "other.txt").write_text("not ours")
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, 2) as writer:
        for i in range(5):
            writer.add(make_task(i))
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_atomic_write_json_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "m.json", {"a": object()})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _write_process(directory, process_index, process_count, indices, shard_size=2):
    with ShardWriter(directory, shard_size, process_index=process_index) as writer:
        for i in indices:
            writer.add(make_task(i))
    atomic_write_json(
        directory / manifest_name(process_index),
        manifest(process_index, process_count, writer.shards),
    )
    return writer


def test_listing_is_in_index_order_across_processes(tmp_path):
    _write_process(tmp_path, 1, 2, range(5, 10))
    _write_process(tmp_path, 0, 2, range(0, 5))
    paths = list_corpus_shards(tmp_path)
    assert [decode_task(r).index for r in read_records(paths)] == list(range(10))
    # A plain glob (what a training config's data.shards uses) gives the same order.
    assert paths == sorted(tmp_path.glob("*.array_record"))


def test_listing_refuses_incomplete_or_inconsistent_corpora(tmp_path):
    with pytest.raises(CorpusError, match="no such corpus directory"):
        list_corpus_shards(tmp_path / "nope")
    with pytest.raises(CorpusError, match="no manifest"):
        list_corpus_shards(tmp_path)
    _write_process(tmp_path, 0, 2, range(0, 5))
    with pytest.raises(CorpusError, match=r"processes \[1\] of 2 have not finished"):
        list_corpus_shards(tmp_path)
    assert len(list_corpus_shards(tmp_path, require_all_processes=False)) == 3

    other = tmp_path / manifest_name(1)
    atomic_write_json(other, manifest(1, 2, [], seed=6))
    with pytest.raises(CorpusError, match="disagree on seed"):
        list_corpus_shards(tmp_path)
    atomic_write_json(other, manifest(1, 2, [{"file": "tasks-p00001-00000.array_record"}]))
    with pytest.raises(CorpusError, match="listed in its manifest but missing"):
        list_corpus_shards(tmp_path)
    atomic_write_json(other, {"format": "something else"})
    with pytest.raises(CorpusError, match="not a task corpus manifest"):
        list_corpus_shards(tmp_path)


def test_remove_process_files_touches_only_that_process(tmp_path):
    _write_process(tmp_path, 0, 2, range(0, 5))
    _write_process(tmp_path, 1, 2, range(5, 10))
    (tmp_path / ".tasks-p00001-00007.array_record.tmp").write_bytes(b"partial")
    (tmp_path / f".{manifest_name(1)}.abc.tmp").write_text("{")
    removed = remove_process_files(tmp_path, 1)
    assert len(removed) == 6  # 3 shards, manifest, 2 temporaries
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "manifest-p00000.json",
        "tasks-p00000-00000.array_record",
        "tasks-p00000-00001.array_record",
        "tasks-p00000-00002.array_record",
    ]


def test_training_data_takes_a_corpus_directory_and_refuses_an_unfinished_one(tmp_path):
    from mllm_jax.train.data import expand_shards

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_process(corpus, 0, 2, range(0, 5))
    with pytest.raises(FileNotFoundError, match=r"stage 0 data: .*processes \[1\] of 2"):
        expand_shards([str(corpus)], "stage 0 data")
    _write_process(corpus, 1, 2, range(5, 10))
    assert expand_shards([str(corpus)], "stage 0 data") == [
        str(p) for p in list_corpus_shards(corpus)
    ]
