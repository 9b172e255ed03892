"""The protocol: deterministic, stratified, nested shots, and the reference's draws."""

import random

import numpy as np
import pandas as pd
import pytest
from locations import TABLES
from sklearn.model_selection import train_test_split

from mllm_jax.eval.protocol import Protocol, build_plan, reference_shots, split_rows
from mllm_jax.foundation.tables import from_frame, load_csv

DATA = str(TABLES)


@pytest.fixture(scope="module")
def cmc():
    return load_csv(f"{DATA}/cmc.csv.gz")


@pytest.fixture(scope="module")
def eucalyptus():
    return load_csv(f"{DATA}/eucalyptus.csv.gz")  # 736 rows: 588 train rows


def _flatten(plan):
    return [
        (e.key, e.columns, [(ep.train.tolist(), ep.test.tolist()) for ep in e.episodes])
        for e in plan.entries
    ]


def test_plan_is_deterministic(cmc, eucalyptus):
    for protocol in (Protocol(), Protocol.reference()):
        first = build_plan([cmc, eucalyptus], [8, 64], [0, 1], protocol)
        again = build_plan([cmc, eucalyptus], [64, 8, 8], [0, 1, 0], protocol)
        assert _flatten(first) == _flatten(again)
        assert [e.key for e in first.entries][:4] == [
            ("cmc", 0, 8),
            ("cmc", 1, 8),
            ("cmc", 0, 64),
            ("cmc", 1, 64),
        ]


def test_split_is_stratified_disjoint_and_complete(cmc):
    train, test = split_rows(cmc, Protocol())
    assert len(np.intersect1d(train, test)) == 0
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(cmc.n_rows))
    assert len(test) == int(np.ceil(0.2 * cmc.n_rows))
    full = np.bincount(cmc.labels) / cmc.n_rows
    in_test = np.bincount(cmc.labels[test], minlength=cmc.n_classes)
    # Stratified: each class count within one row of its share of the test split.
    assert np.all(np.abs(in_test - full * len(test)) <= 1.0)
    # The same split for every seed and shot count.
    plan = build_plan([cmc], [8, 32], [0, 1, 2])
    for entry in plan.entries:
        np.testing.assert_array_equal(entry.test, test)
        assert set(entry.episodes[0].train.tolist()) <= set(train.tolist())


def test_shots_are_nested_per_seed_and_differ_between_seeds(cmc):
    plan = build_plan([cmc], [8, 16, 64], [0, 1])
    shots = {e.key: e.episodes[0].train for e in plan.entries}
    for seed in (0, 1):
        np.testing.assert_array_equal(shots[("cmc", seed, 16)][:8], shots[("cmc", seed, 8)])
        np.testing.assert_array_equal(shots[("cmc", seed, 64)][:16], shots[("cmc", seed, 16)])
        assert len(set(shots[("cmc", seed, 64)].tolist())) == 64
    assert not np.array_equal(shots[("cmc", 0, 64)], shots[("cmc", 1, 64)])


def test_shots_never_exceed_the_train_split(eucalyptus):
    plan = build_plan([eucalyptus], [512, 1024, 4096], [0])
    train, _ = split_rows(eucalyptus, Protocol())
    used = {e.shots: e for e in plan.entries}
    assert used[512].shots_used == 512
    for requested in (1024, 4096):
        entry = used[requested]
        assert entry.shots == requested
        assert entry.shots_used == len(train) == 588
        assert sorted(entry.episodes[0].train.tolist()) == sorted(train.tolist())


def test_column_order_is_shuffled_per_seed_like_the_reference(cmc):
    plan = build_plan([cmc], [8], [40, 41])
    n = cmc.features.shape[1]
    for entry in plan.entries:
        random.seed(entry.seed)  # the reference's col_shuffle
        order = list(range(n))
        random.shuffle(order)
        assert list(entry.columns) == order
    plain = build_plan([cmc], [8], [40], Protocol(shuffle_columns=False))
    assert plain.entries[0].columns == tuple(range(n))


def test_reference_sampling_replicates_data_chunk_prep(eucalyptus):
    """Rows per chunk equal a transcription of the reference's pandas calls."""
    protocol = Protocol.reference()
    shots, seed = 16, 41
    plan = build_plan([eucalyptus], [shots, 1024], [seed], protocol)
    entry = next(e for e in plan.entries if e.shots == shots)

    frame = eucalyptus.features.assign(label=eucalyptus.labels)
    train_df, test_df = train_test_split(frame, test_size=0.2, random_state=42)
    test_chunks = [test_df[i : i + 50] for i in range(0, len(test_df), 50)]
    assert len(entry.episodes) == len(test_chunks)
    for i, (episode, test_chunk) in enumerate(zip(entry.episodes, test_chunks, strict=True)):
        train_chunk = train_df.sample(n=shots, random_state=42 + i)
        train_chunk = train_chunk.sample(frac=1, random_state=seed)
        assert episode.train.tolist() == train_chunk.index.tolist()
        assert episode.test.tolist() == test_chunk.index.tolist()
    # More shots than the train split: the whole split, reordered by the seed.
    whole = next(e for e in plan.entries if e.shots == 1024)
    expected = train_df.copy().sample(frac=1, random_state=seed).index.tolist()
    assert all(ep.train.tolist() == expected for ep in whole.episodes)


def test_max_classes_and_impossible_stratification_skip_with_reasons():
    yeast = load_csv(f"{DATA}/yeast.csv.gz")  # 10 classes: allowed
    rows = 40
    wide = from_frame(
        pd.DataFrame({"x": np.arange(88, dtype=float), "label": np.arange(88) % 11}),
        "label",
        name="eleven",
    )
    singleton = from_frame(
        pd.DataFrame({"x": np.arange(rows, dtype=float), "label": [0] * 20 + [1] * 19 + [2]}),
        "label",
        name="singleton",
    )
    plan = build_plan([yeast, wide, singleton], [8], [0])
    assert {e.dataset for e in plan.entries} == {"yeast", "eleven"}  # any number of classes
    reasons = {s.dataset: s.reason for s in plan.skipped}
    assert "class 2 has 1 row" in reasons["singleton"]
    plan = build_plan([yeast, wide], [8], [0], Protocol(max_classes=10))  # the paper's limit
    assert {e.dataset for e in plan.entries} == {"yeast"}
    reasons = {s.dataset: s.reason for s in plan.skipped}
    assert reasons["eleven"] == "11 classes, more than the protocol's max_classes 10"
    # Without stratification the singleton table is fine.
    plan = build_plan([singleton], [8], [0], Protocol(stratify=False))
    assert len(plan.entries) == 1 and not plan.skipped


def test_max_test_takes_a_stratified_subset(cmc):
    _, test = split_rows(cmc, Protocol())
    _, small = split_rows(cmc, Protocol(max_test=100))
    assert len(small) == 100 and set(small.tolist()) <= set(test.tolist())
    share = np.bincount(cmc.labels[test]) / len(test)
    assert np.all(np.abs(np.bincount(cmc.labels[small], minlength=3) - 100 * share) <= 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="test_size"):
        Protocol(test_size=1.0)
    with pytest.raises(ValueError, match="sampling"):
        Protocol(sampling="stratified")
    with pytest.raises(ValueError, match="shots must be >= 1"):
        build_plan([], [0, 8], [0])
    assert reference_shots() == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert reference_shots(100) == [8, 16, 32, 64]


@pytest.mark.parametrize("protocol", [Protocol(), Protocol.reference()])
def test_test_classes_missing_from_the_shots_are_never_predicted(eucalyptus, protocol):
    from mllm_jax.eval.baselines import BASELINES
    from mllm_jax.eval.run import evaluate_entry, predict_entry

    plan = build_plan([eucalyptus], [8], range(6), protocol)
    partial = [
        e for e in plan.entries if len(np.unique(eucalyptus.labels[e.episodes[0].train])) < 5
    ]
    assert partial, "8 uniform shots of 5 classes should miss a class for some seed"
    entry = partial[0]
    prediction = predict_entry(eucalyptus, entry, "rf", BASELINES["rf"])
    row = 0
    for episode in entry.episodes:
        absent = np.setdiff1d(np.arange(5), eucalyptus.labels[episode.train])
        block = prediction.proba[row : row + len(episode.test)]
        assert np.all(block[:, absent] == 0) and not np.isin(block.argmax(1), absent).any()
        row += len(episode.test)
    np.testing.assert_allclose(prediction.proba.sum(1), 1.0, rtol=1e-6)
    record = evaluate_entry(eucalyptus, entry, "rf", BASELINES["rf"])
    assert record["shot_classes"] == prediction.shot_classes < 5
    assert all(np.isfinite(record[m]) for m in ("accuracy", "f1_weighted", "roc_auc", "log_loss"))
