"""The MachineLearningLM prompt, byte for byte: system, user and assistant messages.

Compatible with the reference's ``prompt_gen/prompt_utils.py`` (``format_lines``,
``build_user_prompt``, ``build_full_prompt``) and ``data_prompt_gen.py``: the same
``[Data]`` block, training rows ``v1,...,vF|label``, query rows ``ID i:v1,...,vF``, the
output requirements and the assistant answer ``json.dumps([{"id": i, "label": l}, ...])``.
The trailing double spaces and blank lines are part of the format.

The user message and the answer are kept as segments (``segments.Grid`` for the integer
blocks) so ``tokens.PromptTokenizer`` can turn them into ids without rendering text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from mllm_jax.encoding.segments import Grid, Segment, render
from mllm_jax.encoding.table import EncodedFeatures, encode_table

SYSTEM_PROMPT = "You are an AI assistant. Your task is supervised classification."
MAX_CLASSES = 10
"""The default largest label set: the reference model was trained on up to 10 classes,
labels 0..9 (one digit token each). Larger sets are allowed where a caller passes a larger
``max_classes`` (or None): a label of 10 and above is printed as its integer, as the
reference prints every label (``str(int)``), so Qwen2's tokenizer spells it with one
token per digit (label 12 is "1", "2"; docs/encoding.md)."""

Style = Literal["concat", "tabllm"]
STYLES: tuple[str, ...] = ("concat", "tabllm")

_OUTPUT_REQUIREMENTS = (
    "\n\n[Output requirements]\n"
    "Return **only** a JSON array.\n"
    'Each element: {"id": <ID>, "label": <predicted_label>}\n'
    "\n"
    "Begin when ready. Do not output anything except the JSON array.\n"
)


@dataclass(frozen=True)
class Prompt:
    """One prompt: system text, user segments and, for training, the answer segments."""

    system: str
    user: tuple[Segment, ...]
    answer: tuple[Segment, ...] | None = None

    def messages(self) -> list[dict[str, str]]:
        """Chat messages: system, user and (when the answer is known) assistant."""
        out = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": render(self.user)},
        ]
        if self.answer is not None:
            out.append({"role": "assistant", "content": render(self.answer)})
        return out


def check_labels(y: object, what: str) -> np.ndarray:
    """Labels as i64[rows]; raises ValueError on NaN, non-integer or negative labels."""
    if isinstance(y, pd.Series | pd.Index):
        y = y.to_numpy(
            dtype=np.float64
            if pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
            else None,
            na_value=np.nan,
        )
    array = np.asarray(y)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.number) or array.dtype == object):
        raise ValueError(
            f"{what} must hold integer class labels 0, 1, ..., got dtype {array.dtype}; "
            "map the classes to integers first"
        )
    try:
        floats = array.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} holds non-numeric labels: {exc}") from exc
    if np.isnan(floats).any():
        raise ValueError(f"{what} holds NaN labels (row {int(np.argmax(np.isnan(floats)))})")
    if (floats != np.round(floats)).any() or (floats < 0).any():
        bad = floats[(floats != np.round(floats)) | (floats < 0)][0]
        raise ValueError(f"{what} labels must be integers >= 0, got {bad}")
    return floats.astype(np.int64)


def label_set(y_train: np.ndarray, max_classes: int | None = MAX_CLASSES) -> list[int]:
    """The sorted classes shown in the prompt; raises when there are more than
    ``max_classes`` (None: no limit)."""
    classes = sorted(int(v) for v in set(np.asarray(y_train).tolist()))
    if max_classes is not None and len(classes) > max_classes:
        raise ValueError(
            f"{len(classes)} classes in the training rows, more than the {max_classes} "
            f"supported (classes {classes[:12]}{'...' if len(classes) > 12 else ''})"
        )
    return classes


def _data_block(
    features: EncodedFeatures,
    classes: list[int],
    style: Style,
    include_feature_descriptions: bool,
) -> str:
    n = features.n_features
    if style == "tabllm":
        return (
            "\n[Data]\n"
            f"• Each sample contains {n} features and 1 label. Label set = {classes}.\n"
            "• Format: FeatureName is value, FeatureName is value, ..., Label is label_value\n"
            f"• Features: {', '.join(features.names)}\n"
            "\n"
        )
    descriptions = ""
    if include_feature_descriptions:
        descriptions = f"• Feature descriptions  (in order) \n {','.join(features.names)}\n"
    return (
        "\n[Data]\n"
        f"• Each sample = {n} features + 1 label.  Label set = {classes}.  \n"
        '• Features in a row are comma-separated.  Features and label are separated by "|".\n'
        f"{descriptions}\n"
        "\n"
    )


def _test_header(style: Style, n_test: int) -> str:
    what = "feature assignments" if style == "tabllm" else "N features"
    return (
        "\n\n[Test set]  (keep original order!)  \n"
        f"Each row = ID, then {what} (ID is NOT a feature).  \n"
        f"{n_test} rows:  \n"
    )


def _text_rows(
    features: EncodedFeatures, y_train: np.ndarray, style: Style
) -> tuple[list[str], list[str]]:
    train_cells = features.cells("train").tolist()
    test_cells = features.cells("test").tolist()
    labels = y_train.tolist()
    if style == "tabllm":
        names = features.names

        def pairs(row: list[str]) -> str:
            return ", ".join(f"{name} is {v}" for name, v in zip(names, row, strict=True))

        train = [
            f"{pairs(row)}, Label is {label}"
            for row, label in zip(train_cells, labels, strict=True)
        ]
        test = [f"ID {i}: {pairs(row)}" for i, row in enumerate(test_cells)]
        return train, test
    train = [
        ",".join(row) + "|" + str(label) for row, label in zip(train_cells, labels, strict=True)
    ]
    test = [f"ID {i}:" + ",".join(row) for i, row in enumerate(test_cells)]
    return train, test


def user_segments(
    features: EncodedFeatures,
    y_train: np.ndarray,
    *,
    style: Style = "concat",
    include_feature_descriptions: bool = False,
    max_classes: int | None = MAX_CLASSES,
) -> tuple[Segment, ...]:
    """The user message as segments.

    Args:
        features: encoded cells of the shots (train) and queries (test).
        y_train: i64[n_train] labels of the shots.
        style: "concat" (the reference default) or "tabllm".
        include_feature_descriptions: the reference's optional feature-name line (concat).
        max_classes: refuse label sets larger than this (None: no limit). Labels of
            10 and above are printed as integers, several digit tokens each.
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}, expected one of {STYLES}")
    y_train = np.asarray(y_train, dtype=np.int64)
    if len(y_train) != features.train.shape[0]:
        raise ValueError(f"{len(y_train)} labels for {features.train.shape[0]} training rows")
    classes = label_set(y_train, max_classes)
    n_train, n_test = features.train.shape[0], features.test.shape[0]
    head = _data_block(features, classes, style, include_feature_descriptions)
    head += f"[Training set]  (order of rows does NOT matter)  \n{n_train} rows:  \n"
    test_header = _test_header(style, n_test)

    if style == "concat" and features.all_numbers:
        n = features.n_features
        train_grid = Grid(
            np.concatenate([features.train, y_train[:, None]], axis=1),
            (",",) * (n - 1) + ("|", "\n"),
        )
        ids = np.arange(n_test, dtype=np.int64)[:, None]
        test_grid = Grid(
            np.concatenate([ids, features.test], axis=1),
            (":",) + (",",) * (n - 1) + ("\nID ",),
        )
        return (head, train_grid, test_header + "ID ", test_grid, _OUTPUT_REQUIREMENTS)

    train_lines, test_lines = _text_rows(features, y_train, style)
    text = (
        head + "\n".join(train_lines) + test_header + "\n".join(test_lines) + _OUTPUT_REQUIREMENTS
    )
    return (text,)


def answer_segments(y_test: np.ndarray) -> tuple[Segment, ...]:
    """The assistant answer ``[{"id": 0, "label": l0}, ...]`` (``json.dumps`` bytes)."""
    y_test = np.asarray(y_test, dtype=np.int64)
    if len(y_test) == 0:
        raise ValueError("the answer needs at least one query row")
    grid = Grid(
        np.stack([np.arange(len(y_test), dtype=np.int64), y_test], axis=1),
        (', "label": ', '}, {"id": '),
    )
    return ('[{"id": ', grid, "}]")


def answer_text(y_test: Sequence[int]) -> str:
    """The reference's answer string, ``json.dumps`` of the id/label records."""
    return json.dumps(
        [{"id": i, "label": int(v)} for i, v in enumerate(y_test)], ensure_ascii=False
    )


def build_prompt(
    X_train: object,
    y_train: object,
    X_test: object,
    y_test: object | None = None,
    *,
    style: Style = "concat",
    clip_max: int | None = None,
    feature_names: Sequence[str] | None = None,
    include_feature_descriptions: bool = False,
    pandas2_floats: bool = False,
    max_classes: int | None = MAX_CLASSES,
    system_prompt: str = SYSTEM_PROMPT,
) -> Prompt:
    """Like :func:`build_messages`, but returns the segments (for the fast token path)."""
    y_train_ints = check_labels(y_train, "y_train")
    features = encode_table(
        X_train,
        X_test,
        clip_max=clip_max,
        feature_names=feature_names,
        pandas2_floats=pandas2_floats,
    )
    if len(y_train_ints) != features.train.shape[0]:
        raise ValueError(
            f"y_train has {len(y_train_ints)} labels but X_train has {features.train.shape[0]} rows"
        )
    user = user_segments(
        features,
        y_train_ints,
        style=style,
        include_feature_descriptions=include_feature_descriptions,
        max_classes=max_classes,
    )
    answer = None
    if y_test is not None:
        y_test_ints = check_labels(y_test, "y_test")
        if len(y_test_ints) != features.test.shape[0]:
            raise ValueError(
                f"y_test has {len(y_test_ints)} labels but X_test has {features.test.shape[0]} rows"
            )
        answer = answer_segments(y_test_ints)
    return Prompt(system_prompt, user, answer)


def build_messages(
    X_train: object,
    y_train: object,
    X_test: object,
    y_test: object | None = None,
    **options: object,
) -> list[dict[str, str]]:
    """The chat messages of one MachineLearningLM prompt.

    Applies the reference normalisation to raw tables (numeric columns -> 0..999-style
    integers with the statistics of ``X_train``; text columns as they are) and formats
    the reference's prompt. Defaults reproduce the reference bytes.

    Args:
        X_train: [n_train, features] shots, DataFrame or array (numbers, text, NaN).
        y_train: [n_train] integer labels >= 0, at most ``max_classes`` distinct.
        X_test: [n_test, features] queries (about 50 per prompt in the reference).
        y_test: [n_test] labels; when given, the assistant answer is appended.
        **options: ``style`` ("concat" | "tabllm"), ``clip_max`` (None | 999),
            ``feature_names``, ``include_feature_descriptions``, ``pandas2_floats``,
            ``max_classes`` (10; None for no limit), ``system_prompt``; see :func:`build_prompt`.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]`` plus
        ``{"role": "assistant", ...}`` when ``y_test`` is given.
    """
    return build_prompt(X_train, y_train, X_test, y_test, **options).messages()  # type: ignore[arg-type]
