"""Tests for stratified, seeded sampling and train/validation splits."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tabmodel import schema
from tabmodel.data import load_adult
from tabmodel.split import sample_rows, stratified_indices, train_validation_split

# Class ratios must stay within 0.5 percentage points of the full file.
MAX_RATIO_GAP = 0.005


@pytest.fixture(scope="module")
def train() -> pl.DataFrame:
    return load_adult().train


def positive_share(labels: np.ndarray) -> float:
    return float(np.mean(labels == schema.POSITIVE_CLASS))


def make_labels(positive: int, negative: int, seed: int) -> np.ndarray:
    """Shuffle `positive` and `negative` labels into one array."""
    labels = np.array(
        [schema.POSITIVE_CLASS] * positive + [schema.NEGATIVE_CLASS] * negative,
        dtype=object,
    )
    return np.random.default_rng(seed).permutation(labels)


def rounding_bound(part_size: int) -> float:
    """Largest class-ratio gap a part can have when class counts are whole rows.

    Each class gets the floor or the ceiling of its exact share, so its count
    is off by less than one row, and the ratio by less than 1 / part_size.
    """
    return 1.0 / part_size


label_arrays = st.builds(
    make_labels,
    positive=st.integers(min_value=0, max_value=3_000),
    negative=st.integers(min_value=0, max_value=3_000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
).filter(lambda labels: labels.size >= 2)
fractions = st.floats(min_value=0.01, max_value=0.99)
seeds = st.integers(min_value=0, max_value=2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(labels=label_arrays, fraction=fractions, seed=seeds)
def test_stratified_indices_properties(labels, fraction, seed):
    first, rest = stratified_indices(labels, fraction, seed)
    assert np.intersect1d(first, rest).size == 0
    assert np.array_equal(
        np.sort(np.concatenate([first, rest])), np.arange(labels.size)
    )
    assert first.size == round(fraction * labels.size)
    full_share = positive_share(labels)
    for part in (first, rest):
        if part.size:
            gap = abs(positive_share(labels[part]) - full_share)
            assert gap < rounding_bound(part.size) + 1e-12


@settings(max_examples=50, deadline=None)
@given(labels=label_arrays, fraction=fractions, seed=seeds)
def test_stratified_indices_reproducible(labels, fraction, seed):
    first, rest = stratified_indices(labels, fraction, seed)
    again_first, again_rest = stratified_indices(labels.copy(), fraction, seed)
    assert np.array_equal(first, again_first)
    assert np.array_equal(rest, again_rest)


@settings(max_examples=100, deadline=None)
@given(
    positive=st.integers(min_value=1_000, max_value=5_000),
    negative=st.integers(min_value=1_000, max_value=5_000),
    validation_share=st.floats(min_value=0.1, max_value=0.5),
    seed=seeds,
)
def test_split_ratio_within_half_point(positive, negative, validation_share, seed):
    # Both parts have at least 200 rows, so the rounding bound 1 / rows is at
    # most 0.5 percentage points.
    frame = pl.DataFrame({schema.LABEL: make_labels(positive, negative, seed)})
    train, validation = train_validation_split(frame, validation_share, seed)
    full_share = positive_share(frame[schema.LABEL].to_numpy())
    for part in (train, validation):
        gap = abs(positive_share(part[schema.LABEL].to_numpy()) - full_share)
        assert gap <= MAX_RATIO_GAP


@pytest.mark.parametrize("seed", [0, 1, 2024])
def test_adult_split_keeps_ratio(train, seed):
    training, validation = train_validation_split(train, 0.2, seed)
    full_share = positive_share(train[schema.LABEL].to_numpy())
    assert training.height + validation.height == train.height
    assert validation.height == round(0.2 * train.height)
    for part in (training, validation):
        gap = abs(positive_share(part[schema.LABEL].to_numpy()) - full_share)
        assert gap <= MAX_RATIO_GAP


def test_adult_split_reproducible(train):
    first_train, first_validation = train_validation_split(train, 0.2, seed=7)
    second_train, second_validation = train_validation_split(train, 0.2, seed=7)
    assert first_train.equals(second_train)
    assert first_validation.equals(second_validation)


def test_adult_split_depends_on_seed(train):
    _, first = train_validation_split(train, 0.2, seed=7)
    _, second = train_validation_split(train, 0.2, seed=8)
    assert not first.equals(second)


@pytest.mark.parametrize("rows", [200, 1_000, 5_001, 32_560])
def test_sample_rows_keeps_ratio(train, rows):
    sample = sample_rows(train, rows, seed=3)
    full_share = positive_share(train[schema.LABEL].to_numpy())
    assert sample.height == rows
    gap = abs(positive_share(sample[schema.LABEL].to_numpy()) - full_share)
    assert gap <= MAX_RATIO_GAP


def test_sample_rows_reproducible(train):
    assert sample_rows(train, 1_000, seed=3).equals(sample_rows(train, 1_000, seed=3))


@pytest.mark.parametrize("rows", [0, 32_561])
def test_sample_rows_whole_frame(train, rows):
    assert sample_rows(train, rows, seed=3).height == train.height


@pytest.mark.parametrize(
    ("rows", "message"),
    [(-1, "must be 0 \\(all rows\\) or more"), (32_562, "exceeds the 32561 rows")],
    ids=["negative", "too-many"],
)
def test_sample_rows_invalid(train, rows, message):
    with pytest.raises(ValueError, match=message):
        sample_rows(train, rows, seed=3)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2, 1.5])
def test_split_share_out_of_range(train, share):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        train_validation_split(train, share, seed=0)


def test_split_leaving_empty_side():
    frame = pl.DataFrame({schema.LABEL: [schema.POSITIVE_CLASS, schema.NEGATIVE_CLASS]})
    with pytest.raises(ValueError, match="leaves 2 training and 0 validation rows"):
        train_validation_split(frame, 0.1, seed=0)


def test_stratified_indices_empty_labels():
    with pytest.raises(ValueError, match="labels is empty"):
        stratified_indices(np.array([], dtype=object), 0.5, seed=0)
