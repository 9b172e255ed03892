"""Digit-softmax label metrics with labels of several tokens (more than 10 classes): the
prompts showing one are left out of them, explicitly counted, never mis-scored."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mllm_jax.encoding.prompt import build_prompt
from mllm_jax.encoding.tokens import PromptTokenizer, load_backend_tokenizer
from mllm_jax.model import Qwen2ForCausalLM, preset
from mllm_jax.train.label_metrics import (
    label_metrics,
    label_slots,
    multi_token_segments,
    shot_metrics,
    shot_slots,
)
from mllm_jax.train.loss import one_token_prompts, shot_label_sums
from mllm_jax.train.step import sums_metrics

DIGITS = tuple(range(15, 25))


def mixed_batch():
    """One row, two packed prompts. Prompt 1: shots 1, 0, 1, queries 1, 0 (one token
    each). Prompt 2: shots 12, 3, 0, query 13 (labels "1","2" and "1","3": two tokens)."""
    kinds, targets, segs = [], [], []

    def add(seg, kind, tokens):
        for token in tokens:
            kinds.append(kind)
            targets.append(token)
            segs.append(seg)

    for label in (1, 0, 1):
        add(1, 0, [100])
        add(1, 3, [DIGITS[label]])
    for label in (1, 0):
        add(1, 1, [200])
        add(1, 2, [DIGITS[label]])
    add(1, 1, [202])
    for label in ((1, 2), (3,), (0,)):
        add(2, 0, [100])
        add(2, 3, [DIGITS[d] for d in label])
    add(2, 1, [200])
    add(2, 2, [DIGITS[1], DIGITS[3]])
    add(2, 1, [202])
    kind = np.array(kinds)[None, None]
    return {
        "token_kind": kind,
        "targets": np.array(targets)[None, None],
        "segment_ids": np.array(segs)[None, None],
        "loss_mask": (kind == 1) | (kind == 2),
    }


def test_host_metrics_leave_out_and_count_the_multi_token_prompt():
    batch = mixed_batch()
    kind, segment = batch["token_kind"][0, 0], batch["segment_ids"][0, 0]
    assert multi_token_segments(kind, segment).tolist() == [2]
    slots = label_slots(batch, budget=16, candidates=DIGITS)
    assert slots.label.tolist() == [1, 0] and slots.excluded == 2  # "1","3" left out
    logits = np.zeros((1, 1, 16, 10))
    logits[0, 0, 1, 1] = logits[0, 0, 3, 0] = 5.0  # prompt 1 right; prompt 2 never read
    out = label_metrics(slots, logits)
    assert out["label_accuracy"] == 1.0 and out["label_slots"] == 2
    assert out["label_tokens_excluded"] == 2
    shots = shot_slots(batch, budget=8, candidates=DIGITS)
    assert shots.label.tolist() == [1, 0, 1]  # prompt 2's "1","2","3","0" are not slots
    assert "shot_by_before" in shot_metrics(shots, np.zeros((1, 1, 8, 10)))
    # a batch of multi-token prompts only: no metric, but the count
    only = {k: v[..., 11:] for k, v in batch.items()}
    none = label_slots(only, budget=16, candidates=DIGITS)
    assert label_metrics(none, np.zeros((1, 1, 16, 10))) == {"label_tokens_excluded": 2}


def test_device_mask_equals_the_host_rule_on_real_prompts():
    """A 3-class and a 15-class training prompt packed in one row: the 15-class prompt
    (labels "10".."14") is the one left out, on device and on host alike."""
    tok = PromptTokenizer(load_backend_tokenizer())
    rng = np.random.default_rng(0)
    kinds, segs = [], []
    for seg, k in ((1, 3), (2, 15), (3, 2)):
        y = np.concatenate([np.arange(k), rng.integers(0, k, 10)])
        prompt = build_prompt(
            rng.normal(size=(len(y), 2)), y, rng.normal(size=(4, 2)), [0, k - 1, 1, 0],
            max_classes=None,
        )  # fmt: skip
        kinds.append(tok.encode(prompt).token_kind)
        segs.append(np.full(len(kinds[-1]), seg))
    kind, segment = np.concatenate(kinds)[None], np.concatenate(segs)[None]
    kept = np.asarray(one_token_prompts(jnp.asarray(kind), jnp.asarray(segment)))[0]
    assert multi_token_segments(kind[0], segment[0]).tolist() == [2]
    np.testing.assert_array_equal(kept, segment[0] != 2)


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(
        preset("tiny", vocab_size=64, tie_word_embeddings=True), rngs=nnx.Rngs(0)
    )


def test_shot_label_loss_leaves_out_and_counts_the_multi_token_prompt(model):
    batch = mixed_batch()
    kind = batch["token_kind"][0]
    targets = np.where(kind == 3, batch["targets"][0], 1) % 64  # tiny vocabulary
    candidates = tuple(d % 64 for d in DIGITS)
    hidden = jax.random.normal(jax.random.key(1), (*kind.shape, model.config.hidden_size))
    loss, count, correct, excluded = shot_label_sums(
        hidden, jnp.asarray(targets), jnp.asarray(kind),
        lambda h: model.logits_for(h, candidates), candidates, budget=16,
        segment_ids=jnp.asarray(batch["segment_ids"][0]),
    )  # fmt: skip
    where = (kind == 3) & (batch["segment_ids"][0] == 1)  # prompt 1's shots only
    full = np.asarray(model.logits(hidden))[..., list(candidates)]
    labels = np.asarray([candidates.index(t) for t in targets[where]])
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(full[where]), labels)
    assert float(count) == 3 and float(excluded) == 4
    assert float(loss) == pytest.approx(float(ce.sum()), rel=1e-5)
    assert float(correct) == (full[where].argmax(-1) == labels).sum()


def test_sums_metrics_report_the_excluded_shot_label_tokens():
    from mllm_jax.train.loss import zero_sums

    sums = zero_sums()._replace(shot_excluded=jnp.float32(4))
    assert float(sums_metrics(sums)["shot_label_tokens_excluded"]) == 4
