"""A prompt as a sequence of segments: literal text, integer grids and special tokens.

The text of a prompt is the concatenation of its segments. Keeping the integer blocks
(the rows of the table, the answer array) as arrays instead of strings lets the token
path turn them into ids with a few numpy operations (see ``tokens.PromptTokenizer``),
and lets the text path render them when text is wanted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Rows of non-negative integers printed as decimal digits with separators.

    The text is every cell in row-major order, each followed by ``separators[column]``,
    except the very last cell, which is followed by nothing. With ``separators =
    (",", ",", "|", "\\n")`` a grid [[512, 3, 77, 1], [0, 45, 999, 0]] prints
    ``512,3,77|1\\n0,45,999|0``.

    Attributes:
        values: i64[rows, columns], every entry >= 0; at least one row.
        separators: one string per column.
    """

    values: np.ndarray
    separators: tuple[str, ...]

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
            raise ValueError(f"a grid needs [rows>0, columns>0] values, got shape {values.shape}")
        if len(self.separators) != values.shape[1]:
            raise ValueError(
                f"{len(self.separators)} separators for a grid of {values.shape[1]} columns"
            )
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"grid values must be integers, got dtype {values.dtype}")
        if values.min() < 0:
            raise ValueError(f"grid values must be >= 0, got {values.min()}")

    @property
    def n_rows(self) -> int:
        return int(np.shape(self.values)[0])

    def render(self) -> str:
        rows = np.asarray(self.values).tolist()
        seps = self.separators
        parts = []
        for row in rows:
            for c, v in enumerate(row):
                parts.append(str(v))
                parts.append(seps[c])
        if parts:
            parts.pop()  # the final separator is not printed
        return "".join(parts)


@dataclass(frozen=True)
class Special:
    """A special token, e.g. ``<|im_start|>``; never produced by ordinary text."""

    token: str


Segment = str | Grid | Special


def render(segments: Iterable[Segment]) -> str:
    """The text of a segment sequence (special tokens as their literal strings)."""
    out = []
    for seg in segments:
        if isinstance(seg, str):
            out.append(seg)
        elif isinstance(seg, Grid):
            out.append(seg.render())
        else:
            out.append(seg.token)
    return "".join(out)
