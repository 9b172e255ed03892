"""Datasets: real tables, scikit-learn sets, and errors that name the file and column."""

import gzip

import numpy as np
import pandas as pd
import pytest
from locations import TABLES

from mllm_jax.eval.datasets import resolve_datasets
from mllm_jax.foundation.tables import DatasetError, load_csv, load_dataset

DATA = str(TABLES)


def test_real_table_with_text_and_missing_values():
    dataset = load_csv(f"{DATA}/Customer_Personality_Analysis.csv.gz")
    raw = pd.read_csv(f"{DATA}/Customer_Personality_Analysis.csv.gz")
    assert dataset.name == "Customer_Personality_Analysis"
    assert dataset.n_rows == len(raw)
    assert list(dataset.kinds) == [c for c in raw.columns if c != "label"]
    text = [c for c, kind in dataset.kinds.items() if kind == "text"]
    assert len(text) == 2
    for column in text:
        assert not pd.api.types.is_numeric_dtype(dataset.features[column])
    numeric = [c for c, kind in dataset.kinds.items() if kind == "numeric"]
    assert all(dataset.features[c].dtype == np.float64 for c in numeric)
    # Missing values stay missing (24 in the file), none are filled at load time.
    assert int(dataset.features.isna().sum().sum()) == int(
        raw.drop(columns="label").isna().sum().sum()
    )
    # Codes follow sorted unique labels.
    np.testing.assert_array_equal(dataset.classes[dataset.labels], raw["label"].to_numpy())


def test_question_mark_is_missing_so_columns_stay_numeric():
    dataset = load_csv(f"{DATA}/ozone_level.csv.gz")
    assert set(dataset.kinds.values()) == {"numeric"}
    assert dataset.features.isna().to_numpy().any()


def test_boolean_labels_and_features(tmp_path):
    path = tmp_path / "flags.csv"
    pd.DataFrame(
        {
            "a": [True, False, True, False],
            "b": [1.5, 2.0, 3.0, 4.0],
            "y": [True, False, False, True],
        }
    ).to_csv(path, index=False)
    dataset = load_csv(path, target="y")
    assert dataset.kinds == {"a": "numeric", "b": "numeric"}
    np.testing.assert_array_equal(dataset.features["a"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(dataset.classes, [False, True])
    np.testing.assert_array_equal(dataset.labels, [1, 0, 0, 1])


@pytest.mark.parametrize(
    "name, rows, classes",
    [("iris", 150, 3), ("sklearn:wine", 178, 3), ("load_breast_cancer", 569, 2)],
)
def test_sklearn_sets_by_name(name, rows, classes):
    dataset = load_dataset(name)
    assert (dataset.n_rows, dataset.n_classes) == (rows, classes)
    assert dataset.source.startswith("sklearn:")
    assert "label" not in dataset.features.columns


def test_directory_expands_to_sorted_csvs_and_names_must_be_unique(tmp_path):
    frame = pd.DataFrame({"x": [1, 2, 3, 4], "label": [0, 1, 0, 1]})
    frame.to_csv(tmp_path / "b.csv", index=False)
    frame.to_csv(tmp_path / "a.csv.gz", index=False)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [d.name for d in resolve_datasets([tmp_path])] == ["a", "b"]
    other = tmp_path / "other"
    other.mkdir()
    frame.to_csv(other / "a.csv", index=False)
    with pytest.raises(DatasetError, match=r"two datasets are named 'a'"):
        resolve_datasets([tmp_path / "a.csv.gz", other / "a.csv"])


def test_custom_target_column(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"label": [5, 6, 7, 8], "cls": ["x", "y", "x", "y"]}).to_csv(path, index=False)
    dataset = load_csv(path, target="cls")
    assert list(dataset.features.columns) == ["label"]
    np.testing.assert_array_equal(dataset.classes, ["x", "y"])


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "content, target, message",
    [
        ("a,b\n1,2\n3,4\n", "label", r"t\.csv: no target column 'label' \(columns: a, b\)"),
        ("a,label\n1,0\n2,0\n", "label", r"t\.csv: target column 'label' has a single class \(0\)"),
        ("a,label\n", "label", r"t\.csv: the table has a header but no rows"),
        ("", "label", r"t\.csv: empty file"),
        ("label\n0\n1\n", "label", r"t\.csv: no feature columns"),
        (
            "a,label\n1,0\n2,\n3,1\n",
            "label",
            r"t\.csv: 1 rows have no value in target column 'label' \(first at data row 1\)",
        ),
        (
            "a,b,label\n1,inf,0\n2,3,1\n",
            "label",
            r"t\.csv: column 'b' has 1 infinite values \(first at data row 0\)",
        ),
    ],
)
def test_bad_tables_name_file_and_column(tmp_path, content, target, message):
    path = _write(tmp_path / "t.csv", content)
    with pytest.raises(DatasetError, match=message):
        load_csv(path, target=target)


def test_binary_file_is_not_a_csv(tmp_path):
    path = tmp_path / "image.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(DatasetError, match=r"image\.csv: not a readable CSV file"):
        load_csv(path)
    corrupt = tmp_path / "broken.csv.gz"
    corrupt.write_bytes(gzip.compress(b"a,label\n1,0\n2,1\n")[:20])
    with pytest.raises(DatasetError, match=r"broken\.csv\.gz: not a readable CSV file"):
        load_csv(corrupt)


def test_missing_file_and_unknown_name():
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such file, and not a scikit-learn"):
        load_dataset("nope.csv")
    with pytest.raises(DatasetError, match=r"unknown scikit-learn dataset 'sklearn:nope'"):
        load_dataset("sklearn:nope")
