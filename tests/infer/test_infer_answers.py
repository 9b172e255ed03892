"""Reading generated answers: the reference's JSON rules and fallbacks (no model needed)."""

import json

import numpy as np
import pytest

from mllm_jax.encoding.prompt import answer_text
from mllm_jax.encoding.tokens import PromptTokenizer, load_backend_tokenizer
from mllm_jax.infer.answers import label_positions, parse_labels, read_answer
from mllm_jax.infer.prompts import answer_frame


@pytest.fixture(scope="module")
def backend():
    return load_backend_tokenizer()


def _tokens(backend, text: str) -> list[str]:
    ids = backend.encode(text, add_special_tokens=False).ids
    return [backend.decode([i]) for i in ids]


def _log_probs(n_tokens: int, n_classes: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n_tokens, n_classes)) * 2
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.mark.parametrize(
    ("text", "rows", "expected"),
    [
        ('[{"id": 0, "label": 1}, {"id": 1, "label": 0}]', 2, [1, 0]),
        ('[{"id": 0, "label": "2"}, {"id": 1, "label": 1.0}]', 2, [2, 1]),  # int() as the reference
        ('[{"id": 0, "label": 1}]', 2, [None, None]),  # wrong length: every row falls back
        ('[{"id": 0, "label": 1}, {"id": 1, "label": 0}', 2, [None, None]),  # truncated
        ('[{"id": 0, "label": "x"}, {"id": 1}]', 2, [None, None]),  # no integer label
        ('[{"id": 0, "label": true}, 3]', 2, [None, None]),
        ("not json at all", 1, [None]),
        ('{"id": 0, "label": 1}', 1, [None]),  # an object, not an array
    ],
)
def test_parse_labels(text, rows, expected):
    assert parse_labels(text, rows) == expected


def test_label_positions_are_the_answer_slots(backend):
    """On the real tokenization of an answer, the value tokens are the frame's slots."""
    labels = [1, 0, 2, 2, 1, 0, 1, 2, 0, 1, 2, 0]
    texts = _tokens(backend, answer_text(labels))
    frame = answer_frame(PromptTokenizer(backend), len(labels))
    assert label_positions(texts) == frame.slots.tolist()
    assert [texts[p] for p in label_positions(texts)] == [str(v) for v in labels]


def test_read_answer_parsed_rows_take_the_slot_distribution(backend):
    labels = [2, 0, 1]
    texts = _tokens(backend, answer_text(labels))
    log_probs = _log_probs(len(texts), 3)
    slots = label_positions(texts)
    # A greedy answer writes each slot's most probable label: make the logits agree.
    for slot, label in zip(slots, labels, strict=True):
        log_probs[slot, label] = 5.0
    read = read_answer(texts, log_probs, rows=3, n_classes=3, default=1)
    assert read.sources == ("parsed",) * 3
    assert read.labels.tolist() == labels
    for k, slot in enumerate(slots):
        expected = np.exp(log_probs[slot]) / np.exp(log_probs[slot]).sum()
        np.testing.assert_allclose(read.proba[k], expected, rtol=1e-12)
    assert (np.argmax(read.proba, axis=1) == read.labels).all()


def test_read_answer_falls_back_to_probabilities_then_default(backend):
    """A cut-off answer: rows with a label position use its distribution, the rest the
    default label (the reference's rules 2 and 3)."""
    full = answer_text([1, 1, 1, 1])
    cut = full[: full.index('"id": 2')]  # rows 0 and 1 have label tokens, 2 and 3 do not
    texts = _tokens(backend, cut)
    log_probs = _log_probs(len(texts), 3, seed=1)
    read = read_answer(texts, log_probs, rows=4, n_classes=3, default=2)
    assert read.sources == ("probabilities", "probabilities", "default", "default")
    slots = label_positions(texts)
    assert len(slots) == 2
    for k in range(2):
        assert read.labels[k] == np.argmax(log_probs[slots[k]])
    assert read.labels[2:].tolist() == [2, 2]
    np.testing.assert_array_equal(read.proba[2:], [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_allclose(read.proba.sum(axis=1), 1.0)


def test_read_answer_label_outside_the_classes_falls_back(backend):
    """The reference kept an out-of-set label (always wrong); ours reads the slot's
    distribution over the real classes instead."""
    texts = _tokens(backend, json.dumps([{"id": 0, "label": 7}, {"id": 1, "label": 0}]))
    log_probs = _log_probs(len(texts), 2, seed=2)
    read = read_answer(texts, log_probs, rows=2, n_classes=2, default=0)
    assert read.sources == ("probabilities", "parsed")
    slot = label_positions(texts)[0]
    assert read.labels[0] == np.argmax(log_probs[slot])


def test_read_answer_quoted_label_uses_its_slot(backend):
    texts = _tokens(backend, '[{"id": 0, "label": "1"}]')
    log_probs = _log_probs(len(texts), 2)
    slot = label_positions(texts)[0]
    assert texts[slot] == "1"
    log_probs[slot] = np.log([0.2, 0.8])
    read = read_answer(texts, log_probs, rows=1, n_classes=2, default=0)
    assert read.sources == ("parsed",)
    np.testing.assert_allclose(read.proba, [[0.2, 0.8]])


def test_read_answer_parsed_label_without_a_slot_is_one_hot(backend):
    """Valid JSON whose label token cannot be located (an escaped key) still counts; its
    probabilities are one-hot on the parsed label."""
    texts = _tokens(backend, '[{"id": 0, "\\u006cabel": 1}]')
    assert label_positions(texts) == []
    read = read_answer(texts, _log_probs(len(texts), 2), rows=1, n_classes=2, default=0)
    assert read.sources == ("parsed",)
    np.testing.assert_array_equal(read.proba, [[0.0, 1.0]])
