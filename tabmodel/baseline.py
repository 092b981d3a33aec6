"""Boosted-tree baseline: scikit-learn's HistGradientBoostingClassifier."""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingClassifier

from tabmodel import schema


class GbdtBaseline:
    """A fitted HistGradientBoostingClassifier and its category codes."""

    def __init__(self, model: HistGradientBoostingClassifier, vocabularies: dict):
        self.model = model
        self.vocabularies = vocabularies

    def matrix(self, frame: pl.DataFrame) -> np.ndarray:
        """Encode categories as codes (unseen values as missing) next to numbers."""
        columns = []
        for name in schema.CATEGORICAL_FEATURES:
            codes = {value: i for i, value in enumerate(self.vocabularies[name])}
            values = frame[name].fill_null(schema.MISSING).to_list()
            columns.append([codes.get(v, np.nan) for v in values])
        for name in schema.NUMERIC_FEATURES:
            columns.append(frame[name].cast(pl.Float64).to_numpy())
        return np.column_stack(columns).astype("float64")


def train_gbdt(train: pl.DataFrame, seed: int) -> GbdtBaseline:
    """Fit the baseline on `train`, reading categories natively."""
    vocabularies = {
        name: sorted(set(train[name].fill_null(schema.MISSING).to_list()))
        for name in schema.CATEGORICAL_FEATURES
    }
    categorical = [True] * len(schema.CATEGORICAL_FEATURES) + [False] * len(
        schema.NUMERIC_FEATURES
    )
    model = HistGradientBoostingClassifier(
        categorical_features=categorical,
        max_iter=300,
        learning_rate=0.05,
        early_stopping=False,
        random_state=seed,
    )
    baseline = GbdtBaseline(model, vocabularies)
    labels = (train[schema.LABEL] == schema.POSITIVE_CLASS).to_numpy()
    model.fit(baseline.matrix(train), labels)
    return baseline


def gbdt_probabilities(baseline: GbdtBaseline, frame: pl.DataFrame) -> np.ndarray:
    """Return the baseline's P(income > 50K) for each row."""
    return baseline.model.predict_proba(baseline.matrix(frame))[:, 1]
