"""KV cache, chunked prefill, prefix reuse and greedy generation against full recomputation
(and against transformers' generate).

Full recomputations run as one right-padded batch per test (segment id 0 = padding) so
each test compiles few distinct shapes.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_checkpoints import save_hf_model

from mllm_jax.model import (
    KVCache,
    decode_greedy,
    init_model,
    load_hf,
    prefill,
    prefill_prefix,
    preset,
    score_with_prefix,
)

FULL = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg))
CACHED = nnx.jit(lambda m, ids, pos, seg, cache: m(ids, pos, seg, cache))
WIDTH = 24  # every full recomputation is a [batch, 24] call


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache_ckpt")
    torch_model = save_hf_model(directory, seed=3)
    return load_hf(directory), torch_model, directory


def _ids(shape, seed):
    return np.random.default_rng(seed).integers(3, 160, shape).astype(np.int32)


def _full(model, seqs):
    """Logits of each sequence alone (right-padded into one [len(seqs), WIDTH] batch)."""
    ids = np.zeros((len(seqs), WIDTH), np.int32)
    seg = np.zeros((len(seqs), WIDTH), np.int32)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], seg[r, : len(s)] = s, 1
    return np.asarray(FULL(model, jnp.asarray(ids), jnp.asarray(seg)))


def test_cached_decoding_equals_full_recomputation(setup):
    """Two left-padded prompts (lengths 10 and 7), then 4 decode steps with the cache."""
    model, *_ = setup
    seqs = [_ids(14, 1), _ids(11, 2)]
    prompt_lens = [10, 7]
    width = 10
    ids = np.zeros((2, width), np.int32)
    seg = np.zeros((2, width), np.int32)
    pos = np.zeros((2, width), np.int32)
    for r, (s, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
        ids[r, width - n :], seg[r, width - n :], pos[r, width - n :] = s[:n], 1, np.arange(n)
    cache = KVCache.create(model.config, 2, width + 4)
    logits, cache = CACHED(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), cache)
    steps = [logits[:, -1]]
    for i in range(4):
        tok = np.array([[seqs[r][prompt_lens[r] + i]] for r in range(2)], np.int32)
        step_pos = np.array([[prompt_lens[r] + i] for r in range(2)], np.int32)
        ones = jnp.ones((2, 1), jnp.int32)
        logits, cache = CACHED(model, jnp.asarray(tok), jnp.asarray(step_pos), ones, cache)
        steps.append(logits[:, 0])
    assert int(cache.length) == width + 4
    full = _full(model, seqs)
    for r, n in enumerate(prompt_lens):
        for i, step in enumerate(steps):
            np.testing.assert_allclose(step[r], full[r, n - 1 + i], atol=2e-5)


def test_chunked_prefill_and_query_chunks_equal_full(setup):
    model, _, directory = setup
    seqs = [_ids(22, 4), _ids(22, 5)]
    full = _full(model, seqs)
    # Attention in query blocks of 5 (24 is not a multiple: the tail block is padded).
    blocked = _full(load_hf(directory, attention_query_chunk=5), seqs)
    np.testing.assert_allclose(blocked, full, atol=2e-5)
    # Model-level chunked prefill: 3 scanned calls of 8 tokens (2 pad slots in front).
    ids = jnp.asarray(np.stack(seqs))
    positions = jnp.broadcast_to(jnp.arange(22, dtype=jnp.int32), (2, 22))
    segments = jnp.ones((2, 22), jnp.int32)
    cache = KVCache.create(model.config, 2, 24)
    last, cache = nnx.jit(lambda m, c: prefill(m, ids, positions, segments, c, chunk_size=8))(
        model, cache
    )
    last_logits = nnx.jit(lambda m, h: m.logits(h))(model, last)
    np.testing.assert_allclose(last_logits, full[:, 21], atol=2e-5)
    assert int(cache.length) == 24
    assert (np.asarray(cache.segment_ids)[:, :2] == 0).all()


def test_cached_calls_read_only_the_filled_slots(setup):
    """A prefill into a cache of its own length (causal self-attention over its tokens)
    and chunked calls into a larger cache (key blocks up to the last filled slot) equal
    the full recomputation; the empty slots are never read: NaN keys and values there
    (which a dense pass would spread through 0 x NaN) change nothing."""
    _, _, directory = setup
    model = load_hf(directory, attention_query_chunk=8)
    seqs = [_ids(24, 7), _ids(24, 8)]
    full = _full(model, seqs)
    ids = jnp.asarray(np.stack(seqs))
    positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    segments = jnp.ones((2, 24), jnp.int32)
    logits, _ = CACHED(model, ids, positions, segments, KVCache.create(model.config, 2, 24))
    np.testing.assert_allclose(logits, full, atol=2e-5)
    cache = KVCache.create(model.config, 2, 40)
    poisoned = tuple(jnp.full_like(x, jnp.nan) for x in cache.keys)
    cache = dataclasses.replace(cache, keys=poisoned, values=poisoned)
    parts = []
    for lo in (0, 8, 16):  # 3 calls ending on key blocks (8 slots); 16 slots stay empty
        call = (ids[:, lo : lo + 8], positions[:, lo : lo + 8], segments[:, lo : lo + 8])
        part, cache = CACHED(model, *call, cache)
        parts.append(np.asarray(part))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=2e-5)


def test_prefix_reuse_equals_full_recomputation(setup):
    model, *_ = setup
    prefix = _ids(13, 5)
    queries = _ids((2, 6), 6)
    query_seg = np.ones((2, 6), np.int32)
    query_seg[1, 4:] = 0  # a shorter, right-padded query row
    cache = nnx.jit(lambda m, p: prefill_prefix(m, p, chunk_size=5))(model, jnp.asarray(prefix))
    assert cache.batch == 1 and cache.max_len == 15
    before = [np.asarray(k) for k in cache.keys]
    scored = nnx.jit(lambda m, c, q, s: score_with_prefix(m, c, q, s))(
        model, cache, jnp.asarray(queries), jnp.asarray(query_seg)
    )
    lengths = query_seg.sum(1)
    full = _full(
        model, [np.concatenate([prefix, q[:n]]) for q, n in zip(queries, lengths, strict=True)]
    )
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(scored[b, :n], full[b, 13 : 13 + n], atol=2e-5)
    for k0, k1 in zip(before, cache.keys, strict=True):
        np.testing.assert_array_equal(k0, np.asarray(k1))  # the prefix cache is read only


def _hf_generate(torch_model, prompt, eos, new):
    out = torch_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def generation_case(setup):
    """Three prompts of different lengths; row 0's 3rd greedy token is made the
    end-of-sequence id so that row stops early. Expected outputs from transformers."""
    _, torch_model, _ = setup
    prompts = [_ids(9, 7).tolist(), _ids(4, 8).tolist(), _ids(6, 9).tolist()]
    free = _hf_generate(torch_model, prompts[0], None, 8)
    eos = free[2]
    expected = [_hf_generate(torch_model, p, eos, 8) for p in prompts]
    assert len(expected[0]) == free.index(eos) + 1 < 8
    return prompts, eos, expected


def test_greedy_generation_matches_transformers_generate(setup, generation_case):
    model, *_ = setup
    prompts, eos, expected = generation_case
    result = decode_greedy(model, prompts, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert result.as_lists() == expected
    assert result.lengths[0] == len(expected[0])
    assert (result.tokens[0, result.lengths[0] :] == 0).all()


@pytest.mark.slow
def test_greedy_generation_with_chunked_prefill(setup, generation_case):
    model, *_ = setup
    prompts, eos, expected = generation_case
    chunked = decode_greedy(model, prompts, max_new_tokens=8, eos_token_id=eos, prefill_chunk=4)
    assert chunked.as_lists() == expected


def test_cache_overflow_is_refused_outside_jit():
    config = preset("tiny")
    model = init_model(config)
    cache = KVCache.create(config, 1, 4)
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(
        ValueError, match="KV cache overflow: 0 slots filled \\+ 5 new tokens > max_len 4"
    ):
        model(ids, jnp.arange(5, dtype=jnp.int32)[None], None, cache)
    with pytest.raises(ValueError, match="positions are required"):
        model(ids, cache=cache)
