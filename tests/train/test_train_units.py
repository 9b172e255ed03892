"""Trainer pieces without a train step: answer-only loss, schedule, FLOPs, batch checks,
the synthetic task, config loading."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.foundation.config import ConfigError, load_config
from mllm_jax.model import init_model, preset
from mllm_jax.model.config import Qwen2Config
from mllm_jax.runs.config import (
    OptimizerConfig,
    SyntheticConfig,
    TrainConfig,
    fingerprint_differences,
    resume_fingerprint,
)
from mllm_jax.train import flops
from mllm_jax.train.batches import BatchError, BatchStats, check_batch, next_batches
from mllm_jax.train.loss import answer_loss_sums, answer_positions, full_logits_loss_sums
from mllm_jax.train.optim import learning_rate
from mllm_jax.train.synthetic import SyntheticBatches, batch

SMALL = SyntheticConfig(batch_size=3, seq_len=48, vocab_size=128, num_keys=20, num_values=10)


def test_answer_positions_are_the_first_mask_entries():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 40)) < 0.2
    mask[3] = False
    positions, valid = jax.jit(answer_positions, static_argnums=1)(jnp.asarray(mask), 12)
    for row in range(5):
        want = np.flatnonzero(mask[row])[:12]
        got = np.asarray(positions[row])[np.asarray(valid[row])]
        np.testing.assert_array_equal(got, want)
        assert int(valid[row].sum()) == min(12, mask[row].sum())


def test_gathered_head_equals_full_logits_loss():
    config = preset("tiny", param_dtype="float32", compute_dtype="float32", vocab_size=128)
    model = init_model(config, 3)
    data = {k: jnp.asarray(v) for k, v in batch(SMALL, seed=1, index=0).items()}
    budget = int(data["loss_mask"].sum(axis=1).max()) + 3

    @nnx.jit
    def both(model, data):
        hidden = model(
            data["input_ids"], data["positions"], data["segment_ids"], return_hidden=True
        )
        ours = answer_loss_sums(hidden, data["targets"], data["loss_mask"], model.logits, budget)
        full = full_logits_loss_sums(model.logits(hidden), data["targets"], data["loss_mask"])
        return ours, full

    ours, full = both(model, data)
    assert float(ours.tokens) == float(full.tokens) == float(data["loss_mask"].sum()) > 0
    np.testing.assert_allclose(float(ours.loss), float(full.loss), rtol=1e-6)
    assert float(ours.correct) == float(full.correct)


def test_schedule_is_hf_cosine_with_warmup():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    config = OptimizerConfig(warmup_ratio=0.1)
    steps, peak = 37, 2e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = get_cosine_schedule_with_warmup(opt, math.ceil(0.1 * steps), steps)
    for count in range(steps):
        assert learning_rate(config, peak, steps, count) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15
        )
        opt.step()
        schedule.step()
    floor = OptimizerConfig(warmup_ratio=0.0, min_lr_ratio=0.1)
    assert learning_rate(floor, 1.0, 10, 0) == 1.0
    assert learning_rate(floor, 1.0, 10, 10) == pytest.approx(0.1)


def test_flops_convention():
    seven_b = Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    )
    # Qwen2.5-7B: 7.62B parameters, 6.53B without embedding and LM head (model card).
    assert flops.non_embedding_params(seven_b) == pytest.approx(6.53e9, rel=2e-3)
    c = Qwen2Config(
        vocab_size=10,
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    n = flops.non_embedding_params(c)
    stats = BatchStats(tokens=12, real_tokens=10, answer_tokens=3, attention_pairs=30)
    attention = 3 * 4 * c.head_dim * 2 * 1 * 30
    assert flops.step_flops(c, stats, "full") == 6 * n * 10 + 6 * 4 * 10 * 3 + attention
    assert flops.step_flops(c, stats, "lora") == 4 * n * 10 + 4 * 4 * 10 * 3 + attention
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("cpu") is None


def test_flops_agree_with_xla_cost_analysis():
    """The FLOPs formula against an independent count: XLA's cost analysis of the
    compiled forward and forward+backward of a small model (one unpadded sequence, the
    LM head left out; XLA's attention computes the full T x T square, so the formula gets
    T * T pairs). XLA also counts norms, softmax and activations, hence 2%, not 0."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mllm_jax.model import init_model

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        compute_dtype="float32",
    )
    graph, state = nnx.split(init_model(config, 0))
    t = 256
    ids, segments = jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), jnp.int32)

    def forward(state, ids, segments):
        model = nnx.merge(graph, state)
        return model(ids, segment_ids=segments, return_hidden=True)[0].sum()

    def xla_flops(fn) -> float:
        cost = jax.jit(fn).lower(state, ids, segments).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    stats = BatchStats(tokens=t, real_tokens=t, answer_tokens=0, attention_pairs=t * t)
    ours = flops.step_flops(config, stats, "full")
    assert xla_flops(forward) == pytest.approx(ours / 3, rel=0.02)
    assert xla_flops(jax.grad(forward)) == pytest.approx(ours, rel=0.02)


def test_synthetic_batches_are_well_formed_and_resumable():
    data = batch(SMALL, seed=5, index=2)
    ids, targets, mask = data["input_ids"], data["targets"], data["loss_mask"]
    seg, pos = data["segment_ids"], data["positions"]
    same_next = np.zeros_like(mask)
    same_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(targets[:, :-1][same_next[:, :-1]], ids[:, 1:][same_next[:, :-1]])
    assert not (mask & ~same_next).any()  # loss only where a next token exists
    assert (seg.max(axis=1) >= 2).all()  # packed: several sequences per row
    starts = np.concatenate([np.ones((3, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert (pos[starts & (seg > 0)] == 0).all()
    it = SyntheticBatches(SMALL, seed=5)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    fourth = next(it)
    again = SyntheticBatches(SMALL, seed=5)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["input_ids"], fourth["input_ids"])
    np.testing.assert_array_equal(first[2]["input_ids"], data["input_ids"])


def _all_answers(data):
    data["segment_ids"][:] = 1
    data["loss_mask"][:] = True


def _good():
    return batch(SMALL, seed=0, index=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.pop("targets"), r"lacks \['targets'\]"),
        (lambda b: b.update(positions=b["positions"][:, :10]), "positions has shape"),
        (lambda b: b["input_ids"].__setitem__((0, 0), 128), "token id 128, outside"),
        (lambda b: b.update(loss_mask=b["loss_mask"].astype(np.float32)), "loss_mask has dtype"),
        (lambda b: b["loss_mask"].__setitem__((1, slice(None)), True), "on padding"),
        (_all_answers, "row 0 has 48 answer tokens, more than max_answer_tokens=40"),
    ],
)
def test_check_batch_names_the_problem(change, message):
    data = _good()
    change(data)
    with pytest.raises(BatchError, match=message):
        check_batch(data, where="step 3", vocab_size=128, max_answer_tokens=40)


def test_check_batch_counts_and_exhaustion():
    data = _good()
    _, stats = check_batch(data, where="x", vocab_size=128, max_answer_tokens=40)
    assert stats.tokens == 3 * 48
    assert stats.real_tokens == int((data["segment_ids"] > 0).sum())
    assert stats.answer_tokens == int(data["loss_mask"].sum())
    lengths = [np.sum(row == s) for row in data["segment_ids"] for s in np.unique(row) if s > 0]
    assert stats.attention_pairs == sum(n * (n + 1) // 2 for n in lengths)
    with pytest.raises(Exception, match="data iterator ended \\(after micro-batch 1 of 2\\)"):
        next_batches(
            iter([data]),
            2,
            where="stage 'a' step 1",
            vocab_size=128,
            max_answer_tokens=40,
            shape=None,
        )


def test_config_yaml_overrides_and_fingerprint(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "mode: lora\n"
        "lora: {rank: 4, targets: [q_proj, v_proj]}\n"
        "stages:\n"
        "  - {name: warmup, steps: 10, learning_rate: 1e-5}\n"
        "  - {name: full, steps: 20, learning_rate: 1e-6, data: {seed: 3}}\n"
    )
    config = load_config(TrainConfig, path, ["optimizer.weight_decay=0.01", "mesh.fsdp=4"])
    assert config.lora.rank == 4 and config.lora.targets == ("q_proj", "v_proj")
    assert config.stage_bounds() == [(0, 10), (10, 30)]
    assert config.stages[1].data.seed == 3
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stepz: unknown key"):
        load_config(TrainConfig, None, ["stages=[{name: a, stepz: 3, learning_rate: 1}]"])
    with pytest.raises(ConfigError, match="lora.*rank must be"):
        load_config(TrainConfig, None, ["lora.rank=0"])
    other = load_config(TrainConfig, path, ["optimizer.weight_decay=0.02", "mesh.fsdp=2"])
    diff = fingerprint_differences(resume_fingerprint(config), resume_fingerprint(other))
    assert diff == ["optimizer.weight_decay: checkpoint 0.01, config 0.02"]  # mesh may change


def test_jax_sees_eight_devices():
    assert jax.device_count() == 8


def test_a_best_step_saved_again_after_a_kill_replaces_the_first(tmp_path):
    """kill -9 between the best save of step N and the periodic checkpoint of step N: the
    rerun reaches N again and must not fail with StepAlreadyExistsError."""
    import orbax.checkpoint as ocp

    from mllm_jax.runs.checkpoint import Checkpointer

    first = Checkpointer(str(tmp_path / "ck"), keep=2, best_directory=str(tmp_path / "best"))
    first.save_best(50, {"w": jnp.zeros(3)}, {}, {"step": 50, "run": 1})
    first.wait()
    again = Checkpointer(str(tmp_path / "ck"), keep=2, best_directory=str(tmp_path / "best"))
    again.save_best(50, {"w": jnp.ones(3)}, {}, {"step": 50, "run": 2})
    again.wait()
    assert list(again.best.all_steps()) == [50]
    restored = again.best.restore(50, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    assert restored["meta"]["run"] == 2
