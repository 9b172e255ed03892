"""Label-only metrics and the shot-label loss, against hand computations and brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mllm_jax.model import Qwen2ForCausalLM, preset
from mllm_jax.train.label_metrics import (
    bucket_name,
    label_metrics,
    label_slots,
    shot_metrics,
    shot_slots,
)
from mllm_jax.train.loss import answer_loss_sums, shot_label_sums

DIGITS = tuple(range(15, 25))


def one_row_batch():
    """One row, two packed prompts. Prompt 1: shots labelled 1, 1, 0 then queries with
    labels 1 and 0. Prompt 2: shots 2, 2, 2, 2, 0, 0, 0, 0, 0, 2 then one query, label 0.
    Frame tokens (kind 1) sit around the labels; token ids outside digits elsewhere."""
    kinds, targets, segs = [], [], []

    def add(seg, kind, token):
        kinds.append(kind)
        targets.append(token)
        segs.append(seg)

    for label in (1, 1, 0):
        add(1, 0, 100)
        add(1, 3, DIGITS[label])
    add(1, 1, 200)
    add(1, 2, DIGITS[1])
    add(1, 1, 201)
    add(1, 2, DIGITS[0])
    add(1, 1, 202)
    for label in (2, 2, 2, 2, 0, 0, 0, 0, 0, 2):
        add(2, 0, 100)  # labels are never adjacent: two in a row are one label's digits
        add(2, 3, DIGITS[label])
    add(2, 1, 200)
    add(2, 2, DIGITS[0])
    add(2, 1, 202)
    kind = np.array(kinds)[None, None]
    return {
        "token_kind": kind,
        "targets": np.array(targets)[None, None],
        "segment_ids": np.array(segs)[None, None],
        "loss_mask": (kind == 1) | (kind == 2),
    }


def test_label_metrics_match_a_hand_computation():
    batch = one_row_batch()
    slots = label_slots(batch, budget=16, candidates=DIGITS)
    assert slots.label.tolist() == [1, 0, 0]
    assert slots.shots.tolist() == [3, 3, 10]
    assert slots.classes.tolist()[2][:3] == [True, False, True]
    logits = np.zeros((1, 1, 16, 10))
    # answer slots in loss order: frame, label(1), frame, label(0), frame, frame, label(0), frame
    logits[0, 0, 1] = [0, 5, 0, 0, 0, 0, 0, 0, 0, 9]  # 9 is not a shown class: predicts 1
    logits[0, 0, 3] = [0, 2, 0, 0, 0, 0, 0, 0, 0, 0]  # predicts 1, truth 0
    logits[0, 0, 6] = [3, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # predicts 0 among {0, 2}
    out = label_metrics(slots, logits)
    assert out["label_accuracy"] == pytest.approx(2 / 3)
    # majority of shots: prompt 1 -> class 1 (hits the first query), prompt 2: tie 5-5,
    # argmax takes class 0 (hits)
    assert out["majority_accuracy"] == pytest.approx(2 / 3)
    ce = [
        np.log(np.exp(5) + np.exp(0)) - 5,
        np.log(np.exp(2) + np.exp(0)) - 0,
        np.log(np.exp(3) + np.exp(1)) - 3,
    ]
    assert out["label_loss"] == pytest.approx(np.mean(ce))
    prior = [-np.log(3 / 5), -np.log(2 / 5), -np.log(6 / 12)]
    assert out["prior_loss"] == pytest.approx(np.mean(prior))
    assert out["by_shots"] == {
        "<8": {"slots": 2, "label_accuracy": 0.5, "majority_accuracy": 0.5},
        "8-15": {"slots": 1, "label_accuracy": 1.0, "majority_accuracy": 1.0},
    }
    assert [bucket_name(s) for s in (7, 8, 31, 32, 127, 128, 1000)] == [
        "<8", "8-15", "16-31", "32-63", "64-127", "128+", "128+",
    ]  # fmt: skip


def test_shot_curve_matches_a_hand_computation():
    batch = one_row_batch()
    slots = shot_slots(batch, budget=32, candidates=DIGITS)
    assert slots.label.tolist() == [1, 1, 0, 2, 2, 2, 2, 0, 0, 0, 0, 0, 2]
    assert slots.before.sum(axis=1).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    logits = np.zeros((1, 1, 32, 10))
    logits[0, 0, :, 2] = 1.0  # always class 2 (when the prompt shows it), else the lowest
    out = shot_metrics(slots, logits)["shot_by_before"]
    # 1..7 earlier shots: prompt 1 shots 2, 3 (labels 1, 0; predicted 0: one hit), prompt
    # 2 shots 2..8 (labels 2, 2, 2, 0, 0, 0, 0; predicted 2: three hits). The earlier
    # shots' majority: p1 1 (hit), 1 (miss); p2 2, 2, 2 (hits), then 2 four times (misses)
    assert out["<8"] == {"slots": 9, "label_accuracy": 4 / 9, "majority_accuracy": 4 / 9}
    # 8 and 9 earlier shots (prompt 2, labels 0, 2): majority of 2x4 + 0x4 is the lowest
    # class 0 (hit), of 0x5 + 2x4 is 0 (miss); the model predicts 2: one hit
    assert out["8-15"] == {"slots": 2, "label_accuracy": 0.5, "majority_accuracy": 0.5}


@pytest.fixture(scope="module")
def model():
    config = preset("tiny", vocab_size=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("tied", [True, False])
def test_logits_for_equals_the_full_heads_columns(tied):
    config = preset("tiny", vocab_size=64, tie_word_embeddings=tied)
    m = Qwen2ForCausalLM(config, rngs=nnx.Rngs(1))
    hidden = jax.random.normal(jax.random.key(0), (2, 3, config.hidden_size))
    ids = (5, 17, 3, 60)
    np.testing.assert_allclose(
        m.logits_for(hidden, ids), m.logits(hidden)[..., list(ids)], rtol=1e-5, atol=1e-5
    )


def test_shot_label_sums_equal_a_brute_force_softmax_over_the_candidates(model):
    rng = np.random.default_rng(0)
    candidates = (10, 11, 12, 13)
    kind = rng.choice([0, 1, 2, 3], size=(2, 40), p=[0.5, 0.1, 0.1, 0.3])
    targets = np.where(
        kind == 3, rng.choice(candidates, size=(2, 40)), rng.integers(0, 64, (2, 40))
    )
    hidden = jax.random.normal(jax.random.key(1), (2, 40, model.config.hidden_size))
    loss, count, correct, excluded = shot_label_sums(
        hidden, jnp.asarray(targets), jnp.asarray(kind),
        lambda h: model.logits_for(h, candidates), candidates, budget=40,
    )  # fmt: skip
    assert float(excluded) == 0  # without segment ids nothing is left out
    full = np.asarray(model.logits(hidden))[..., list(candidates)]
    where = kind == 3
    labels = np.searchsorted(candidates, targets[where])
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(full[where]), labels)
    assert float(count) == where.sum()
    assert float(loss) == pytest.approx(float(ce.sum()), rel=1e-5)
    assert float(correct) == (full[where].argmax(-1) == labels).sum()


def test_answer_sums_split_by_kind_add_up(model):
    rng = np.random.default_rng(1)
    kind = rng.choice([0, 1, 2], size=(2, 30), p=[0.4, 0.4, 0.2])
    mask = kind > 0
    targets = rng.integers(0, 64, (2, 30))
    hidden = jax.random.normal(jax.random.key(2), (2, 30, model.config.hidden_size))
    sums = answer_loss_sums(
        hidden, jnp.asarray(targets), jnp.asarray(mask), model.logits, 30, jnp.asarray(kind)
    )
    assert float(sums.kind_tokens[1]) == (kind == 1).sum()
    assert float(sums.kind_tokens[2]) == (kind == 2).sum()
    assert float(sums.kind_loss.sum()) == pytest.approx(float(sums.loss), rel=1e-6)
    assert float(sums.kind_correct.sum()) == float(sums.correct)
