"""Inference: prompt split, prefix-cache scoring against full recomputation, generation,
MLLMClassifier (probabilities, determinism, scikit-learn API) and bad input.

One tiny random Qwen2 with the real Qwen2.5 vocabulary (tied embeddings, so the
checkpoint stays small) serves every test; every model call uses the same padded shapes
(chunks of 3 test rows, batches of 2, prefixes under 1024 tokens), so the whole module
compiles a handful of programs.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx
from scoring_models import save_tiny_scoring_model
from sklearn.base import clone

from mllm_jax.encoding.prompt import build_prompt
from mllm_jax.encoding.tokens import PromptTokenizer, load_backend_tokenizer, render_chat
from mllm_jax.infer import (
    ContextLengthError,
    EmptyColumnWarning,
    MLLMClassifier,
    ModelLoadError,
    RunSettings,
    answer_frame,
    build_chunked_prompt,
    decode_prompt,
    from_model,
    load_model,
    score_prompt,
)
from mllm_jax.infer.engine import label_logits
from mllm_jax.model import Qwen2ForCausalLM, decode_greedy, preset

SETTINGS = RunSettings(batch_size=2, prefill_chunk=1024)
COMMON = dict(chunk_size=3, batch_size=2, prefill_chunk=1024, dtype="float32")
HIDDEN = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg, return_hidden=True))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("infer") / "tiny"
    save_tiny_scoring_model(directory, 0)
    return directory


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt)


def table(n: int, seed: int, text: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(10, 3, size=n)})
    frame.loc[rng.random(n) < 0.2, "b"] = np.nan
    if text:
        frame["c"] = rng.choice(["red", "green", "blue sky"], n)
    else:
        frame["c"] = rng.integers(0, 5, n).astype(float)
    return frame


def labels(n: int, seed: int, k: int = 3) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, k, n)


# ----------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def backend():
    return load_backend_tokenizer()


@pytest.mark.parametrize(
    ("text", "style", "fmt"),
    [
        (False, "concat", "chat"),
        (True, "concat", "chat"),
        (True, "tabllm", "chat"),
        (False, "concat", "raw"),
        (False, "concat", "raw-pandas2"),
    ],
)
def test_prefix_plus_query_is_the_training_prompt(backend, text, style, fmt):
    """Every chunk's prefix + query ids equal the real tokenizer on the prompt text that
    training uses (chat) or the reference's raw string (with its pandas 2 float bytes),
    plus the answer head."""
    fast = PromptTokenizer(backend)
    shots, y, test = table(12, 0, text), labels(12, 0), table(8, 1, text)
    pandas2 = fmt == "raw-pandas2"
    fmt = "raw" if pandas2 else fmt
    prompt = build_chunked_prompt(
        fast, shots, y, test, chunk_size=3, style=style, prompt_format=fmt, pandas2_floats=pandas2
    )
    assert [len(r) for r in prompt.rows] == [3, 3, 2]
    head = '[{"id": 0, "label": '
    for c, rows in enumerate(prompt.rows):
        chunk = test.iloc[rows.start : rows.stop]
        built = build_prompt(shots, y, chunk, style=style, pandas2_floats=pandas2)
        messages = built.messages()
        assert (".0," in messages[1]["content"]) == pandas2  # float columns print "512.0"
        if fmt == "chat":
            text_ = render_chat(messages, add_generation_prompt=True)
            np.testing.assert_array_equal(
                prompt.full_ids(c)[: -prompt.answer_head], fast.encode(built).ids
            )
        else:
            text_ = messages[0]["content"] + "\n" + messages[1]["content"]
        expected = backend.encode(text_, add_special_tokens=False).ids
        expected += backend.encode(head, add_special_tokens=False).ids
        np.testing.assert_array_equal(prompt.full_ids(c), expected)


def test_answer_frame_is_the_training_answer(backend):
    """Label slots of the frame, filled with labels, give the tokens of the training answer."""
    fast = PromptTokenizer(backend)
    y = np.array([2, 0, 1, 1, 0, 2, 2, 1, 0, 1, 2, 0])
    shots, test = table(6, 2), table(len(y), 3)
    frame = answer_frame(fast, len(y))
    filled = frame.ids.copy()
    filled[frame.slots] = fast.digit_ids[y]
    training = fast.encode(build_prompt(shots, labels(6, 2), test, y))
    answer = training.ids[training.answer_mask]
    np.testing.assert_array_equal(filled, answer[: len(filled)])
    steps, segments = frame.steps(fast.pad_id)
    assert steps.shape[0] == len(y) - 1
    rebuilt = np.concatenate(
        [frame.head, *(s[g > 0] for s, g in zip(steps, segments, strict=True))]
    )
    np.testing.assert_array_equal(rebuilt[frame.slots[:-1]], fast.digit_ids[0].repeat(len(y) - 1))


def test_split_survives_a_test_header_inside_a_text_value(backend):
    """A training value that contains the test-set header cannot move the cut into a
    place where the ids would not concatenate (the cut must follow a digit)."""
    fast = PromptTokenizer(backend)
    shots = pd.DataFrame({"t": ["x\n\n[Test set] y", "plain"], "n": [1.0, 2.0]})
    prompt = build_chunked_prompt(fast, shots, np.array([0, 1]), shots, chunk_size=1)
    for c, rows in enumerate(prompt.rows):
        built = build_prompt(shots, [0, 1], shots.iloc[rows.start : rows.stop])
        np.testing.assert_array_equal(
            prompt.full_ids(c)[: -prompt.answer_head], fast.encode(built).ids
        )


# ------------------------------------------------------------------------ engine


def test_label_logits_equal_the_lm_head(loaded):
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), jnp.float32)
    ids = jnp.asarray(loaded.prompt_tokenizer.digit_ids)
    full = loaded.model.logits(hidden)[:, ids]
    np.testing.assert_allclose(label_logits(loaded.model, hidden, ids), full, atol=1e-5)


def _full_label_log_probs(loaded, prompt, log_probs, n_classes):
    """Scores every chunk's whole prompt + answer (greedy labels in the slots) in one
    call without any cache; returns the label log-probabilities at every slot."""
    tok = loaded.prompt_tokenizer
    seqs, slot_positions = [], []
    for c, rows in enumerate(prompt.rows):
        frame = answer_frame(tok, len(rows))
        answer = frame.ids.copy()
        answer[frame.slots] = tok.digit_ids[np.argmax(log_probs[rows.start : rows.stop], -1)]
        body = prompt.full_ids(c)[: -prompt.answer_head]
        seqs.append(np.concatenate([body, answer]))
        slot_positions.append(len(body) + frame.slots - 1)
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    seg = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], seg[r, : len(s)] = s, 1
    # The LM head only where it is read (all [rows, width, vocab] logits are ~1 GB).
    hidden = HIDDEN(loaded.model, jnp.asarray(ids), jnp.asarray(seg))
    out = []
    for r, positions in enumerate(slot_positions):
        logits = np.asarray(loaded.model.logits(hidden[r, positions]))
        picked = logits[:, tok.digit_ids[:n_classes]].astype(np.float64)
        out.append(picked - np.log(np.exp(picked).sum(-1, keepdims=True)))
    return np.concatenate(out)


def test_prefix_cache_scoring_equals_scoring_without_cache(loaded):
    """Slot-by-slot scoring with the shared prefix cache and an incremental answer cache
    equals one uncached forward pass over each chunk's whole prompt + answer (float32:
    probabilities within 1e-5, log-probabilities within 1e-5 relative), and equals
    re-encoding the prefix for every chunk."""
    prompt = build_chunked_prompt(
        loaded.prompt_tokenizer, table(16, 4), labels(16, 4), table(7, 5), chunk_size=3
    )
    cached = score_prompt(loaded, prompt, 3, SETTINGS)
    assert cached.shape == (7, 3) and np.isfinite(cached).all()
    full = _full_label_log_probs(loaded, prompt, cached, 3)
    np.testing.assert_allclose(np.exp(cached), np.exp(full), atol=1e-5)  # probabilities
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)  # log-probabilities
    no_reuse = score_prompt(loaded, prompt, 3, RunSettings(2, 1024, reuse_prefix=False))
    np.testing.assert_allclose(np.exp(no_reuse), np.exp(cached), atol=1e-5)
    np.testing.assert_allclose(no_reuse, cached, rtol=1e-5, atol=1e-6)
    # Not trivially flat: the random model's distributions differ between rows.
    assert np.exp(cached).std(axis=0).max() > 0.05


def test_generation_with_prefix_reuse_equals_generate_greedy(loaded):
    prompt = build_chunked_prompt(
        loaded.prompt_tokenizer, table(10, 6), labels(10, 6), table(5, 7), chunk_size=3
    )
    chunks = decode_prompt(loaded, prompt, 3, 8, SETTINGS)
    bodies = [prompt.full_ids(c)[: -prompt.answer_head].tolist() for c in range(2)]
    reference = decode_greedy(
        loaded.model, bodies, max_new_tokens=8, eos_token_id=loaded.eos_ids.tolist()
    )
    for chunk, tokens in zip(chunks, reference.as_lists(), strict=True):
        kept = tokens[:-1] if tokens and tokens[-1] in loaded.eos_ids else tokens
        assert chunk.tokens.tolist() == kept
        assert chunk.label_log_probs.shape == (len(kept), 3)
        np.testing.assert_allclose(np.exp(chunk.label_log_probs).sum(-1), 1.0, rtol=1e-5)


# -------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def fitted(ckpt):
    shots = table(16, 8, text=True)
    y = np.array(["cat", "dog", "eel"])[labels(16, 8)]
    return MLLMClassifier(str(ckpt), **COMMON).fit(shots, y), shots, y


def test_classifier_probabilities(fitted):
    clf, _, _ = fitted
    test = table(7, 9, text=True)
    proba = clf.predict_proba(test)
    assert proba.shape == (7, 3) and proba.dtype == np.float64
    assert np.isfinite(proba).all() and (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(test), clf.classes_[np.argmax(proba, axis=1)])
    assert clf.classes_.tolist() == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(clf.predict_proba(test), proba)  # deterministic
    # Reordering the test columns by name changes nothing.
    np.testing.assert_array_equal(clf.predict_proba(test[["c", "a", "b"]]), proba)
    truth = np.array(["cat", "dog", "eel", "eel", "dog", "cat", "cat"])
    assert clf.score(test, truth) == pytest.approx(np.mean(clf.predict(test) == truth))


def test_independent_rows(fitted):
    """independent_rows: a row's probabilities are those of a one-row prompt after the
    same shots, whatever rows come with it (order, subset, batch), and equal the uncached
    full forward pass of that one-row prompt; chunked rows move with their neighbours."""
    clf, shots, y = fitted
    test = table(7, 21, text=True)
    alone = clone(clf).set_params(independent_rows=True, batch_size=3).fit(shots, y)
    proba = alone.predict_proba(test)
    order = np.array([6, 2, 0, 5, 1, 4, 3])
    np.testing.assert_allclose(alone.predict_proba(test.iloc[order]), proba[order], atol=1e-6)
    np.testing.assert_allclose(alone.predict_proba(test.iloc[[4]]), proba[[4]], atol=1e-6)
    one_row = clone(clf).set_params(chunk_size=1, batch_size=1).fit(shots, y)
    np.testing.assert_allclose(one_row.predict_proba(test), proba, atol=1e-6)
    loaded = alone._loaded()
    prompt = build_chunked_prompt(
        loaded.prompt_tokenizer, alone.shots_, alone.shot_codes_, test.iloc[[2]], chunk_size=1
    )
    full = _full_label_log_probs(loaded, prompt, np.zeros((1, 3), np.float32), 3)
    np.testing.assert_allclose(np.exp(full), proba[[2]], atol=1e-5)
    # The default shares prompts between rows: some row's probabilities change with order.
    chunked = clf.predict_proba(test)
    assert not np.allclose(clf.predict_proba(test.iloc[order]), chunked[order], atol=1e-6)
    with pytest.raises(ValueError, match="independent_rows must be True or False"):
        clone(clf).set_params(independent_rows="yes").fit(shots, y)


def test_query_bucket():
    from mllm_jax.infer.runner import QUERY_BUCKET, query_bucket

    assert [query_bucket(n) for n in (1, 32, 33, 64, 65, 200, 256, 900)] == [
        32, 32, 64, 64, 128, 256, QUERY_BUCKET, QUERY_BUCKET,
    ]  # fmt: skip


def test_ensembles_are_seeded(fitted):
    clf, shots, y = fitted
    test = table(4, 10, text=True)
    one = clf.predict_proba(test)
    two = clone(clf).set_params(n_ensembles=2).fit(shots, y)
    again = clone(two).fit(shots, y)
    other = clone(two).set_params(random_state=1).fit(shots, y)
    p2 = two.predict_proba(test)
    np.testing.assert_array_equal(p2, again.predict_proba(test))
    assert not np.allclose(p2, other.predict_proba(test))
    assert not np.allclose(p2, one)
    np.testing.assert_allclose(p2.sum(axis=1), 1.0, atol=1e-12)
    details = two.predict_details(test)
    assert len(details.sources) == len(details.members) == 2
    np.testing.assert_allclose(np.mean(details.members, axis=0), p2, atol=1e-12)
    assert two.predict(test).tolist() == two.classes_[np.argmax(p2, axis=1)].tolist()


def test_reference_vote_decides_predict(fitted):
    from mllm_jax.infer.vote import reference_vote

    clf, shots, y = fitted
    test = table(6, 10, text=True)
    voter = clone(clf).set_params(n_ensembles=2, vote="reference").fit(shots, y)
    details = voter.predict_details(test)
    want = reference_vote(details.members, [np.ones(len(test), bool)] * 2)  # all scored
    assert details.codes.tolist() == want.tolist()
    assert voter.predict(test).tolist() == voter.classes_[want].tolist()
    np.testing.assert_array_equal(voter.predict_proba(test), details.proba)
    with pytest.raises(ValueError, match="vote must be one of"):
        clone(clf).set_params(vote="max").fit(shots, y).predict(test)


def test_scikit_learn_api(fitted, ckpt):
    clf, shots, y = fitted
    params = clf.get_params()
    assert params["model_path"] == str(ckpt) and params["chunk_size"] == 3
    copy = clone(clf)
    assert copy.get_params() == params and not hasattr(copy, "classes_")
    copy.set_params(n_shots=8, random_state=3)
    copy.fit(shots, y)
    assert len(copy.shots_) == 8 and copy.n_features_in_ == 3
    assert copy.feature_names_in_.tolist() == ["a", "b", "c"]
    # numpy input (object array for the text column) works the same way
    arr = MLLMClassifier(str(ckpt), **COMMON).fit(shots.to_numpy(), y)
    np.testing.assert_allclose(
        arr.predict_proba(shots.to_numpy()[:3]), clf.predict_proba(shots.iloc[:3]), atol=1e-12
    )
    # its tags say what it reads: text and missing values, not sparse matrices
    tags = clf.__sklearn_tags__().input_tags
    assert (tags.allow_nan, tags.string, tags.sparse) == (True, True, False)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        clone(clf).predict(shots)


def test_generate_mode(fitted):
    clf, shots, y = fitted
    gen = clone(clf).set_params(mode="generate", max_new_tokens=8).fit(shots, y)
    test = table(5, 11, text=True)
    details = gen.predict_details(test)
    proba = details.proba
    assert proba.shape == (5, 3) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    # A random model writes no JSON: every row is labelled by a fallback.
    assert set(details.sources[0]) <= {"probabilities", "default"}
    assert len(details.answers[0]) == 2
    np.testing.assert_array_equal(gen.predict(test), gen.classes_[np.argmax(proba, axis=1)])


def test_raw_prompt_format(fitted):
    """The reference's raw prompt (system + "\\n" + user, no chat template) scores and
    generates like the chat prompt does, with different probabilities."""
    clf, shots, y = fitted
    test = table(4, 20, text=True)
    raw = clone(clf).set_params(prompt_format="raw").fit(shots, y)
    proba = raw.predict_proba(test)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert np.abs(proba - clf.predict_proba(test)).max() > 1e-3
    gen = clone(raw).set_params(mode="generate", max_new_tokens=8).fit(shots, y)
    np.testing.assert_allclose(gen.predict_proba(test).sum(axis=1), 1.0, atol=1e-12)


# --------------------------------------------------------------------- bad input


def test_bad_labels(ckpt):
    clf = MLLMClassifier(str(ckpt), **COMMON)
    X = table(12, 12)
    # more than 10 classes are fine: codes of 10 and above are spelled with two tokens
    assert len(clf.fit(table(11, 12), np.arange(11)).classes_) == 11
    with pytest.raises(ValueError, match="missing labels.*row 2"):
        clf.fit(X, np.where(np.arange(12) == 2, np.nan, 1.0))
    with pytest.raises(ValueError, match="y has 5 labels but X has 12 rows"):
        clf.fit(X, np.zeros(5))
    with pytest.raises(ValueError, match="y is continuous .* a regression target"):
        clf.fit(X, np.linspace(0, 1, 12))
    with pytest.raises(ValueError, match=r"y holds an infinite label \(inf at row 3\)"):
        clf.fit(X, np.where(np.arange(12) == 3, np.inf, 1.0))
    with pytest.raises(ValueError, match="y holds complex numbers"):
        clf.fit(X, np.ones(12, dtype=complex))
    # whole numbers as floats are class labels
    assert clf.fit(X, np.arange(12) % 3 * 1.0).classes_.tolist() == [0.0, 1.0, 2.0]


def test_bad_tables(ckpt, fitted):
    clf = MLLMClassifier(str(ckpt), **COMMON)
    X, y = table(12, 13), labels(12, 13)
    with pytest.raises(ValueError, match="X is empty"):
        clf.fit(X.iloc[:0], y[:0])
    with pytest.raises(ValueError, match="no feature columns"):
        clf.fit(X[[]], y)
    bad = X.copy()
    bad.loc[4, "b"] = np.inf
    with pytest.raises(ValueError, match=r"column 'b' holds an infinite value \(inf at row 4\)"):
        clf.fit(bad, y)
    model, _, _ = fitted
    with pytest.raises(ValueError, match="column 'b' holds an infinite value"):
        model.predict_proba(bad.assign(c=["red"] * 12))
    with pytest.raises(ValueError, match="X is empty"):
        model.predict_proba(table(3, 1, text=True).iloc[:0])
    with pytest.raises(ValueError, match="X holds complex numbers"):
        clf.fit(X.to_numpy() + 1j, y)
    with pytest.raises(ValueError, match="X column 'a' holds complex numbers"):
        clf.fit(X.assign(a=X["a"] + 1j), y)
    import scipy.sparse

    with pytest.raises(TypeError, match="sparse matrix; .* pass a dense array"):
        clf.fit(scipy.sparse.csr_matrix(X.to_numpy()), y)
    text_in_numbers = table(3, 2, text=True).astype({"a": object})
    text_in_numbers.loc[1, "a"] = "abc"
    with pytest.raises(
        ValueError, match=r"column 'a' holds numbers in the shots but 'abc' at row 1"
    ):
        model.predict_proba(text_in_numbers)


def test_column_mismatch(fitted):
    clf, _, _ = fitted
    test = table(3, 14, text=True)
    with pytest.raises(ValueError, match=r"missing \['c'\], unexpected \[\]"):
        clf.predict_proba(test[["a", "b"]])
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['d'\]"):
        clf.predict_proba(test.assign(d=1.0))
    numeric = clone(clf).fit(table(9, 15).to_numpy(), labels(9, 15))
    with pytest.raises(
        ValueError, match="has 2 features, but MLLMClassifier is expecting 3 features"
    ):
        numeric.predict_proba(np.zeros((2, 2)))


def test_all_missing_column(ckpt):
    X, y = table(9, 16), labels(9, 16)
    X["empty"] = np.nan
    with pytest.warns(EmptyColumnWarning, match=r"\['empty'\] are missing in every shot"):
        clf = MLLMClassifier(str(ckpt), **COMMON).fit(X, y)
    assert clf.used_columns_ == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"columns \['empty'\] are missing in every shot"):
        MLLMClassifier(str(ckpt), empty_columns="error", **COMMON).fit(X, y)
    # The dropped column is also ignored (whatever it holds) at predict time.
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyColumnWarning)
        proba = clf.predict_proba(X.assign(empty=5.0).iloc[:3])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)


def test_prompt_over_the_context_limit(ckpt, fitted):
    """The tiny model has 2048 positions: 300 shots do not fit, the error says how many
    tokens were needed and what the limit is; YaRN raises the limit."""
    X, y = table(300, 17), labels(300, 17)
    clf = MLLMClassifier(str(ckpt), **COMMON).fit(X, y)
    with pytest.raises(
        ContextLengthError, match=r"needs [\d,]+ tokens.*limit of 2,048.*yarn_factor"
    ):
        clf.predict_proba(X.iloc[:2])
    assert load_model(ckpt, yarn_factor=4, use_cache=False).context_limit == 8192
    # With YaRN (factor 4: 8,192 positions) the same prompt is scored.
    yarn = clone(clf).set_params(yarn_factor=4).fit(X, y)
    details = yarn.predict_details(X.iloc[:2])
    assert details.prompt_tokens > 2048
    assert np.isfinite(details.proba).all()
    np.testing.assert_allclose(details.proba.sum(axis=1), 1.0, atol=1e-12)


def test_bad_model_and_options(tmp_path, fitted):
    _, shots, y = fitted
    with pytest.raises(ModelLoadError, match="model directory not found"):
        MLLMClassifier(str(tmp_path / "nope")).fit(shots, y)
    with pytest.raises(ModelLoadError, match="no config.json"):
        MLLMClassifier(str(tmp_path)).fit(shots, y)
    with pytest.raises(ValueError, match="mode must be one of"):
        MLLMClassifier(str(tmp_path), mode="vote").fit(shots, y)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        MLLMClassifier(str(tmp_path), chunk_size=0).fit(shots, y)
    # vocab 512: the Qwen tokenizer does not fit (an abstract model: no weights needed)
    small = nnx.eval_shape(lambda: Qwen2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ModelLoadError, match="vocab_size 512 is smaller than the tokenizer"):
        from_model(small)


# ----------------------------------------------------------- adapters, train runs


def test_base_plus_peft_adapter_equals_the_merged_checkpoint(ckpt, fitted, tmp_path):
    """`adapter_path` (a PEFT LoRA directory on the base) scores like the merged export."""
    from mllm_jax.export import save_merged_hf, save_peft_adapter
    from mllm_jax.model import load_hf
    from mllm_jax.model.lora import LoRAConfig, apply_lora, lora_layers

    base_clf, shots, y = fitted
    model = load_hf(ckpt)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0), key=1)
    rng = np.random.default_rng(0)
    for linear in lora_layers(model).values():  # B starts at zero; make the adapter matter
        linear.lora.b.set_value(jnp.asarray(rng.normal(0, 0.3, linear.lora.b.shape), jnp.float32))
    save_peft_adapter(model, tmp_path / "adapter")
    save_merged_hf(model, tmp_path / "merged")
    test = table(4, 18, text=True)
    adapted = MLLMClassifier(str(ckpt), adapter_path=str(tmp_path / "adapter"), **COMMON)
    merged = MLLMClassifier(str(tmp_path / "merged"), **COMMON)
    p_adapted = adapted.fit(shots, y).predict_proba(test)
    p_merged = merged.fit(shots, y).predict_proba(test)
    np.testing.assert_allclose(p_adapted, p_merged, atol=1e-6)
    assert np.abs(p_adapted - base_clf.predict_proba(test)).max() > 1e-3
    with pytest.raises(ModelLoadError, match="adapter directory not found"):
        MLLMClassifier(str(ckpt), adapter_path=str(tmp_path / "nope"), **COMMON).fit(shots, y)
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        MLLMClassifier(str(ckpt), adapter_path=str(tmp_path), **COMMON).fit(shots, y)


@pytest.mark.slow
def test_training_run_directory(ckpt, fitted, tmp_path):
    """A `mllm-jax train` run (LoRA on the tiny base) loads by its directory, newest step
    by default; equal to its merged export."""
    from mllm_jax.export import save_merged_hf
    from mllm_jax.foundation.config import load_config
    from mllm_jax.runs.config import TrainConfig
    from mllm_jax.runs.loading import load_trained
    from mllm_jax.train.loop import train

    data = "{kind: synthetic, seed: 1, synthetic: {batch_size: 4, seq_len: 48}}"
    (tmp_path / "run.yaml").write_text(
        f"mode: lora\nlora: {{rank: 2}}\nmodel: {{base: {ckpt}, compute_dtype: float32, "
        "frozen_dtype: float32}\n"
        f"stages:\n  - {{name: main, steps: 2, learning_rate: 0.05, data: {data}}}\n"
        "mesh: {data: 2, fsdp: 2, tensor: 2}\nmax_answer_tokens: 16\n"
        "logging: {progress: false}\n"
    )
    run = tmp_path / "run"
    train(load_config(TrainConfig, tmp_path / "run.yaml", [f"run_dir={run}"]))
    model, _ = load_trained(run)
    save_merged_hf(model, tmp_path / "merged")
    _, shots, y = fitted
    test = table(4, 19, text=True)
    from_run = MLLMClassifier(str(run), **COMMON).fit(shots, y).predict_proba(test)
    exported = MLLMClassifier(str(tmp_path / "merged"), **COMMON).fit(shots, y)
    np.testing.assert_allclose(from_run, exported.predict_proba(test), atol=1e-6)
