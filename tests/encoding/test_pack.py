"""Packing: whole sequences only, segment ids and positions, targets and loss mask."""

import numpy as np
import pytest

from mllm_jax.encoding.pack import BATCH_KEYS, pack_sequences, packing_efficiency
from mllm_jax.encoding.sequence import TrainingSequence

PAD = 151643


def random_sequences(rng, count, max_len):
    sequences = []
    for k in range(count):
        length = int(rng.integers(3, max_len + 1))
        ids = rng.integers(0, 1000, length).astype(np.int32)
        ids[0] = 100_000 + k  # tags the sequence
        mask = np.zeros(length, dtype=bool)
        start = int(rng.integers(1, length))
        mask[start : length - 1] = True  # the answer, then one unmasked closing token
        sequences.append(TrainingSequence(ids, mask, 1, 1))
    return sequences


def segments_of(row):
    """(start, stop, segment id) of each segment of one packed row."""
    out = []
    seg = row["segment_ids"]
    start = 0
    for t in range(1, len(seg) + 1):
        if t == len(seg) or seg[t] != seg[start]:
            if seg[start] != 0:
                out.append((start, t, int(seg[start])))
            start = t
    return out


def test_packing_keeps_every_sequence_whole_and_once():
    rng = np.random.default_rng(0)
    sequences = random_sequences(rng, 60, 300)
    seq_len = 512
    batch = pack_sequences(sequences, seq_len=seq_len, pad_id=PAD, num_packing_bins=4)
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        assert batch[key].shape == (batch["input_ids"].shape[0], seq_len)
    assert batch["loss_mask"].dtype == bool
    assert all(batch[k].dtype == np.int32 for k in BATCH_KEYS if k != "loss_mask")

    by_tag = {int(s.ids[0]): s for s in sequences}
    seen = []
    for r in range(batch["input_ids"].shape[0]):
        row = {k: v[r] for k, v in batch.items()}
        segments = segments_of(row)
        assert [s[2] for s in segments] == list(range(1, len(segments) + 1))
        covered = np.zeros(seq_len, dtype=bool)
        for start, stop, _ in segments:
            covered[start:stop] = True
            ids = row["input_ids"][start:stop]
            seq = by_tag[int(ids[0])]
            seen.append(int(ids[0]))
            np.testing.assert_array_equal(ids, seq.ids)  # whole, never split
            np.testing.assert_array_equal(row["positions"][start:stop], np.arange(stop - start))
            np.testing.assert_array_equal(row["targets"][start : stop - 1], seq.ids[1:])
            assert row["targets"][stop - 1] == PAD
            np.testing.assert_array_equal(row["loss_mask"][start : stop - 1], seq.answer_mask[1:])
            assert not row["loss_mask"][stop - 1]
        pad = ~covered
        assert (row["segment_ids"][pad] == 0).all() and (row["input_ids"][pad] == PAD).all()
        assert not row["loss_mask"][pad].any() and (row["positions"][pad] == 0).all()
    assert sorted(seen) == sorted(by_tag)
    total = sum(len(s.ids) for s in sequences)
    assert packing_efficiency(batch) == pytest.approx(total / batch["input_ids"].size)
    assert packing_efficiency(batch) > 0.5


def test_targets_under_the_loss_mask_are_exactly_the_answer():
    ids = np.arange(10, 20, dtype=np.int32)
    mask = np.zeros(10, dtype=bool)
    mask[6:9] = True  # answer tokens 16, 17 and the closing 18
    batch = pack_sequences([TrainingSequence(ids, mask, 1, 1)], seq_len=16, pad_id=PAD)
    assert batch["targets"][0][batch["loss_mask"][0]].tolist() == [16, 17, 18]


def test_a_sequence_longer_than_a_row_is_refused():
    long = TrainingSequence(np.zeros(40, np.int32), np.zeros(40, bool), 1, 1)
    with pytest.raises(ValueError, match="max length"):
        pack_sequences([long], seq_len=32, pad_id=PAD)
