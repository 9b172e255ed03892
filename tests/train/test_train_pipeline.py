"""The trainer on real task shards through the grain pipeline (real tokenizer, packed
rows): it trains, and the grain iterator position saved with a checkpoint resumes the
data exactly where the run stopped."""

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from mllm_jax.data.pipeline import PipelineConfig, build_pipeline
from mllm_jax.foundation.config import from_dict, load_config
from mllm_jax.foundation.tasks import Task, encode_task
from mllm_jax.runs.checkpoint import Checkpointer
from mllm_jax.runs.config import TrainConfig
from mllm_jax.train.loop import train

PIPELINE = (
    "{sampling: {min_shots: 4, max_shots: 8, max_queries: 3, token_budget: 768}, "
    "seq_len: 1024, batch_size: 2, packing_bins: 2}"
)


def _task(rng: np.random.Generator, index: int) -> Task:
    rows, features = 24, 3 + index % 3
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int32)
    return Task(X, y, 2, 16, np.zeros(features, bool), "mlp", 5, index)


@pytest.mark.slow  # a full-vocab (151936) model: about a minute on 2 cores
def test_trains_on_shards_and_checkpoints_the_grain_position(tmp_path):
    rng = np.random.default_rng(0)
    shard = tmp_path / "tasks-00000.array_record"
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for i in range(12):
        writer.write(encode_task(_task(rng, i)))
    writer.close()
    data = f"{{kind: shards, shards: ['{tmp_path}/tasks-*.array_record'], seed: 4, pipeline: {PIPELINE}}}"
    config = load_config(
        TrainConfig,
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "mode=full",
            "model.overrides={vocab_size: 151936, hidden_size: 32, intermediate_size: 64, "
            "num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 1}",
            "model.compute_dtype=float32",
            f"stages=[{{name: main, steps: 4, learning_rate: 1e-3, data: {data}}}]",
            "mesh={data: 2, fsdp: 1, tensor: 4}",
            "grad_accum=2",
            "max_answer_tokens=128",
            "checkpoint.every=1",
            "logging.progress=false",
        ],
    )
    result = train(config, stop_at=3)
    losses = [h["loss"] for h in result.history if h["event"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(h["answer_tokens"] > 0 for h in result.history if h["event"] == "train")

    meta = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=10).read_meta(3)
    stage_data = config.stages[0].data
    pipeline = from_dict(PipelineConfig, stage_data.pipeline)
    fresh = iter(build_pipeline([shard], pipeline, seed=stage_data.seed))
    for _ in range(3 * config.grad_accum):  # what the three steps consumed
        next(fresh)
    resumed = iter(build_pipeline([shard], pipeline, seed=stage_data.seed))
    resumed.set_state(meta["data_state"])
    want, got = next(fresh), next(resumed)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_stage_length_in_epochs(tmp_path):
    """epochs: 1 without packing is tasks / (batch_size * grad_accum) steps, one task per
    row as the reference; with packing the measured tasks per row divide it too."""
    from mllm_jax.data.pipeline import PipelineConfig
    from mllm_jax.encoding.sampling import SamplingConfig
    from mllm_jax.train.data import default_data
    from mllm_jax.train.epochs import resolve_steps

    rng = np.random.default_rng(1)
    shard = tmp_path / "tasks-00000.array_record"
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for i in range(50):
        writer.write(encode_task(_task(rng, i)))
    writer.close()

    def config(packing: bool, epochs: float) -> TrainConfig:
        pipeline = (
            "{sampling: {min_shots: 4, max_shots: 8, max_queries: 3, token_budget: 768}, "
            f"seq_len: 1024, batch_size: 2, packing: {str(packing).lower()}}}"
        )
        data = f"{{kind: shards, shards: ['{shard}'], seed: 4, pipeline: {pipeline}}}"
        return load_config(
            TrainConfig,
            None,
            [
                f"stages=[{{name: a, steps: 7, learning_rate: 1e-3}}, "
                f"{{name: b, epochs: {epochs}, learning_rate: 1e-3, data: {data}}}]",
                "grad_accum=5",
            ],
        )

    lines = []
    unpacked = resolve_steps(config(False, 1), default_data, lines.append)
    assert [s.steps for s in unpacked.stages] == [7, 5]  # 50 tasks / (2 rows x 5 micro)
    assert unpacked.total_steps == 12 and all(s.epochs is None for s in unpacked.stages)
    assert "1 epoch(s) of 50 tasks on this host / (10 rows per step x 1 task per row" in lines[0]
    twice = resolve_steps(config(False, 2.5), default_data, lines.append)
    assert twice.stages[1].steps == 13  # ceil(2.5 * 50 / 10)
    packed = resolve_steps(config(True, 1), default_data, lines.append)
    per_row = float(lines[-1].split(" x ")[1].split(" tasks per packed row")[0])
    assert per_row > 1.5  # short prompts: several to a 1024-token row
    assert packed.stages[1].steps == int(np.ceil(50 / (10 * per_row)))
    with pytest.raises(ValueError, match="is given in epochs; resolve its steps first"):
        _ = config(False, 1).total_steps
    with pytest.raises(ValueError, match="give exactly one of steps and epochs"):
        load_config(TrainConfig, None, ["stages=[{name: a, learning_rate: 1e-3}]"])
    assert PipelineConfig(SamplingConfig(token_budget=8), seq_len=8).packing


def test_an_edited_packaged_tokenizer_is_a_one_line_error(tmp_path, monkeypatch):
    """Training on shards with a packaged tokenizer.json that is not the pinned file
    (here an edited copy; the installed one is untouched): one line naming the file and
    both sha256s, exit 2 (was a traceback)."""
    from typer.testing import CliRunner

    import mllm_jax.encoding.tokens as tokens
    from mllm_jax.cli import app

    rng = np.random.default_rng(2)
    writer = ArrayRecordWriter(str(tmp_path / "tasks-00000.array_record"), "group_size:1")
    for i in range(4):
        writer.write(encode_task(_task(rng, i)))
    writer.close()
    edited = tmp_path / "tokenizer"
    edited.mkdir()
    text = (tokens.packaged_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8")
    (edited / "tokenizer.json").write_text(text.replace('"Hello"', '"Hellp"', 1), "utf-8")
    monkeypatch.setattr(tokens, "packaged_tokenizer_dir", lambda: edited)
    data = f"{{kind: shards, shards: ['{tmp_path}/tasks-*.array_record'], pipeline: {PIPELINE}}}"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\nmode: full\n"
        "model: {overrides: {vocab_size: 151936, hidden_size: 32, intermediate_size: 64, "
        "num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 1}}\n"
        f"stages: [{{name: main, steps: 1, learning_rate: 1.0e-3, data: {data}}}]\n"
        "mesh: {data: -1, fsdp: 1, tensor: 1}\nlogging: {progress: false}\n"
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {edited / 'tokenizer.json'} has sha256 ")
    assert "not the pinned" in line
