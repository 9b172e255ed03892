"""More than 10 classes at inference: every class's whole spelling (its digits and the
token closing the label) scored with the prefix cache, checked against brute-force
teacher-forced sequence probabilities; the classifier, generation mode and labels."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx
from scipy.special import logsumexp
from scoring_models import save_tiny_scoring_model

from mllm_jax.encoding.prompt import answer_segments, answer_text
from mllm_jax.encoding.tokens import load_backend_tokenizer
from mllm_jax.infer import (
    MLLMClassifier,
    RunSettings,
    build_chunked_prompt,
    load_model,
    read_answer,
    runner,
    score_prompt,
)
from mllm_jax.infer.labels import LabelSpelling, answer_closers, label_spelling

N_CLASSES = 15
SETTINGS = RunSettings(batch_size=2, prefill_chunk=1024)
HIDDEN = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg, return_hidden=True))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("many") / "tiny"
    save_tiny_scoring_model(directory, 3)
    return directory


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def backend():
    return load_backend_tokenizer()


def table(n, seed):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 9, n).astype(float)})


def shot_codes(n, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.arange(N_CLASSES), rng.integers(0, N_CLASSES, n - N_CLASSES)])


def brute_force(loaded, backend, prompt, written):
    """Normalised class log-probabilities f64[n_test, K] from whole sequences run without
    any cache: prompt + answer so far (the labels `written` i64[n_test] in the earlier
    slots) + class c's digits + the token closing its label, the log-probabilities of
    those tokens summed."""
    tok = loaded.prompt_tokenizer
    seqs, scored = [], []
    for chunk, rows in enumerate(prompt.rows):
        body = prompt.full_ids(chunk)[: -prompt.answer_head]
        for k in range(len(rows)):
            for c in range(N_CLASSES):
                labels = written[rows.start : rows.stop].copy()
                labels[k] = c
                ids = tok.segment_ids(answer_segments(labels))
                # the real tokenizer's ids of the reference's answer string
                assert ids.tolist() == backend.encode(answer_text(labels)).ids
                head = answer_text(labels).split(f'"id": {k}, "label": ')[0]
                n_head = len(tok.text_ids(f'{head}"id": {k}, "label": ', followed_by_digit=True))
                n = len(str(c)) + 1
                closer = "}]" if k == len(rows) - 1 else "},"
                assert backend.decode(ids[n_head : n_head + n].tolist()) == f"{c}{closer}"
                seqs.append(np.concatenate([body, ids[: n_head + n]]))
                scored.append(len(body) + n_head + np.arange(n))
    # One shape for every call (16 rows, width a multiple of 256): HIDDEN compiles once.
    width = -(-max(len(s) for s in seqs) // 256) * 256
    total = np.zeros(len(seqs))
    for start in range(0, len(seqs), 16):
        part = seqs[start : start + 16]
        ids = np.zeros((16, width), np.int32)
        seg = np.zeros((16, width), np.int32)
        for r, s in enumerate(part):
            ids[r, : len(s)], seg[r, : len(s)] = s, 1
        hidden = HIDDEN(loaded.model, jnp.asarray(ids), jnp.asarray(seg))
        for r, s in enumerate(part):
            at = scored[start + r]
            logits = np.asarray(loaded.model.logits(hidden[r, at - 1]), np.float64)
            picked = logits[np.arange(len(at)), s[at]] - logsumexp(logits, axis=-1)
            total[start + r] = picked.sum()
    scores = total.reshape(-1, N_CLASSES)
    return scores - logsumexp(scores, axis=1, keepdims=True)


def test_spelling_and_closers(loaded, backend):
    tok = loaded.prompt_tokenizer
    spelling = label_spelling(tok, N_CLASSES)
    assert spelling.lengths.tolist() == [1] * 10 + [2] * 5
    for c in (0, 7, 10, 14):
        spelled = spelling.tokens[c, : spelling.lengths[c]].tolist()
        assert spelled == backend.encode(str(c)).ids
    wide = label_spelling(tok, 120)  # three-digit codes: any length is laid out alike
    assert wide.width == 3 and wide.lengths[[9, 10, 99, 100, 119]].tolist() == [1, 2, 2, 3, 3]
    right, mask = wide.right_aligned()
    assert right[105].tolist() == backend.encode("105").ids and mask[7].tolist() == [0, 0, 1]
    closers = answer_closers(tok, 3)
    assert [backend.decode([t]) for t in closers] == ["},", "},", "}]"]
    # "1" and "12" share their first token; the closing token tells them apart
    one = backend.encode('[{"id": 0, "label": 1}]').ids
    twelve = backend.encode('[{"id": 0, "label": 12}]').ids
    assert one[:-1] == twelve[:-2] and one[-1] == twelve[-1] == closers[-1]


def fifteen_class_prompt(loaded):
    """24 shots of 15 classes, 5 test rows in chunks of 3 and 2."""
    return build_chunked_prompt(
        loaded.prompt_tokenizer, table(24, 1), shot_codes(24, 1), table(5, 2), chunk_size=3
    )


def test_scoring_equals_brute_force_sequence_probabilities(loaded, backend):
    """15 classes (labels of 1 and 2 tokens), chunks of 3 and 2 rows in one batch: the
    prefix-cached, slot-by-slot scores equal whole-sequence teacher forcing within 1e-5,
    with and without prefix reuse."""
    prompt = fifteen_class_prompt(loaded)
    cached = score_prompt(loaded, prompt, N_CLASSES, SETTINGS).astype(np.float64)
    assert cached.shape == (5, N_CLASSES)
    np.testing.assert_allclose(np.exp(cached).sum(1), 1.0, atol=1e-5)
    greedy = cached.argmax(1)
    full = brute_force(loaded, backend, prompt, greedy)
    np.testing.assert_allclose(np.exp(cached), np.exp(full), atol=1e-5)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
    assert np.exp(cached).std(axis=0).max() > 0.02  # not flat
    no_reuse = score_prompt(loaded, prompt, N_CLASSES, RunSettings(1, 1024, reuse_prefix=False))
    np.testing.assert_allclose(np.exp(no_reuse), np.exp(cached), atol=1e-5)


class WritesTwelve(LabelSpelling):
    """Scores every class as it is, but writes "12" into the answer whatever the greedy
    prediction (a random model seldom prefers a two-token label)."""

    def right_aligned(self):
        tokens, mask = super().right_aligned()
        return np.repeat(tokens[12:13], len(tokens), 0), np.repeat(mask[12:13], len(mask), 0)


def test_scoring_after_two_token_labels_equals_brute_force(loaded, backend, monkeypatch):
    """Two-token labels written into the answer (and the cache) before later slots are
    scored: still equal to whole-sequence teacher forcing."""
    real = runner.label_spelling
    monkeypatch.setattr(
        runner, "label_spelling", lambda tok, n: WritesTwelve(*vars(real(tok, n)).values())
    )
    prompt = fifteen_class_prompt(loaded)
    cached = score_prompt(loaded, prompt, N_CLASSES, SETTINGS).astype(np.float64)
    full = brute_force(loaded, backend, prompt, np.full(5, 12))
    np.testing.assert_allclose(np.exp(cached), np.exp(full), atol=1e-5)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    honest = score_prompt(loaded, prompt, N_CLASSES, SETTINGS)
    np.testing.assert_array_equal(cached[[0, 3]], honest[[0, 3]])  # first slots alike
    assert not np.allclose(cached[[1, 2, 4]], honest[[1, 2, 4]], atol=1e-4)


def test_first_token_alone_would_score_otherwise(loaded):
    """The closing token matters: class 1's score is not the probability of its first
    digit alone (which also starts 10-14), so the 15-class scores of classes 0-9 are not
    the 10-class (one-token) scores."""
    prompt = fifteen_class_prompt(loaded)  # the shapes the tests above compiled
    spelled = np.exp(score_prompt(loaded, prompt, N_CLASSES, SETTINGS)[0])
    single = np.exp(score_prompt(loaded, prompt, 10, SETTINGS)[0])  # digits 0-9 only
    # scored with the closing token, classes 0-9 compare otherwise than by first digit
    assert not np.allclose(spelled[:10] / spelled[:10].sum(), single, atol=1e-4)


def test_classifier_with_fifteen_classes(ckpt):
    names = np.array([f"class {c:02d}" for c in range(N_CLASSES)])
    y = names[shot_codes(24, 5)]
    common = dict(chunk_size=3, batch_size=2, prefill_chunk=1024, dtype="float32")
    clf = MLLMClassifier(str(ckpt), **common).fit(table(24, 5), y)
    assert clf.classes_.tolist() == names.tolist()
    proba = clf.predict_proba(table(4, 6))
    assert proba.shape == (4, N_CLASSES)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    assert set(clf.predict(table(4, 6))) <= set(names)
    generated = clf.set_params(mode="generate", max_new_tokens=8).predict_details(table(4, 6))
    assert generated.proba.shape == (4, N_CLASSES)
    assert set(generated.sources[0]) <= {"parsed", "default"}


def test_generated_multi_token_labels_are_parsed_not_read_from_first_digits():
    texts = ["[", '{"', "label", '":', " ", "1", "2", "}]"]
    log_probs = np.log(np.full((len(texts), 10), 0.1))
    read = read_answer(texts, log_probs, rows=1, n_classes=15, default=3)
    assert read.labels.tolist() == [12] and read.sources == ("parsed",)
    assert read.proba[0, 12] == 1.0
    broken = read_answer([*texts[:-1], "?"], log_probs, rows=2, n_classes=15, default=3)
    assert broken.labels.tolist() == [3, 3] and broken.sources == ("default", "default")
