"""Compare the TabTransformer with scikit-learn baselines on the Adult test file.

Trains the TabTransformer with `DEFAULT_PARAMS` (early stopping on validation
PR AUC), a HistGradientBoostingClassifier and a logistic regression. All three
train on the same stratified training split (validation share 0.2, seed 0),
and each is scored on the 16,281 rows of the official test file.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python bench/model_quality.py

The last output line gives the headline numbers with 4 decimals:
`tabtransformer_roc_auc=... tabtransformer_accuracy=...
gbdt_roc_auc=... gbdt_accuracy=...` (one line, split here for width).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tabmodel.baseline import (  # noqa: E402
    baseline_probabilities,
    gbdt_probabilities,
    train_gbdt,
    train_logistic_regression,
)
from tabmodel.data import load_adult  # noqa: E402
from tabmodel.split import train_validation_split  # noqa: E402
from tabmodel.training import (  # noqa: E402
    DEFAULT_PARAMS,
    compute_metrics,
    label_array,
    predict_probabilities,
    train_model,
)

VALIDATION_SHARE = 0.2
SEED = 0


def report(name: str, metrics: dict, rounds: str, seconds: float) -> None:
    """Print one model's test metrics, training rounds and training wall time."""
    print(
        f"{name:<20} accuracy={metrics['accuracy']:.4f} "
        f"roc_auc={metrics['roc_auc']:.4f} pr_auc={metrics['pr_auc']:.4f} "
        f"{rounds} train_seconds={seconds:.1f}",
        flush=True,
    )


def main() -> None:
    data = load_adult()
    train, validation = train_validation_split(data.train, VALIDATION_SHARE, SEED)
    labels = label_array(data.test)
    print(
        f"train={train.height} validation={validation.height} test={data.test.height}"
    )
    print(f"DEFAULT_PARAMS={DEFAULT_PARAMS}", flush=True)

    start = time.perf_counter()
    result = train_model(DEFAULT_PARAMS, train, validation, seed=SEED)
    seconds = time.perf_counter() - start
    transformer = compute_metrics(
        labels, predict_probabilities(result.model, data.test)
    )
    epochs = f"epochs={result.epochs_run} best_epoch={result.best_epoch}"
    report("tabtransformer", transformer, epochs, seconds)

    start = time.perf_counter()
    gbdt_model = train_gbdt(train, SEED)
    seconds = time.perf_counter() - start
    gbdt = compute_metrics(labels, gbdt_probabilities(gbdt_model, data.test))
    report("gbdt", gbdt, f"boosting_iterations={gbdt_model[-1].n_iter_}", seconds)

    start = time.perf_counter()
    logistic_model = train_logistic_regression(train, SEED)
    seconds = time.perf_counter() - start
    logistic = compute_metrics(
        labels, baseline_probabilities(logistic_model, data.test)
    )
    solver_iterations = f"solver_iterations={logistic_model[-1].n_iter_[0]}"
    report("logistic_regression", logistic, solver_iterations, seconds)

    print(
        f"tabtransformer_roc_auc={transformer['roc_auc']:.4f} "
        f"tabtransformer_accuracy={transformer['accuracy']:.4f} "
        f"gbdt_roc_auc={gbdt['roc_auc']:.4f} gbdt_accuracy={gbdt['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
