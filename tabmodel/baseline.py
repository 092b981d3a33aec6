"""Scikit-learn baselines that read the same polars frames as the TabTransformer.

Both baselines read the model's feature columns (`schema.CATEGORICAL_FEATURES`
and `schema.NUMERIC_FEATURES`, so never the census weight) and treat a missing
category as its own value `?`, as the TabTransformer does.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (
    FunctionTransformer,
    OneHotEncoder,
    OrdinalEncoder,
    StandardScaler,
)

from tabmodel import schema

_CATEGORICAL = list(range(len(schema.CATEGORICAL_FEATURES)))
_NUMERIC = list(
    range(len(schema.CATEGORICAL_FEATURES), len(schema.FEATURE_COLUMNS) - 1)
)


def feature_matrix(frame: pl.DataFrame) -> np.ndarray:
    """Return an object array of the categorical then the numeric features."""
    columns = [
        frame[name]
        .fill_null(schema.MISSING)
        .str.strip_chars()
        .to_numpy()
        .astype(object)
        for name in schema.CATEGORICAL_FEATURES
    ]
    columns += [
        frame[name].cast(pl.Float64).to_numpy().astype(object)
        for name in schema.NUMERIC_FEATURES
    ]
    return np.column_stack(columns)


def label_vector(frame: pl.DataFrame) -> np.ndarray:
    """Return 1 for the positive class and 0 otherwise."""
    return (frame[schema.LABEL] == schema.POSITIVE_CLASS).cast(pl.Int8).to_numpy()


def train_gbdt(train: pl.DataFrame, seed: int) -> Pipeline:
    """Fit a HistGradientBoostingClassifier with native categorical splits.

    Categories are ordinal-encoded only to give them integer codes. A category
    not seen in `train` becomes NaN, which the trees route like a missing
    value. Boosting stops when the log loss on an internal 10% of `train` has
    not improved for 20 iterations.
    """
    encoder = ColumnTransformer(
        [
            (
                "categorical",
                OrdinalEncoder(
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                    dtype=np.float64,
                ),
                _CATEGORICAL,
            ),
            ("numeric", FunctionTransformer(_as_float), _NUMERIC),
        ]
    )
    classifier = HistGradientBoostingClassifier(
        learning_rate=0.05,
        max_iter=1000,
        max_leaf_nodes=31,
        categorical_features=_CATEGORICAL,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=20,
        random_state=seed,
    )
    model = Pipeline([("encode", encoder), ("gbdt", classifier)])
    return model.fit(feature_matrix(train), label_vector(train))


def gbdt_probabilities(model: Pipeline, frame: pl.DataFrame) -> np.ndarray:
    """Return the fitted GBDT's P(income > 50K) for every row of `frame`."""
    return baseline_probabilities(model, frame)


def baseline_probabilities(model: Pipeline, frame: pl.DataFrame) -> np.ndarray:
    """Return P(income > 50K) for every row of `frame` from any baseline here."""
    return model.predict_proba(feature_matrix(frame))[:, 1]


def train_logistic_regression(train: pl.DataFrame, seed: int) -> Pipeline:
    """Fit a logistic regression on one-hot categories and standardised numbers.

    Capital gain and loss are log1p-scaled first, as in the TabTransformer.
    """
    log_scaled = [
        _NUMERIC[schema.NUMERIC_FEATURES.index(name)] for name in schema.LOG_SCALED
    ]
    plain = [index for index in _NUMERIC if index not in log_scaled]
    encoder = ColumnTransformer(
        [
            ("categorical", OneHotEncoder(handle_unknown="ignore"), _CATEGORICAL),
            (
                "numeric",
                Pipeline(
                    [
                        ("float", FunctionTransformer(_as_float)),
                        ("scale", StandardScaler()),
                    ]
                ),
                plain,
            ),
            (
                "log_scaled",
                Pipeline(
                    [
                        ("log1p", FunctionTransformer(_log1p)),
                        ("scale", StandardScaler()),
                    ]
                ),
                log_scaled,
            ),
        ]
    )
    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    model = Pipeline([("encode", encoder), ("logistic_regression", classifier)])
    return model.fit(feature_matrix(train), label_vector(train))


def _as_float(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _log1p(values: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(_as_float(values), 0.0))
