"""Training helpers computed by hand: decision threshold, metrics, package paths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tabmodel.training import accuracy_threshold, compute_metrics


def test_threshold_separates_perfectly_ranked_rows():
    labels = np.array([0, 0, 0, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    threshold = accuracy_threshold(labels, probabilities)
    assert 0.3 < threshold <= 0.7
    assert abs(threshold - 0.5) < 1e-9


def test_threshold_follows_shifted_scores():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([0.05, 0.10, 0.20, 0.25])
    # Every threshold in (0.10, 0.20] is perfect; the tie goes to the one nearest 0.5.
    assert accuracy_threshold(labels, probabilities) == pytest.approx(0.20)


def test_metrics_by_hand():
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([0.2, 0.8, 0.4, 0.6])
    metrics = compute_metrics(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["roc_auc"] == pytest.approx(0.75)
    expected_log_loss = -np.mean(np.log([0.8, 0.8, 0.4, 0.4]))
    assert metrics["log_loss"] == pytest.approx(expected_log_loss)


def test_metrics_use_threshold():
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([0.2, 0.8, 0.4, 0.6])
    metrics = compute_metrics(labels, probabilities, threshold=0.7)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert not math.isnan(metrics["pr_auc"])


def test_package_destination_per_retry():
    from types import SimpleNamespace

    from tabmodel.pipeline import package_destination

    first = SimpleNamespace(flow_name="IncomeFlow", run_id="17", retry_count=0)
    retry = SimpleNamespace(flow_name="IncomeFlow", run_id="17", retry_count=1)
    assert package_destination("s3://b/p/", first) == (
        "s3://b/p/models/IncomeFlow/17/model.tar.gz"
    )
    assert package_destination("s3://b/p", retry) == (
        "s3://b/p/models/IncomeFlow/17/retry-1/model.tar.gz"
    )
