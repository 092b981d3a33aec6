"""Metaflow card contents: tables and matplotlib figures, rendered offline.

Each `*_card` function returns a list of card components for `current.card`.
Figures are embedded as PNG data, so a card needs no network to display.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from metaflow.cards import Image, Markdown, ProgressBar, Table  # noqa: E402

from tabmodel import schema  # noqa: E402

FIGURE_SIZE = (5.0, 3.2)


def _figure(width: float = FIGURE_SIZE[0], height: float = FIGURE_SIZE[1]):
    figure, axes = plt.subplots(figsize=(width, height), dpi=90)
    return figure, axes


def _image(figure) -> Image:
    figure.tight_layout()
    image = Image.from_matplotlib(figure)
    plt.close(figure)
    return image


def data_card(frames: dict[str, pl.DataFrame], provenance: dict) -> list:
    """Show row counts and class balance per split, missing values and numeric plots."""
    components = [Markdown("# Data")]
    components.append(
        Markdown(
            f"Source: `{provenance.get('source')}`; checksum "
            f"**{provenance.get('checksum')}**."
        )
    )
    rows = []
    for name, frame in frames.items():
        positive = int((frame[schema.LABEL] == schema.POSITIVE_CLASS).sum())
        share = positive / frame.height if frame.height else 0.0
        rows.append([name, frame.height, positive, f"{share:.2%}"])
    components.append(Markdown("## Rows and class balance"))
    components.append(
        Table(rows, headers=["split", "rows", f"{schema.POSITIVE_CLASS}", "share"])
    )

    components.append(Markdown("## Missing values per column"))
    missing_rows = []
    for column in schema.FEATURE_COLUMNS:
        missing_rows.append(
            [column, *[int(frame[column].null_count()) for frame in frames.values()]]
        )
    components.append(Table(missing_rows, headers=["column", *frames.keys()]))

    components.append(Markdown("## Numeric features (training split)"))
    train = next(iter(frames.values()))
    for column in (*schema.NUMERIC_FEATURES, schema.WEIGHT):
        figure, axes = _figure(4.0, 2.4)
        values = train[column].drop_nulls().to_numpy()
        for label, colour in (
            (schema.NEGATIVE_CLASS, "#4c72b0"),
            (schema.POSITIVE_CLASS, "#dd8452"),
        ):
            subset = train.filter(pl.col(schema.LABEL) == label)[column].to_numpy()
            axes.hist(
                subset,
                bins=40,
                range=(values.min(), values.max()),
                alpha=0.6,
                label=label,
                color=colour,
            )
        if column in schema.LOG_SCALED:
            axes.set_yscale("log")
        axes.set_title(column)
        axes.legend(fontsize=7)
        components.append(_image(figure))
    return components


def tuning_card(summary: dict, study=None) -> list:
    """Show optimisation history, parameter importances, best parameters, counts."""
    components = [Markdown("# Tuning")]
    components.append(
        Markdown(
            f"Best trial **{summary['best_trial']}**: validation PR AUC "
            f"**{summary['best_value']:.4f}**."
        )
    )
    components.append(Markdown("## Trials per worker"))
    counts = [
        [worker, c["complete"], c["pruned"], c["fail"]]
        for worker, c in sorted(summary["per_worker"].items())
    ]
    components.append(Table(counts, headers=["worker", "complete", "pruned", "failed"]))

    history = sorted(summary["history"], key=lambda t: t["number"])
    figure, axes = _figure()
    done = [t for t in history if t["value"] is not None and t["state"] == "complete"]
    if done:
        numbers = [t["number"] for t in done]
        values = [t["value"] for t in done]
        axes.scatter(numbers, values, s=14, label="trial")
        axes.plot(
            numbers, np.maximum.accumulate(values), color="#c44e52", label="best so far"
        )
        axes.legend(fontsize=7)
    axes.set_xlabel("trial")
    axes.set_ylabel("validation PR AUC")
    axes.set_title("Optimisation history")
    components.append(Markdown("## Optimisation history"))
    components.append(_image(figure))

    components.append(Markdown("## Parameter importances"))
    importances = _importances(study)
    if importances:
        figure, axes = _figure(5.0, 0.25 * len(importances) + 1.0)
        names = list(importances)[::-1]
        axes.barh(names, [importances[n] for n in names])
        axes.set_xlabel("importance (fANOVA)")
        components.append(_image(figure))
    else:
        components.append(Markdown("Too few completed trials to estimate importances."))

    components.append(Markdown("## Best parameters"))
    components.append(
        Table(
            [[k, _format(v)] for k, v in sorted(summary["best_params"].items())],
            headers=["parameter", "value"],
        )
    )
    return components


def _importances(study) -> dict:
    if study is None:
        return {}
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def evaluation_card(
    labels: np.ndarray,
    probabilities: np.ndarray,
    metrics: dict,
    baseline_metrics: dict,
    baseline_probabilities: np.ndarray | None = None,
    threshold: float = 0.5,
) -> list:
    """Show a metrics table, ROC and PR curves, the confusion matrix and calibration."""
    from sklearn import metrics as sk_metrics
    from sklearn.calibration import calibration_curve

    components = [Markdown("# Evaluation on the official test file")]
    rows = [
        [name, f"{metrics[name]:.4f}", f"{baseline_metrics[name]:.4f}"]
        for name in ("accuracy", "roc_auc", "pr_auc", "log_loss")
    ]
    components.append(
        Table(rows, headers=["metric", "TabTransformer", "boosted trees"])
    )

    curves = [("TabTransformer", probabilities)]
    if baseline_probabilities is not None:
        curves.append(("boosted trees", baseline_probabilities))

    figure, axes = _figure()
    for name, scores in curves:
        fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
        axes.plot(fpr, tpr, label=name)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("ROC curve")
    axes.legend(fontsize=7)
    components.append(Markdown("## ROC curve"))
    components.append(_image(figure))

    figure, axes = _figure()
    for name, scores in curves:
        precision, recall, _ = sk_metrics.precision_recall_curve(labels, scores)
        axes.plot(recall, precision, label=name)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title("Precision-recall curve")
    axes.legend(fontsize=7)
    components.append(Markdown("## Precision-recall curve"))
    components.append(_image(figure))

    predicted = (probabilities >= threshold).astype(int)
    matrix = sk_metrics.confusion_matrix(labels, predicted, labels=[0, 1])
    figure, axes = _figure(4.4, 3.4)
    axes.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center")
    axes.set_xticks([0, 1], [f"pred {c}" for c in schema.CLASSES])
    axes.set_yticks([0, 1], [f"true {c}" for c in schema.CLASSES])
    axes.set_title(f"Threshold {threshold:g}", fontsize=10)
    components.append(Markdown("## Confusion matrix"))
    components.append(_image(figure))

    figure, axes = _figure()
    observed, predicted_mean = calibration_curve(labels, probabilities, n_bins=10)
    axes.plot(predicted_mean, observed, marker="o", label="TabTransformer")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    axes.set_xlabel("mean predicted probability")
    axes.set_ylabel("observed share of >50K")
    axes.set_title("Calibration")
    axes.legend(fontsize=7)
    components.append(Markdown("## Calibration"))
    components.append(_image(figure))
    return components


def deployment_card(deployment: dict, model_uri: str, sample: dict | None) -> list:
    """Show where the model went, and a sample request with its response."""
    components = [Markdown("# Deployment")]
    rows = [[key, str(value)] for key, value in deployment.items()]
    rows.append(["model_uri", model_uri])
    components.append(Table(rows, headers=["field", "value"]))
    if sample:
        components.append(Markdown("## Sample request (text/csv)"))
        components.append(Markdown(f"```\n{sample['request']}\n```"))
        components.append(Markdown("## Response (application/json)"))
        components.append(
            Markdown(f"```\n{json.dumps(sample['response'], indent=2)}\n```")
        )
    return components


class TuningProgress:
    """A live card section for one tuning worker: a progress bar and one line
    per finished trial, refreshed as each trial ends."""

    def __init__(self, card, worker: int, n_trials: int):
        self.card = card
        self.finished = 0
        self.lines: list[str] = []
        self.bar = ProgressBar(max=n_trials, label=f"worker {worker}: trials")
        self.trials = Markdown("No trial finished yet.")
        card.append(Markdown(f"# Tuning worker {worker}"))
        card.append(self.bar)
        card.append(self.trials)
        card.refresh()

    def __call__(self, study, trial) -> None:
        self.finished += 1
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        self.lines.append(
            f"- trial {trial.number}: {trial.state.name.lower()}, "
            f"validation PR AUC {value}"
        )
        self.bar.update(self.finished)
        self.trials.update("\n".join(self.lines))
        self.card.refresh()
