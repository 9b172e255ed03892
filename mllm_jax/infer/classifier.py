"""`MLLMClassifier`: a scikit-learn classifier that predicts by many-shot in-context learning.

    from mllm_jax.infer import MLLMClassifier
    clf = MLLMClassifier("path/to/MachineLearningLM-7B-v1", dtype="bfloat16").fit(X, y)
    proba = clf.predict_proba(X_test)        # f64[n, len(clf.classes_)]

`fit` checks and stores the examples (the shots); `predict_proba` writes them into the
MachineLearningLM prompt with the test rows in chunks, runs the shared prefix once and
scores each chunk's answer slot by slot (`mode="score"`), or generates the JSON answer
and reads it with the reference's fallbacks (`mode="generate"`). With `n_ensembles > 1`
the shots (and columns) are reordered per member and the probabilities averaged.

Rows of one chunk attend to each other, so by default a row's probabilities depend on
the rows predicted beside it (as in the reference, ~50 per prompt). `independent_rows=True`
gives every test row a prompt of its own after the same cached shots, batched along the
batch axis: predictions then do not depend on the other rows, their order or their count.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from mllm_jax.infer.answers import Source, read_answer
from mllm_jax.infer.loading import LoadedModel, ModelLoadError, load_model
from mllm_jax.infer.prompts import PROMPT_FORMATS, answer_frame, build_chunked_prompt
from mllm_jax.infer.runner import RunSettings, decode_prompt, score_prompt
from mllm_jax.infer.validation import (
    align_columns,
    as_frame,
    check_finite,
    check_labels,
    check_numbers_stay_numbers,
    drop_empty_columns,
)
from mllm_jax.infer.vote import VOTES, reference_vote

MODES = ("score", "generate")
BATCH_INDEPENDENT = 4
"""Default one-row prompts per model call with independent_rows (docs/infer.md)."""


def _floating(dtype: Any) -> bool:
    import jax.numpy as jnp

    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:
        return False


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What `MLLMClassifier.predict_details` returns.

    proba: f64[n, K] averaged over ensemble members (columns follow `classes_`).
    codes: i64[n] the predicted class of each row, as an index into `classes_`: the
        argmax of `proba` (`vote="mean"`) or the members' reference vote
        (`vote="reference"`, `mllm_jax.infer.vote`).
    members: per ensemble member, f64[n, K] its own probabilities.
    sources: per member, per row, how the label was read ("score" mode: "scored"; JSON
        mode: "parsed" | "probabilities" | "default", see `mllm_jax.infer.answers`).
    answers: per member, per chunk, the generated text (JSON mode only).
    prompt_tokens: tokens of all prompts (prefix counted once per member).
    seconds: wall time of the prediction.
    """

    proba: np.ndarray
    codes: np.ndarray
    members: tuple[np.ndarray, ...]
    sources: tuple[tuple[Source | Literal["scored"], ...], ...]
    answers: tuple[tuple[str, ...], ...]
    prompt_tokens: int
    seconds: float


class MLLMClassifier(ClassifierMixin, BaseEstimator):
    """Tabular classification by many-shot in-context learning with a MachineLearningLM-style LLM.

    Args:
        model_path: Hugging Face Qwen2 checkpoint directory (config.json + safetensors;
            its tokenizer.json when present, else the packaged Qwen2.5 tokenizer), or a
            `mllm-jax train` run directory.
        adapter_path: a PEFT LoRA adapter directory applied to `model_path` (merged).
        checkpoint_step: which checkpoint of a training run: None (newest), "best" or a
            step number.
        mode: "score" (label probabilities slot by slot, no parsing) or "generate"
            (greedy JSON answer + the reference's parsing fallbacks).
        prompt_format: "chat" (Qwen2.5 ChatML, as trained) or "raw" (system + "\\n" +
            user without a template, as the reference's vLLM evaluation fed it).
        n_shots: use at most this many training rows (a seeded uniform draw); None: all.
        chunk_size: test rows per prompt (the reference used 50).
        independent_rows: one test row per prompt (chunk_size is then 1), so that a row's
            prediction does not depend on the rows passed beside it; the shots are still
            computed once and cached.
        batch_size: prompts (chunks) per model call; None: 1 on CPU (XLA:CPU runs the
            shared-prefix attention of several rows slower than one), 4 on accelerators,
            BATCH_INDEPENDENT on either with independent_rows.
        n_ensembles: prompts with reordered shots and columns whose probabilities are
            averaged (member 0 keeps the given order).
        vote: how `predict` combines the members: "mean" (argmax of the averaged
            probabilities) or "reference" (MachineLearningLM's confidence-weighted vote of
            the members' labels, `mllm_jax.infer.vote`; use with n_ensembles=2 as its
            evaluation did). `predict_proba` is the averaged probabilities either way.
        dtype: parameter/compute dtype ("float32", "bfloat16"); None: the checkpoint's.
        random_state: seed of the shot draw and the ensemble orders (None means 0).
        style: prompt style, "concat" (default) or "tabllm".
        clip_max: upper clip of the encoded numbers (None as the reference, 999 the paper).
        pandas2_floats: print the values of float-typed columns as "512.0", as the
            reference's evaluation prompts did under pandas 2 (the bytes the released
            MachineLearningLM-7B-v1 was evaluated on); models trained here saw "512".
        yarn_factor: switch on (or change) YaRN rope scaling for prompts beyond the
            model's native positions (the reference used 4 for 131,072 tokens).
        max_new_tokens: generation budget per chunk (JSON mode); None: 1.25x the answer
            length + 16.
        prefill_chunk: prompt tokens per model call while prefilling.
        attention_query_chunk: queries per attention block (memory of the score matrix).
        empty_columns: "drop" (warn and leave out columns missing in every shot) or "error".
        verbose: show a progress bar.
    """

    def __init__(
        self,
        model_path: str,
        *,
        adapter_path: str | None = None,
        checkpoint_step: int | str | None = None,
        mode: str = "score",
        prompt_format: str = "chat",
        n_shots: int | None = None,
        chunk_size: int = 50,
        independent_rows: bool = False,
        batch_size: int | None = None,
        n_ensembles: int = 1,
        vote: str = "mean",
        dtype: str | None = None,
        random_state: int | None = 0,
        style: str = "concat",
        clip_max: int | None = None,
        pandas2_floats: bool = False,
        yarn_factor: float | None = None,
        max_new_tokens: int | None = None,
        prefill_chunk: int = 2048,
        attention_query_chunk: int | None = None,
        empty_columns: str = "drop",
        verbose: bool = False,
    ) -> None:
        self.model_path = model_path
        self.adapter_path = adapter_path
        self.checkpoint_step = checkpoint_step
        self.mode = mode
        self.prompt_format = prompt_format
        self.n_shots = n_shots
        self.chunk_size = chunk_size
        self.independent_rows = independent_rows
        self.batch_size = batch_size
        self.n_ensembles = n_ensembles
        self.vote = vote
        self.dtype = dtype
        self.random_state = random_state
        self.style = style
        self.clip_max = clip_max
        self.pandas2_floats = pandas2_floats
        self.yarn_factor = yarn_factor
        self.max_new_tokens = max_new_tokens
        self.prefill_chunk = prefill_chunk
        self.attention_query_chunk = attention_query_chunk
        self.empty_columns = empty_columns
        self.verbose = verbose

    def __sklearn_tags__(self):
        """It reads text and missing values (the prompt writes both), not sparse input."""
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.string = True
        tags.input_tags.categorical = True
        tags.input_tags.sparse = False
        return tags

    # ------------------------------------------------------------------ settings

    def _check_params(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, got {self.vote!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}"
            )
        for name in ("chunk_size", "batch_size", "n_ensembles", "prefill_chunk"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.independent_rows, bool | np.bool_):
            raise ValueError(
                f"independent_rows must be True or False, got {self.independent_rows!r}"
            )
        if self.n_shots is not None and self.n_shots < 1:
            raise ValueError(f"n_shots must be >= 1 or None, got {self.n_shots}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {self.max_new_tokens}")
        if self.dtype is not None and not _floating(self.dtype):
            # (an unknown name was reported against the model's config.json)
            raise ValueError(
                f"dtype must be a floating type such as 'float32' or 'bfloat16' (or None), "
                f"got {self.dtype!r}"
            )

    def _batch_size(self) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        if self.independent_rows:
            return BATCH_INDEPENDENT
        import jax

        return 1 if jax.default_backend() == "cpu" else 4

    def _chunk_size(self) -> int:
        return 1 if self.independent_rows else int(self.chunk_size)

    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _loaded(self) -> LoadedModel:
        try:
            return load_model(
                self.model_path,
                adapter=self.adapter_path,
                step=self.checkpoint_step,
                dtype=self.dtype,
                yarn_factor=self.yarn_factor,
                attention_query_chunk=self.attention_query_chunk,
            )
        except FileNotFoundError as error:
            raise ModelLoadError(str(error)) from error

    # ----------------------------------------------------------------------- fit

    def fit(self, X: Any, y: Any) -> MLLMClassifier:
        """Checks and stores the examples; loads the model (cached between instances).

        X: [shots, features] DataFrame or array (numbers, text, NaN); y: [shots] labels
        (any sortable values; more than 10 classes are printed as codes 10, 11, ...,
        several tokens each, and scored exactly: docs/infer.md).
        """
        self._check_params()
        frame = as_frame(X, "X")
        classes, codes = check_labels(y, len(frame))
        check_finite(frame, "X")
        # scikit-learn's convention: feature_names_in_ only for string column names.
        if isinstance(X, pd.DataFrame) and all(isinstance(c, str) for c in frame.columns):
            self.feature_names_in_ = np.asarray(frame.columns, dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.n_features_in_ = frame.shape[1]
        self.feature_columns_ = list(frame.columns)
        self.columns_by_name_ = isinstance(X, pd.DataFrame)

        rows = np.arange(len(frame))
        if self.n_shots is not None and self.n_shots < len(frame):
            rows = np.random.default_rng((self._seed(), 0)).choice(
                len(frame), self.n_shots, replace=False
            )
        shots = frame.iloc[rows].reset_index(drop=True)
        self.used_columns_ = drop_empty_columns(shots, self.empty_columns, "X")
        self.shots_ = shots[self.used_columns_]
        self.shot_codes_ = codes[rows]
        self.classes_ = classes
        counts = np.bincount(self.shot_codes_, minlength=len(classes))
        self.default_code_ = int(np.argmax(counts))
        self._loaded()
        return self

    # ------------------------------------------------------------------- predict

    def _test_frame(self, X: Any) -> pd.DataFrame:
        check_is_fitted(self, "classes_")
        frame = as_frame(X, "X")
        by_name = self.columns_by_name_ and isinstance(X, pd.DataFrame)
        frame = align_columns(frame, self.feature_columns_, by_name, "X")
        check_finite(frame, "X")
        check_numbers_stay_numbers(frame[self.used_columns_], self.shots_, "X")
        return frame[self.used_columns_]

    def _member(self, member: int, test: pd.DataFrame):
        """(shots, codes, test) of ensemble member `member` (0 = as given)."""
        shots, codes = self.shots_, self.shot_codes_
        if member == 0:
            return shots, codes, test
        rng = np.random.default_rng((self._seed(), 1, member))
        rows = rng.permutation(len(shots))
        columns = [shots.columns[j] for j in rng.permutation(shots.shape[1])]
        return shots.iloc[rows][columns].reset_index(drop=True), codes[rows], test[columns]

    def _max_new_tokens(self, loaded: LoadedModel, rows: int) -> int:
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        # the frame, the last label, "}]", eos; labels of 10 and up take more digits
        extra_digits = rows * (len(str(len(self.classes_) - 1)) - 1)
        answer = len(answer_frame(loaded.prompt_tokenizer, rows).ids) + 3 + extra_digits
        return -(-(int(answer * 1.25) + 16) // 64) * 64  # a few budgets -> a few compilations

    def predict_details(self, X: Any) -> Prediction:
        """Probabilities plus how each row was read, generated texts and timings."""
        start = time.perf_counter()
        self._check_params()
        test = self._test_frame(X)
        loaded = self._loaded()
        settings = RunSettings(self._batch_size(), self.prefill_chunk)
        n_classes = len(self.classes_)
        total = np.zeros((len(test), n_classes), np.float64)
        sources, answers, tokens, members = [], [], 0, []
        with _Progress(self.verbose, len(test) * self.n_ensembles) as advance:
            for member in range(self.n_ensembles):
                shots, codes, member_test = self._member(member, test)
                prompt = build_chunked_prompt(
                    loaded.prompt_tokenizer,
                    shots,
                    codes,
                    member_test,
                    chunk_size=self._chunk_size(),
                    prompt_format=self.prompt_format,  # type: ignore[arg-type]
                    style=self.style,  # type: ignore[arg-type]
                    clip_max=self.clip_max,
                    pandas2_floats=self.pandas2_floats,
                )
                tokens += len(prompt.prefix) + sum(len(q) for q in prompt.queries)
                if self.mode == "score":
                    log_probs = score_prompt(loaded, prompt, n_classes, settings, advance)
                    proba = np.exp(log_probs.astype(np.float64))
                    sources.append(("scored",) * len(test))
                    answers.append(())
                else:
                    proba, member_sources, texts = self._generate(
                        loaded, prompt, n_classes, settings, advance
                    )
                    sources.append(member_sources)
                    answers.append(texts)
                members.append(proba / proba.sum(axis=1, keepdims=True))
                total += members[-1]
        proba = total / self.n_ensembles
        proba /= proba.sum(axis=1, keepdims=True)
        if self.vote == "reference":
            read = [np.array([s in ("scored", "parsed") for s in member]) for member in sources]
            codes = reference_vote(members, read)
        else:
            codes = np.argmax(proba, axis=1)
        return Prediction(
            proba,
            codes,
            tuple(members),
            tuple(sources),
            tuple(answers),
            tokens,
            time.perf_counter() - start,
        )

    def _generate(self, loaded, prompt, n_classes, settings, advance):
        budget = self._max_new_tokens(loaded, max(len(r) for r in prompt.rows))
        chunks = decode_prompt(loaded, prompt, n_classes, budget, settings, advance)
        texts_of: dict[int, str] = {}

        def text(token: int) -> str:
            if token not in texts_of:
                texts_of[token] = loaded.tokenizer.decode([token], skip_special_tokens=False)
            return texts_of[token]

        proba = np.zeros((prompt.rows[-1].stop, n_classes), np.float64)
        sources: list[Source] = []
        answers = []
        for chunk, rows in zip(chunks, prompt.rows, strict=True):
            token_texts = [text(int(t)) for t in chunk.tokens]
            answer = loaded.tokenizer.decode(chunk.tokens.tolist(), skip_special_tokens=False)
            read = read_answer(
                token_texts,
                chunk.label_log_probs,
                len(rows),
                n_classes,
                self.default_code_,
                text=answer,
            )
            proba[rows.start : rows.stop] = read.proba
            sources.extend(read.sources)
            answers.append(answer)
        return proba, tuple(sources), tuple(answers)

    def predict_proba(self, X: Any) -> np.ndarray:
        """f64[n, len(classes_)] class probabilities (rows sum to 1)."""
        return self.predict_details(X).proba

    def predict(self, X: Any) -> np.ndarray:
        """[n] the most probable class of each row (ties: the first in `classes_`), or the
        members' reference vote (`vote="reference"`)."""
        codes = self.predict_details(X).codes  # an unfitted model raises NotFittedError here
        return self.classes_[codes]


class _Progress:
    """A rich progress bar over test rows when `enabled`; yields an `advance(n)` callable."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.bar: Any = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(  # on stderr with the other messages (stdout was the bar's)
            "[bold]predict",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        task = self.bar.add_task("rows", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
