"""The number encoding against an independent, element-by-element implementation."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from locations import TABLES

from mllm_jax.encoding.numbers import PAPER_CLIP_MAX, encode_numeric, encode_padded
from mllm_jax.encoding.prompt import build_prompt
from mllm_jax.encoding.segments import render
from mllm_jax.encoding.table import encode_table

DATA = TABLES


def slow_encode(train, test, clip_max=None):
    """The formula written out per value with Python floats (no numpy reductions)."""
    train = np.asarray(train, dtype=float)
    test = np.asarray(test, dtype=float)
    out_train = np.zeros(train.shape, dtype=np.int64)
    out_test = np.zeros(test.shape, dtype=np.int64)
    for j in range(train.shape[1]):
        seen = [float(v) for v in train[:, j] if not math.isnan(v)]
        mean = math.fsum(seen) / len(seen) if seen else 0.0
        if len(seen) >= 2:
            m = math.fsum(seen) / len(seen)
            std = math.sqrt(math.fsum((v - m) ** 2 for v in seen) / (len(seen) - 1))
        else:
            std = 1.0
        std = max(std, 1e-6)
        for values, out in ((train, out_train), (test, out_test)):
            for i, v in enumerate(values[:, j]):
                v = mean if math.isnan(v) else float(v)
                z = min(max((v - mean) / std, -1000.0), 1000.0)
                k = int(max(z * 120.0 + 500.0, 0.0))
                out[i, j] = k if clip_max is None else min(k, clip_max)
    return out_train, out_test


def assert_close_ints(fast, slow):
    # fsum vs numpy's summation can move a value sitting exactly on an integer boundary
    # by one; anything else is a bug.
    assert fast.shape == slow.shape
    diff = np.abs(fast - slow)
    assert diff.max(initial=0) <= 1
    assert (diff > 0).mean() < 1e-3


def random_table(rng, rows, cols, nan_rate=0.1):
    X = rng.normal(size=(rows, cols)) * rng.lognormal(size=cols) + rng.normal(size=cols) * 5
    X[rng.random(X.shape) < nan_rate] = np.nan
    X[:, 0] = 3.0  # constant column: std floored at 1e-6, every value -> 500
    if cols > 2:
        X[:, 1] = np.nan  # all-missing column: mean 0, std 1, every value -> 500
    return X


@pytest.mark.parametrize("clip_max", [None, PAPER_CLIP_MAX])
def test_matches_independent_formula_on_random_tables(clip_max):
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows, cols = int(rng.integers(2, 200)), int(rng.integers(1, 30))
        X = random_table(rng, rows, cols)
        n_train = int(rng.integers(1, rows))
        ours = encode_numeric(X[:n_train], X[n_train:], clip_max)
        theirs = slow_encode(X[:n_train], X[n_train:], clip_max)
        assert_close_ints(ours[0], theirs[0])
        assert_close_ints(ours[1], theirs[1])
        assert ours[0].min() >= 0 and ours[1].min(initial=0) >= 0
        if clip_max is not None:
            assert max(ours[0].max(), ours[1].max(initial=0)) <= clip_max


def test_known_values_and_the_upper_clip():
    train = np.array([[0.0], [1.0], [2.0]])  # mean 1, std 1
    test = np.array([[1.0], [np.nan], [1.5], [0.0], [6.0], [-9.0]])
    _, ints = encode_numeric(train, test)
    # 500, NaN -> mean, 1.5 -> 560, 0 -> 380, 6 -> 1100 (no upper clip), -9 -> 0 (clipped)
    assert ints[:, 0].tolist() == [500, 500, 560, 380, 1100, 0]
    _, clipped = encode_numeric(train, test, clip_max=999)
    assert clipped[:, 0].tolist() == [500, 500, 560, 380, 999, 0]
    # truncation, not rounding: z = 0.999 -> 619.88 -> 619
    _, trunc = encode_numeric(train, np.array([[1.999]]))
    assert trunc.item() == 619


def test_single_training_row_uses_unit_std():
    ints_train, ints_test = encode_numeric(np.array([[5.0]]), np.array([[6.0], [4.0]]))
    assert ints_train.item() == 500
    assert ints_test[:, 0].tolist() == [620, 380]


def test_padded_batch_equals_per_task():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5, 64, 9))
    X[rng.random(X.shape) < 0.05] = np.nan
    is_train = rng.random((5, 64)) < 0.5
    is_train[:, 0] = True
    batch = encode_padded(X, is_train)
    for t in range(5):
        a, b = encode_numeric(X[t][is_train[t]], X[t][~is_train[t]])
        np.testing.assert_array_equal(batch[t][is_train[t]], a)
        np.testing.assert_array_equal(batch[t][~is_train[t]], b)


def test_bad_numbers_are_refused():
    with pytest.raises(ValueError, match="infinite"):
        encode_numeric(np.array([[1.0], [np.inf]]), np.array([[0.0]]))
    with pytest.raises(ValueError, match="empty"):
        encode_numeric(np.zeros((0, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no training rows"):
        encode_padded(np.zeros((2, 4, 1)), np.array([[True] * 4, [False] * 4]))
    frame = pd.DataFrame({"ok": [1.0, 2.0, 3.0], "bad": [1.0, np.inf, 2.0]})
    with pytest.raises(ValueError, match="'bad'"):
        encode_table(frame, frame)


def independent_table_encoding(train: pd.DataFrame, test: pd.DataFrame):
    """Column typing + formula per the reference, written with pandas operations."""
    cells_train, cells_test = {}, {}
    for col in train.columns:
        tr = pd.to_numeric(train[col], errors="coerce").astype(float)
        te = pd.to_numeric(test[col], errors="coerce").astype(float)
        if tr.notna().any():
            a, b = slow_encode(tr.to_numpy()[:, None], te.to_numpy()[:, None])
            cells_train[col] = [str(v) for v in a[:, 0]]
            cells_test[col] = [str(v) for v in b[:, 0]]
        else:
            cells_train[col] = ["nan" if pd.isna(v) else str(v) for v in train[col]]
            cells_test[col] = ["nan" if pd.isna(v) else str(v) for v in test[col]]
    return pd.DataFrame(cells_train), pd.DataFrame(cells_test)


@pytest.mark.parametrize(
    "name",
    [
        "Water_Quality_and_Potability.csv.gz",  # NaNs in numeric columns
        "eucalyptus.csv.gz",  # NaNs, int and float columns
        "Customer_Personality_Analysis.csv.gz",  # text columns and NaNs
        "ozone_level.csv.gz",  # numbers stored as text, with '?'
        "telco_customer_churn.csv.gz",  # mostly text columns
        "online_shoppers.csv.gz",  # a bool column
    ],
)
def test_real_tables_match_independent_encoding(name):
    table = pd.read_csv(DATA / name)
    X = table.drop(columns="label")
    rng = np.random.default_rng(7)
    rows = rng.permutation(len(X))
    train, test = X.iloc[rows[:300]], X.iloc[rows[300:360]]
    features = encode_table(train, test)
    expect_train, expect_test = independent_table_encoding(
        train.reset_index(drop=True), test.reset_index(drop=True)
    )
    for ours, theirs in (
        (features.cells("train"), expect_train),
        (features.cells("test"), expect_test),
    ):
        ours = pd.DataFrame(ours, columns=expect_train.columns)
        numeric_ours = ours.apply(pd.to_numeric, errors="coerce")
        numeric_theirs = theirs.apply(pd.to_numeric, errors="coerce")
        text = numeric_theirs.isna().to_numpy()
        assert ours.to_numpy()[text].tolist() == theirs.to_numpy()[text].tolist()
        diff = (numeric_ours - numeric_theirs).abs().to_numpy()
        diff = diff[~np.isnan(diff)]
        assert diff.max(initial=0) <= 1 and (diff > 0).mean() < 1e-3


def test_prompt_test_rows_decode_to_the_encoded_integers():
    table = pd.read_csv(DATA / "Water_Quality_and_Potability.csv.gz")
    X, y = table.drop(columns="label"), table["label"]
    prompt = build_prompt(X[:200], y[:200], X[200:250], y[200:250])
    user = render(prompt.user)
    rows = re.findall(r"^ID (\d+):(.*)$", user, flags=re.M)
    assert [int(i) for i, _ in rows] == list(range(50))
    decoded = np.array([[int(v) for v in line.split(",")] for _, line in rows])
    np.testing.assert_array_equal(decoded, encode_table(X[:200], X[200:250]).test)
    train_rows = re.findall(r"^([\d,]+)\|(\d+)$", user, flags=re.M)
    decoded_train = np.array([[int(v) for v in line.split(",")] for line, _ in train_rows])
    np.testing.assert_array_equal(decoded_train, encode_table(X[:200], X[200:250]).train)
    assert [int(label) for _, label in train_rows] == y[:200].tolist()


def test_task_batch_path_equals_per_task():
    from dataclasses import dataclass

    from mllm_jax.encoding.numbers import encode_task_batch
    from mllm_jax.foundation.tasks import Task

    @dataclass
    class PaddedTasks:  # the fields of mllm_jax.prior.TaskBatch this path reads
        X: np.ndarray
        n_train: np.ndarray
        n_features: np.ndarray
        valid: np.ndarray

        def to_tasks(self):
            return [
                Task(self.X[i, :, : self.n_features[i]], np.zeros(self.X.shape[1], np.int32),
                     2, int(self.n_train[i]), np.zeros(self.n_features[i], bool), "mlp", 0, i)
                for i in np.flatnonzero(self.valid)
            ]  # fmt: skip

    rng = np.random.default_rng(4)
    X = rng.normal(size=(4, 50, 7)).astype(np.float32)
    n_features = np.array([7, 3, 5, 6])
    for i, nf in enumerate(n_features):
        X[i, :, nf:] = 0
    batch = PaddedTasks(X, np.array([30, 10, 0, 49]), n_features, np.array([1, 1, 0, 1], bool))
    encoded = encode_task_batch(batch)
    for task in batch.to_tasks():
        i, t = task.index, task.n_train
        a, b = encode_numeric(task.X[:t], task.X[t:])
        np.testing.assert_array_equal(encoded[i, :t, : task.n_features], a)
        np.testing.assert_array_equal(encoded[i, t:, : task.n_features], b)
