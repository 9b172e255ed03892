"""`mllm-jax generate`: prior -> filter pool -> shards + manifest; multi-process union,
interruption, accounting of every index, grain reading the corpus back.

The default tests feed the command a cheap numpy stand-in for the prior (same batch
interface: ``indices``, ``valid``, ``to_tasks()``); the real prior runs in a slow test.
"""

import json
import sys

import numpy as np
import pytest
from fake_prior import FILTER, ROWS, fake_batches, records, stops_after
from typer.testing import CliRunner

import mllm_jax.data.generate as data_generate
from mllm_jax.cli import app
from mllm_jax.data.generate import GenerateConfig, GenerateError, generate, process_slice
from mllm_jax.data.shards import CorpusError, list_corpus_shards
from mllm_jax.foundation.tasks import decode_task


def run(directory, *, process_index=0, process_count=1, filter=None, **changes):
    config = GenerateConfig(
        seed=3,
        start=10,
        count=30,
        filter=filter,
        shard_size=4,
        batch_size=8,
        process_index=process_index,
        process_count=process_count,
        workers=2,
        **changes,
    )
    return generate(config, directory, progress=False, batches=fake_batches)


def test_process_slices_partition_the_range():
    slices = [process_slice(5, 11, p, 3) for p in range(3)]
    assert [list(s) for s in slices] == [[5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    with pytest.raises(GenerateError, match="process_index 3 not in"):
        process_slice(0, 10, 3, 3)


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
def test_processes_together_write_the_one_process_corpus(tmp_path, filtered):
    config = FILTER if filtered else None
    one = run(tmp_path / "one", filter=config)
    # Two "hosts" writing their slices into one directory, one after the other.
    parts = [run(tmp_path / "two", process_index=p, process_count=2, filter=config) for p in (0, 1)]
    assert [(m["start"], m["count"]) for m in parts] == [(10, 15), (25, 15)]
    assert records(tmp_path / "two") == records(tmp_path / "one")  # byte for byte

    tasks = [decode_task(r) for r in records(tmp_path / "one")]
    invalid = [i for i in range(10, 40) if i % 7 == 3]
    assert one["invalid_indices"] == invalid
    assert one["invalid"] == sum(m["invalid"] for m in parts) == len(invalid)
    assert one["tasks_written"] + one["invalid"] + one["rejected"] == 30
    assert one["tasks_written"] == len(tasks) == sum(s["tasks"] for s in one["shards"])
    assert [t.index for t in tasks] == sorted(t.index for t in tasks)
    if not filtered:
        assert [t.index for t in tasks] == [i for i in range(10, 40) if i not in invalid]
        assert one["rejected"] == 0 and all(t.consensus is None for t in tasks)
        return
    # Every learnable task kept; only coin-flip tasks rejected; each one accounted for.
    written = {t.index for t in tasks}
    assert {i for i in range(10, 40, 2) if i not in invalid} <= written
    assert one["rejected"] == sum(one["rejected_by_reason"].values()) > 0
    assert one["rejected"] == len(set(range(10, 40)) - written - set(invalid))
    for task in tasks:
        assert task.extra["filter"]["accepted"] and "seconds" not in task.extra["filter"]
        assert task.consensus is not None and task.consensus.shape == (ROWS,)
    assert one["filter"]["n_estimators"] == 5 and one["consensus"]
    assert one["report"]["consensus_rows_total"] == ROWS * len(tasks)


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
def test_an_interrupted_run_resumes_after_its_last_complete_shard(tmp_path, filtered, capsys):
    # 200 tasks: the filter pool pulls up to 64 ahead, so an interruption of the task
    # stream after 112 finds some tasks filtered and shards complete.
    config = GenerateConfig(
        seed=3, start=10, count=200, filter=FILTER if filtered else None, shard_size=4,
        batch_size=8, workers=2,
    )  # fmt: skip
    straight = generate(config, tmp_path / "straight", progress=False, batches=fake_batches)
    out = tmp_path / "resumed"
    # Two interruptions (Ctrl-C after 14 of 25 batches, an error 14 batches after the
    # resumed start), then a rerun.
    for error in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(error):
            generate(config, out, progress=False, batches=stops_after(14, error))
        # Complete shards and the journal stay; nothing looks like a finished corpus.
        assert (out / ".journal-p00000.json").is_file()
        assert not list(out.glob(".tasks-*.tmp")) and not (out / "manifest-p00000.json").exists()
        with pytest.raises(CorpusError, match="no manifest"):
            list_corpus_shards(out)
    journal = json.loads((out / ".journal-p00000.json").read_text())
    assert journal["next_index"] > 10 and journal["shards"]
    # What a SIGKILL leaves besides: a shard renamed after the journal was written, a temporary.
    later = out / f"tasks-p00000-{len(journal['shards']):05d}.array_record"
    later.write_bytes(b"renamed before the kill")
    (out / ".tasks-p00000-00009.array_record.tmp").write_bytes(b"partial")
    capsys.readouterr()
    resumed = generate(config, out, progress=False, batches=fake_batches)
    assert f"resuming at task {journal['next_index']} of 10..209" in capsys.readouterr().err
    assert records(out) == records(tmp_path / "straight")  # byte for byte
    assert resumed["resumed_at"] == journal["next_index"]
    for key in (
        "tasks_written",
        "invalid",
        "invalid_indices",
        "rejected",
        "rejected_by_reason",
        "shards",
    ):
        assert resumed[key] == straight[key], key
    for key in ("tasks_seen", "accepted", "consensus_rows_kept", "consensus_rows_total"):
        assert resumed["report"].get(key) == straight["report"].get(key), key
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([s["file"] for s in resumed["shards"]] + ["manifest-p00000.json"])


def test_a_rerun_with_other_settings_starts_over_and_says_why(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        generate(
            GenerateConfig(seed=3, start=0, count=40, shard_size=4, batch_size=8),
            tmp_path,
            progress=False,
            batches=stops_after(2),
        )
    capsys.readouterr()
    manifest = generate(
        GenerateConfig(seed=4, start=0, count=40, shard_size=4, batch_size=8),
        tmp_path,
        progress=False,
        batches=fake_batches,
    )
    assert "other settings (seed differ); starting over" in capsys.readouterr().err
    assert manifest["resumed_at"] is None
    assert [decode_task(r).seed for r in records(tmp_path)] == [4] * manifest["tasks_written"]


def test_a_finished_corpus_is_refused_or_overwritten(tmp_path):
    config = GenerateConfig(seed=3, start=0, count=40, shard_size=4, batch_size=8)
    manifest = generate(config, tmp_path, progress=False, batches=fake_batches)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([s["file"] for s in manifest["shards"]] + ["manifest-p00000.json"])
    with pytest.raises(GenerateError, match="already generated"):
        generate(config, tmp_path, progress=False, batches=fake_batches)
    again = generate(
        GenerateConfig(seed=3, start=0, count=40, shard_size=4, batch_size=8, overwrite=True),
        tmp_path,
        progress=False,
        batches=fake_batches,
    )
    assert again["shards"] == manifest["shards"]


def test_grain_pipeline_reads_the_corpus(tmp_path):
    import grain

    from mllm_jax.data.pipeline import PipelineConfig, build_pipeline
    from mllm_jax.encoding.sampling import SamplingConfig

    run(tmp_path)
    paths = list_corpus_shards(tmp_path)
    source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    assert [decode_task(source[i]).index for i in range(len(source))] == [
        decode_task(r).index for r in records(tmp_path)
    ]
    sampling = SamplingConfig(min_shots=8, max_shots=32, max_queries=8, token_budget=2048)
    pipeline = build_pipeline(
        paths,
        PipelineConfig(sampling=sampling, seq_len=2048, batch_size=1),
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(iter(pipeline))
    assert all(np.shape(v)[:2] == (1, 2048) for v in batch.values())


def test_cli_generate(tmp_path, monkeypatch):
    monkeypatch.setattr(data_generate, "iter_task_batches", fake_batches)
    runner = CliRunner()
    out = tmp_path / "corpus"
    args = ["generate", "--out", str(out), "--seed", "3", "--start", "10", "--count", "30"]
    args += ["--shard-size", "8", "--batch-size", "8", "--no-progress"]
    result = runner.invoke(
        app, [*args, "--filter", "--consensus", "--workers", "2", "--set", "filter.n_estimators=5"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest-p00000.json").read_text())
    assert summary["tasks_written"] == manifest["tasks_written"] == len(records(out)) > 0
    assert manifest["filter"]["n_estimators"] == 5 and manifest["filter"]["consensus"]
    assert manifest["prior"]["rows"] == 1024 and manifest["seed"] == 3
    assert manifest["versions"]["mllm_jax"]

    for extra, message in [
        (["--consensus"], "--consensus needs --filter"),
        (["--set", "prior.rows=1"], "rows=1 too few for a split"),
        (["--set", "prior.rows=abc"], "prior.rows: expected an integer, got 'abc'"),
        (["--set", "prior.widths=[16,x]"], "prior.widths[1]: expected an integer"),
        (["--set", "prior.max_feature=3"], "did you mean 'max_features'?"),
        (["--set", "filter.n_trees=3"], "unknown key"),
        (["--set", "rows=3"], "expected prior.<field>=value"),
        (["--process-index", "1"], "give both --process-index and --process-count"),
        (["--process-index", "2", "--process-count", "2"], "process_index 2 not in"),
    ]:
        result = runner.invoke(app, [*args, "--overwrite", *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already generated" in result.output


def test_generate_says_what_it_does_before_the_first_batch(tmp_path, monkeypatch):
    """With --no-progress (a log that is not a terminal) the prior's compilation used to
    leave stderr silent for minutes (177 s for --count 64 on 2 busy cores): one line now
    says which tasks are generated and why the start is slow, before the first batch."""
    said_before_first_batch = []

    def batches(*args, **kwargs):
        sys.stderr.flush()
        said_before_first_batch.append(sys.stderr.buffer.getvalue().decode())
        yield from fake_batches(*args, **kwargs)

    monkeypatch.setattr(data_generate, "iter_task_batches", batches)
    args = ["generate", "--out", str(tmp_path / "c"), "--start", "10", "--count", "30"]
    result = CliRunner().invoke(app, [*args, "--shard-size", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    line = (
        "process 0: generating tasks 10..39 "
        "(the prior compiles its programs first: minutes on a CPU)"
    )
    assert result.stderr.splitlines() == [line]
    assert said_before_first_batch and line in said_before_first_batch[0]


def test_ctrl_c_of_the_command_says_how_to_continue(tmp_path, monkeypatch):
    """Ctrl-C of `mllm-jax generate`: exit 130 and a line saying a rerun continues (was
    silent); the rerun resumes after the complete shards."""
    monkeypatch.setattr(data_generate, "iter_task_batches", stops_after(2))
    args = ["generate", "--out", str(tmp_path), "--count", "40", "--shard-size", "4"]
    args += ["--batch-size", "8", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        "interrupted: rerun the same command to continue after the last complete shard"
    )
    monkeypatch.setattr(data_generate, "iter_task_batches", fake_batches)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming at task 14 of 0..39 after 3 complete shards (12 tasks)" in result.stderr


def test_an_output_place_that_cannot_be_written_is_a_one_line_error(tmp_path, monkeypatch):
    """--out naming a file, a path below a file, or a directory this process may not
    write: one line, exit 2 (were tracebacks from mkdir and the shard writer)."""
    import mllm_jax.foundation.directories as directories

    monkeypatch.setattr(data_generate, "iter_task_batches", fake_batches)
    (tmp_path / "file").write_text("x")
    args = ["generate", "--count", "4", "--no-progress", "--out"]
    for out, message in [
        (tmp_path / "file", f"error: --out {tmp_path / 'file'}: not a directory"),
        (
            tmp_path / "file" / "c",
            f"error: --out {tmp_path / 'file' / 'c'}: cannot create the directory "
            "(Not a directory)",
        ),
    ]:
        result = CliRunner().invoke(app, [*args, str(out)])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == message
    (tmp_path / "read-only").mkdir()
    monkeypatch.setattr(directories, "_writable_dir", lambda directory: False)
    result = CliRunner().invoke(app, [*args, str(tmp_path / "read-only")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith("read-only: the directory is not writable")
    assert list((tmp_path / "read-only").iterdir()) == []


@pytest.mark.slow
def test_real_prior_end_to_end(tmp_path):
    """The real prior (small tasks) through the CLI, filtered, split over 2 processes."""
    runner = CliRunner()
    small = ["prior.rows=128", "prior.max_features=8", "prior.max_hidden=32"]
    small += ["prior.widths=[16,32]", "filter.n_estimators=10"]
    sets = [arg for s in small for arg in ("--set", s)]
    base = ["generate", "--count", "24", "--batch-size", "8", "--shard-size", "5", "--filter"]
    base += ["--no-progress", "--workers", "2", *sets]
    one = runner.invoke(app, [*base, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    for p in (0, 1):
        slot = ["--process-index", str(p), "--process-count", "2"]
        two = runner.invoke(app, [*base, "--out", str(tmp_path / "two"), *slot])
        assert two.exit_code == 0, two.output
    assert records(tmp_path / "two") == records(tmp_path / "one")
    manifest = json.loads((tmp_path / "one" / "manifest-p00000.json").read_text())
    assert manifest["tasks_written"] + manifest["invalid"] + manifest["rejected"] == 24
    assert manifest["tasks_written"] > 0


def test_default_slot_joins_the_multi_host_job_like_train(monkeypatch):
    """Without --process-index/--process-count the command joins jax.distributed from the
    environment (as `train` does); half a setting is refused instead of silently running
    as process 0 of 1 (which on a pod would make every host write the same slice)."""
    from mllm_jax.data.generate import default_process
    from mllm_jax.foundation.distributed import DistributedError

    monkeypatch.setattr("mllm_jax.foundation.distributed.detected_cluster", lambda: None)
    assert default_process() == (0, 1)
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    with pytest.raises(DistributedError, match="coordinator address"):
        default_process()


def test_eval_reads_a_corpus_as_tables(tmp_path, monkeypatch):
    from mllm_jax.eval.datasets import resolve_datasets

    run(tmp_path / "corpus")
    tasks = [decode_task(r) for r in records(tmp_path / "corpus")]
    tables = resolve_datasets([str(tmp_path / "corpus")], max_corpus_tables=5)
    assert [t.name for t in tables] == [f"synthetic_3_{t.index}" for t in tasks[:5]]
    first = tables[0]
    np.testing.assert_array_equal(first.features.to_numpy(), tasks[0].X.astype(np.float64))
    np.testing.assert_array_equal(first.classes[first.labels], tasks[0].y)
    assert len(resolve_datasets([str(tmp_path / "corpus")])) == len(tasks)


def test_a_process_split_that_disagrees_with_the_finished_corpus_is_refused(tmp_path):
    run(tmp_path)  # one process, tasks 10..39
    with pytest.raises(GenerateError, match=r"process_count 1 there, 2 here"):
        run(tmp_path, process_index=1, process_count=2)
    assert sorted(p.name for p in tmp_path.glob("manifest-*")) == ["manifest-p00000.json"]
    two = tmp_path / "two"
    run(two, process_index=0, process_count=2)
    with pytest.raises(GenerateError, match=r"seed 3 there, 4 here"):
        generate(
            GenerateConfig(seed=4, start=10, count=30, shard_size=4, batch_size=8,
                           process_index=1, process_count=2),
            two, progress=False, batches=fake_batches,
        )  # fmt: skip
    with pytest.raises(GenerateError, match=r"the filter config differs"):
        run(two, process_index=1, process_count=2, filter=FILTER)
    manifest = json.loads((tmp_path / "manifest-p00000.json").read_text())
    assert len(manifest["prior_sha256"]) == 64 and manifest["filter_sha256"] is None


def _corpus(directory, start, count, seed=3):
    generate(
        GenerateConfig(seed=seed, start=start, count=count, shard_size=4, batch_size=8),
        directory,
        progress=False,
        batches=fake_batches,
    )
    return directory


def test_training_refuses_corpora_that_share_tasks(tmp_path):
    from types import SimpleNamespace

    from mllm_jax.data.shards import CorpusOverlapError, check_disjoint
    from mllm_jax.train.data import check_task_overlap

    a = _corpus(tmp_path / "a", 0, 20)
    b = _corpus(tmp_path / "b", 15, 20)  # tasks 15..19 again
    c = _corpus(tmp_path / "c", 20, 20)
    d = _corpus(tmp_path / "d", 0, 20, seed=4)  # other seed: other tasks
    shards = {name: [str(p) for p in list_corpus_shards(tmp_path / name)] for name in "abcd"}
    check_disjoint({"train": shards["a"] + shards["c"] + shards["d"]})
    with pytest.raises(CorpusOverlapError, match=r"share tasks 15..19 of seed 3"):
        check_disjoint({"train": shards["a"] + shards["b"]})
    with pytest.raises(CorpusOverlapError, match="listed twice"):
        check_disjoint({"train": shards["a"] + shards["a"][:1]})

    def config(train, validation):
        def data(paths):
            return SimpleNamespace(kind="shards", shards=paths)

        return SimpleNamespace(
            stages=[SimpleNamespace(name="full", data=data(train))],
            validation=SimpleNamespace(every=10, data=data(validation)),
        )

    check_task_overlap(config([str(a), str(d)], [str(c)]))
    with pytest.raises(CorpusOverlapError, match=r"stage 'full' data and validation data"):
        check_task_overlap(config([str(a)], [str(b)]))  # validation tasks 15..19 leak
    with pytest.raises(CorpusOverlapError, match="share tasks 0..19"):
        check_task_overlap(config([str(a / "*.array_record")], [str(a)]))
