"""More than 10 classes: labels of 10 and above are printed as integers (several digit
tokens), every digit is in the loss and marked as a label token."""

import json
import re

import numpy as np
import pytest

from mllm_jax.encoding.prompt import build_prompt
from mllm_jax.encoding.sampling import SamplingConfig
from mllm_jax.encoding.tokens import (
    PromptTokenizer,
    TokenKind,
    load_backend_tokenizer,
    render_chat,
)

N_CLASSES = 15


@pytest.fixture(scope="module")
def backend():
    return load_backend_tokenizer()


@pytest.fixture(scope="module")
def fast(backend):
    return PromptTokenizer(backend)


def fifteen_class_prompt(max_classes=16):
    rng = np.random.default_rng(0)
    X_train = rng.normal(size=(40, 3))
    y_train = np.concatenate([np.arange(N_CLASSES), rng.integers(0, N_CLASSES, 25)])
    X_test = rng.normal(size=(5, 3))
    y_test = np.array([12, 1, 14, 0, 10])
    prompt = build_prompt(X_train, y_train, X_test, y_test, max_classes=max_classes)
    return prompt, y_train, y_test


def runs(mask):
    """(start, stop) of every run of True in a bool[n] array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def test_fifteen_class_prompt_text_ids_and_label_tokens(backend, fast):
    prompt, y_train, y_test = fifteen_class_prompt()
    messages = prompt.messages()
    user, answer = messages[1]["content"], messages[2]["content"]
    assert f"Label set = {list(range(N_CLASSES))}.  \n" in user
    assert "Label set = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]." in user
    shown = [int(v) for v in re.findall(r"^[\d,]+\|(\d+)$", user, flags=re.M)]
    assert shown == y_train.tolist()
    assert answer == json.dumps([{"id": i, "label": int(v)} for i, v in enumerate(y_test)])
    assert '"label": 12}' in answer and '"label": 10}]' in answer

    encoded = fast.encode(prompt)
    text = render_chat(messages)
    assert encoded.ids.tolist() == backend.encode(text, add_special_tokens=False).ids

    # the loss mask covers the whole answer, every digit of every label included
    answer_ids = encoded.ids[encoded.answer_mask].tolist()
    assert backend.decode(answer_ids, skip_special_tokens=False) == answer + "<|im_end|>"

    # LABEL marks exactly the label tokens: one run per query, its digits
    label = encoded.token_kind == TokenKind.LABEL
    assert not (label & ~encoded.answer_mask).any()
    spelled = [backend.decode(encoded.ids[a:b].tolist()) for a, b in runs(label)]
    assert spelled == [str(v) for v in y_test]
    assert [b - a for a, b in runs(label)] == [len(str(v)) for v in y_test]
    digits = set(fast.digit_ids.tolist())
    assert set(encoded.ids[label].tolist()) <= digits

    # SHOT_LABEL marks exactly the shots' label digits
    shot = encoded.token_kind == TokenKind.SHOT_LABEL
    spelled = [backend.decode(encoded.ids[a:b].tolist()) for a, b in runs(shot)]
    assert spelled == [str(v) for v in y_train]


def test_default_refuses_more_than_ten_classes_and_none_lifts_it():
    with pytest.raises(ValueError, match="15 classes in the training rows, more than the 10"):
        fifteen_class_prompt(max_classes=10)
    prompt, _, _ = fifteen_class_prompt(max_classes=None)
    assert (
        "Label set = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]."
        in (prompt.messages()[1]["content"])
    )


def test_sampling_max_classes_is_a_config_value():
    assert SamplingConfig().max_classes == 10
    assert SamplingConfig(max_classes=64).max_classes == 64
    with pytest.raises(ValueError, match="max_classes must be >= 1"):
        SamplingConfig(max_classes=0)
