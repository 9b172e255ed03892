"""The one preprocessing every baseline shares, fitted on the shots only.

Numeric columns: missing values -> the shots' median (a column missing in every shot
becomes 0, it is not dropped). Text columns: missing -> its own category "__missing__",
then ordinal codes (sorted categories; a category unseen in the shots -> -1) for tree
models, or one-hot (unseen -> all zeros) for distance and linear models, which also get
numeric columns standardised with the shots' mean and std.

Columns are told apart by dtype (`datasets.py` stores numeric columns as float64 and text
as str). Output columns come numeric first, then text, each in input order.
"""

from __future__ import annotations

from typing import Literal

from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

TextEncoding = Literal["ordinal", "onehot"]

MISSING_CATEGORY = "__missing__"


def make_preprocessor(encoding: TextEncoding, scale: bool) -> ColumnTransformer:
    """An unfitted transformer: DataFrame[rows, features] -> f64[rows, encoded features]."""
    numeric_steps: list = [SimpleImputer(strategy="median", keep_empty_features=True)]
    if scale:
        numeric_steps.append(StandardScaler())
    if encoding == "ordinal":
        encoder = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
    elif encoding == "onehot":
        encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    else:
        raise ValueError(f"encoding must be 'ordinal' or 'onehot', got {encoding!r}")
    text: Pipeline = make_pipeline(
        SimpleImputer(strategy="constant", fill_value=MISSING_CATEGORY), encoder
    )
    return ColumnTransformer(
        [
            (
                "numeric",
                make_pipeline(*numeric_steps),
                make_column_selector(dtype_include="number"),
            ),
            ("text", text, make_column_selector(dtype_exclude="number")),
        ],
        sparse_threshold=0.0,
    )
