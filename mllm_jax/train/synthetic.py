"""A small learnable sequence task in the trainer's batch format (tests, demo, benchmark).

Each sequence imitates a many-shot prompt: `n` (key, value) pairs, a separator, then
queries `q value` whose values (and a closing end token) are the answer:

    k1 v1 k2 v2 ... kn vn SEP q1 a1 q2 a2 ... qm am END        loss on a1..am, END

Values come from a fixed random key -> value table (learnable into the weights), or with
`in_context` from a table drawn per sequence (only the prompt tells the answer, so the
model has to look it up in context). Sequences are packed first-fit in order into rows
of `seq_len`; batch `i` is a pure function of (seed, i), so the iterator state is one
integer and resuming is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mllm_jax.runs.config import SyntheticConfig

PAD, SEP, END = 0, 1, 2
_FIRST_KEY = 3
# The fixed table does not depend on the data seed, so training and validation data
# (different seeds) describe the same function.
_TABLE_SEED = 20250906


def _check(config: SyntheticConfig) -> None:
    last = _FIRST_KEY + config.num_keys + config.num_values
    if last > config.vocab_size:
        raise ValueError(
            f"synthetic task needs {last} token ids (keys + values + 3 specials), "
            f"vocab_size is {config.vocab_size}"
        )
    if not 1 <= config.min_pairs <= config.max_pairs <= config.num_keys:
        raise ValueError(
            f"need 1 <= min_pairs <= max_pairs <= num_keys, got {config.min_pairs}, "
            f"{config.max_pairs}, {config.num_keys}"
        )
    longest = 2 * config.max_pairs + 2 * config.queries + 2
    if longest > config.seq_len:
        raise ValueError(
            f"a sequence can take {longest} tokens, more than seq_len {config.seq_len}"
        )


def value_table(config: SyntheticConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """i32[num_keys]: the value token of each key (the fixed one unless `rng` is given)."""
    rng = rng if rng is not None else np.random.default_rng(_TABLE_SEED)
    first_value = _FIRST_KEY + config.num_keys
    return (first_value + rng.integers(0, config.num_values, config.num_keys)).astype(np.int32)


def sequence(config: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sequence: (ids i32[length], answer bool[length], True on answer tokens)."""
    table = value_table(config, rng) if config.in_context else value_table(config)
    n = int(rng.integers(config.min_pairs, config.max_pairs + 1))
    keys = rng.choice(config.num_keys, size=n, replace=False)
    queries = rng.choice(keys, size=config.queries, replace=True)
    prompt = np.stack([_FIRST_KEY + keys, table[keys]], axis=1).reshape(-1)
    asked = np.stack([_FIRST_KEY + queries, table[queries]], axis=1).reshape(-1)
    ids = np.concatenate([prompt, [SEP], asked, [END]]).astype(np.int32)
    answer = np.zeros(len(ids), bool)
    start = len(prompt) + 1
    answer[start + 1 : start + 2 * config.queries : 2] = True
    answer[-1] = True
    return ids, answer


def batch(config: SyntheticConfig, seed: int, index: int) -> dict[str, np.ndarray]:
    """Batch `index`: the trainer's format, each array [batch_size, seq_len]."""
    _check(config)
    rng = np.random.default_rng([seed, index])
    shape = (config.batch_size, config.seq_len)
    out = {
        "input_ids": np.full(shape, PAD, np.int32),
        "targets": np.full(shape, PAD, np.int32),
        "loss_mask": np.zeros(shape, bool),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for row in range(config.batch_size):
        filled, segment = 0, 0
        while True:
            ids, answer = sequence(config, rng)
            if filled + len(ids) > config.seq_len:
                break
            segment += 1
            span = slice(filled, filled + len(ids))
            out["input_ids"][row, span] = ids
            out["targets"][row, filled : filled + len(ids) - 1] = ids[1:]
            out["loss_mask"][row, filled : filled + len(ids) - 1] = answer[1:]
            out["segment_ids"][row, span] = segment
            out["positions"][row, span] = np.arange(len(ids))
            filled += len(ids)
    return out


class SyntheticBatches:
    """An endless (or `num_batches`-long) iterator of synthetic batches with
    `get_state`/`set_state`, like a grain iterator."""

    def __init__(self, config: SyntheticConfig, seed: int, num_batches: int | None = None):
        _check(config)
        self.config = config
        self.seed = seed
        self.num_batches = num_batches
        self.next_index = 0

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.next_index >= self.num_batches:
            raise StopIteration
        out = batch(self.config, self.seed, self.next_index)
        self.next_index += 1
        return out

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.next_index = int(state["next_index"])
