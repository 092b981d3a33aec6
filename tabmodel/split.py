"""Stratified, seeded splits of the Adult training file."""

from __future__ import annotations

import numpy as np
import polars as pl

from tabmodel import schema


def stratified_indices(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices so each class keeps its share on both sides.

    The first part has `round(fraction * len(labels))` rows. Each class gets
    the floor or the ceiling of its exact share of them, by largest remainder
    apportionment with ties going to the class that sorts first. So each
    part's class ratio differs from the full ratio by less than 1 / (rows in
    that part). Each class is shuffled with NumPy's PCG64 generator seeded by
    `seed`, which gives the same permutation on every platform for a given
    NumPy version.

    Returns:
        The sorted indices of the first part and of the rest.

    Raises:
        ValueError: `fraction` is not strictly between 0 and 1, or `labels` is
            empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"fraction must be strictly between 0 and 1. Received: {fraction}"
        )
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("labels is empty. Pass at least one row to split.")
    classes, class_sizes = np.unique(labels, return_counts=True)
    counts = _apportion(class_sizes, round(fraction * labels.size))
    rng = np.random.default_rng(seed)
    first, rest = [], []
    for value, count in zip(classes, counts, strict=True):
        members = rng.permutation(np.flatnonzero(labels == value))
        first.append(members[:count])
        rest.append(members[count:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(rest))


def _apportion(class_sizes: np.ndarray, total: int) -> list[int]:
    """Share `total` rows between classes in proportion to their sizes.

    Integer arithmetic keeps the floors and remainders exact.
    """
    size_sum = int(class_sizes.sum())
    scaled = [total * int(size) for size in class_sizes]
    counts = [value // size_sum for value in scaled]
    remainders = [value % size_sum for value in scaled]
    # Python's sorted is stable, also with reverse=True, so equal remainders
    # keep the class order.
    by_remainder = sorted(range(len(counts)), key=lambda i: remainders[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sample_rows(frame: pl.DataFrame, rows: int, seed: int) -> pl.DataFrame:
    """Return a stratified sample of exactly `rows` rows, or the whole frame for 0.

    The sample's class ratio differs from the frame's by less than 1 / `rows`,
    so a sample of 200 rows or more keeps it within 0.5 percentage points.

    Raises:
        ValueError: `rows` is negative or larger than the frame.
    """
    if rows < 0:
        raise ValueError(
            f"--sample-rows must be 0 (all rows) or more. Received: {rows}"
        )
    if rows == 0 or rows == frame.height:
        return frame
    if rows > frame.height:
        raise ValueError(
            f"--sample-rows {rows} exceeds the {frame.height} rows of the training "
            "file. Pass 0 to use all rows."
        )
    labels = frame[schema.LABEL].to_numpy()
    chosen, _ = stratified_indices(labels, rows / frame.height, seed)
    return frame[chosen]


def train_validation_split(
    frame: pl.DataFrame, validation_share: float, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split `frame` into stratified training and validation frames.

    Raises:
        ValueError: `validation_share` is not strictly between 0 and 1, or it
            leaves the training or the validation frame empty.
    """
    if not 0.0 < validation_share < 1.0:
        raise ValueError(
            "validation_share must be strictly between 0 and 1. "
            f"Received: {validation_share}"
        )
    labels = frame[schema.LABEL].to_numpy()
    validation, train = stratified_indices(labels, validation_share, seed)
    if validation.size == 0 or train.size == 0:
        raise ValueError(
            f"validation_share {validation_share} of {frame.height} rows leaves "
            f"{train.size} training and {validation.size} validation rows. Pass a "
            "share that leaves at least one row on each side."
        )
    return frame[train], frame[validation]
