"""The work behind the flow's steps, kept out of the FlowSpec so it stays thin."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import polars as pl

from tabmodel.packaging import (
    TARBALL,
    fetch_package,
    load_keras_model,
    make_tarball,
    read_metadata,
    store_package,
)

log = logging.getLogger(__name__)

DEPLOY_TARGETS = ("local", "sagemaker", "none")


def validate_parameters(flow) -> None:
    """Check the flow's parameters before any work starts.

    Raises:
        ValueError: naming the parameter, the value received and the fix.
    """
    if flow.workers < 1:
        raise ValueError(f"--workers must be 1 or more. Received: {flow.workers}")
    if flow.trials < flow.workers:
        raise ValueError(
            f"--trials ({flow.trials}) must be at least --workers ({flow.workers}), "
            "so every worker runs a trial."
        )
    if flow.max_epochs < 1:
        raise ValueError(f"--max-epochs must be 1 or more. Received: {flow.max_epochs}")
    if flow.sample_rows < 0:
        raise ValueError(
            f"--sample-rows must be 0 (all rows) or more. Received: {flow.sample_rows}"
        )
    if not 0.0 < flow.validation_share < 1.0:
        raise ValueError(
            "--validation-share must be between 0 and 1. "
            f"Received: {flow.validation_share}"
        )
    if flow.deploy_target not in DEPLOY_TARGETS:
        raise ValueError(
            f"--deploy-target must be one of {', '.join(DEPLOY_TARGETS)}. "
            f"Received: {flow.deploy_target!r}"
        )


def limit_threads(workers: int) -> None:
    """Share the CPU cores among the parallel tuning processes of one machine."""
    import tensorflow as tf

    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def package_destination(datastore_root: str, current) -> str:
    """Return the run-versioned location of this run's model package.

    A retried task writes under `retry-<n>/`, because packages are never
    overwritten and the failed attempt may have stored one already.
    """
    root = datastore_root.rstrip("/")
    run_dir = f"{root}/models/{current.flow_name}/{current.run_id}"
    if current.retry_count:
        run_dir = f"{run_dir}/retry-{current.retry_count}"
    return f"{run_dir}/{TARBALL}"


def retrain_epochs(best_epoch: int) -> int:
    """Return the epoch count for retraining on train + validation.

    The best trial stopped at `best_epoch` on 80% of the rows; with 25% more
    rows per epoch, the same epoch count is a conservative choice.
    """
    return max(1, int(best_epoch))


def retrain_and_package(
    best_params: dict,
    best_epoch: int,
    train: pl.DataFrame,
    validation: pl.DataFrame,
    *,
    seed: int,
    destination: str,
    metadata: dict,
    threshold: float | None = None,
) -> tuple[str, int]:
    """Train on train + validation for the best trial's epochs, then store
    the package at `destination`.

    Training runs in this process through the training container's code
    (`tabmodel.train_entry.train`), under MirroredStrategy when several GPUs
    are visible.

    Returns:
        The package's location and the number of epochs trained.
    """
    from tabmodel.train_entry import train as train_package

    epochs = retrain_epochs(best_epoch)
    hyperparameters = {**best_params, "epochs": epochs, "seed": seed}
    if threshold is not None:
        hyperparameters["threshold"] = threshold
    with tempfile.TemporaryDirectory() as work:
        package = Path(work) / "package"
        train_package(
            hyperparameters,
            train,
            validation,
            package,
            checkpoint_dir=None,
            metadata={**metadata, "trainer": "local"},
        )
        tarball = make_tarball(package, Path(work) / TARBALL)
        uri = store_package(tarball, destination)
    return uri, epochs


def evaluate_package(
    model_uri: str,
    train: pl.DataFrame,
    validation: pl.DataFrame,
    test: pl.DataFrame,
    *,
    seed: int,
) -> dict:
    """Score the packaged model and a boosted-tree baseline on `test`.

    Returns:
        A dict with `metrics` and `baseline_metrics` (each with accuracy,
        roc_auc, pr_auc and log_loss), the test `labels`, and both models'
        `probabilities` and `baseline_probabilities`.
    """
    from tabmodel.baseline import gbdt_probabilities, train_gbdt
    from tabmodel.training import compute_metrics, label_array, predict_probabilities

    with tempfile.TemporaryDirectory() as work:
        package = fetch_package(model_uri, work)
        model = load_keras_model(package)
        threshold = float(read_metadata(package).get("threshold", 0.5))
    labels = label_array(test)
    probabilities = predict_probabilities(model, test)
    baseline = train_gbdt(pl.concat([train, validation]), seed)
    baseline_probabilities = gbdt_probabilities(baseline, test)
    return {
        "metrics": compute_metrics(labels, probabilities, threshold),
        "baseline_metrics": compute_metrics(labels, baseline_probabilities),
        "labels": labels,
        "probabilities": probabilities,
        "baseline_probabilities": baseline_probabilities,
        "threshold": threshold,
    }
