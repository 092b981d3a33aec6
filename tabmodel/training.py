"""Turn polars frames into `tf.data` pipelines, train the model and score it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from tabmodel import schema  # noqa: E402
from tabmodel.losses import create_loss  # noqa: E402
from tabmodel.model import (  # noqa: E402
    create_tabtransformer,
    learn_vocabularies,
    numeric_statistics,
)

log = logging.getLogger(__name__)

# A configuration that trains well on the full Adult data, and the one the
# benchmark and tests use. With it the model reached test ROC AUC 0.919 and
# accuracy 0.864, stopping early after 34 epochs in about 140 s on 2 CPU cores
# (bench/model_quality.py, bench/RESULTS.md). Numeric columns enter the
# transformer as piecewise-linear tokens, which scored higher than linear
# tokens in the same benchmark setting.
DEFAULT_PARAMS: dict = {
    "num_layers": 2,
    "num_heads": 4,
    "embedding_dims": 16,
    "transformer_dropout": 0.1,
    "mlp_hidden_layers": 2,
    "mlp_multiple_0": 2,
    "mlp_multiple_1": 1,
    "mlp_dropout": 0.2,
    "column_embedding": True,
    "numeric_embedding": "piecewise_linear",
    "numeric_bins": 16,
    "loss": "cross_entropy",
    "learning_rate": 1e-3,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-7,
    "clipnorm": 1.0,
    "batch_size": 512,
    "epochs": 40,
}

# Epochs without a better validation PR AUC before training stops. Validation
# PR AUC improves in small, noisy steps, with up to 3 epochs between
# improvements in the benchmark run of DEFAULT_PARAMS, so 6 leaves a margin at
# the cost of 6 epochs after the best one.
DEFAULT_PATIENCE = 6


@dataclass
class TrainResult:
    """A trained model and what its training recorded."""

    model: keras.Model
    history: dict
    epochs_run: int
    best_epoch: int


def feature_arrays(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """Return one column array per model input, with missing categories as `?`."""
    arrays = {}
    for name in schema.CATEGORICAL_FEATURES:
        values = frame[name].fill_null(schema.MISSING).to_numpy().astype(str)
        arrays[name] = values.reshape(-1, 1)
    for name in schema.NUMERIC_FEATURES:
        arrays[name] = frame[name].cast(pl.Float32).to_numpy().reshape(-1, 1)
    return arrays


def label_array(frame: pl.DataFrame) -> np.ndarray:
    """Return 1.0 for the positive class and 0.0 otherwise."""
    return (frame[schema.LABEL] == schema.POSITIVE_CLASS).cast(pl.Float32).to_numpy()


def weight_array(frame: pl.DataFrame) -> np.ndarray:
    """Return the census weights scaled to a mean of 1."""
    weights = frame[schema.WEIGHT].cast(pl.Float64).to_numpy()
    return (weights / weights.mean()).astype("float32")


def make_dataset(
    frame: pl.DataFrame,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    use_weights: bool = False,
):
    """Build a batched, prefetched `tf.data.Dataset` of (features, label[, weight])."""
    import tensorflow as tf

    columns = (feature_arrays(frame), label_array(frame))
    if use_weights:
        columns = (*columns, weight_array(frame))
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle:
        dataset = dataset.shuffle(
            frame.height, seed=seed, reshuffle_each_iteration=True
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def model_kwargs(params: dict) -> dict:
    """Select the TabTransformer constructor arguments from flat parameters."""
    layers_count = int(params["mlp_hidden_layers"])
    multiples = [params[f"mlp_multiple_{i}"] for i in range(layers_count)]
    return {
        "num_layers": int(params["num_layers"]),
        "num_heads": int(params["num_heads"]),
        "embedding_dims": int(params["embedding_dims"]),
        "transformer_dropout": float(params["transformer_dropout"]),
        "mlp_hidden_layers": layers_count,
        "mlp_hidden_multiples": multiples,
        "mlp_dropout": float(params["mlp_dropout"]),
        "column_embedding": bool(params.get("column_embedding", True)),
        "numeric_embedding": str(params.get("numeric_embedding", "piecewise_linear")),
        "numeric_bins": int(params.get("numeric_bins", 16)),
    }


def create_compiled_model(params: dict, train: pl.DataFrame) -> keras.Model:
    """Build the model from `params`, fitting its preprocessing on `train`."""
    arrays = feature_arrays(train)
    model = create_tabtransformer(
        learn_vocabularies(arrays), numeric_statistics(arrays), **model_kwargs(params)
    )
    loss = create_loss(
        params["loss"],
        gamma=float(params.get("focal_gamma", 2.0)),
        alpha=float(params.get("focal_alpha", 0.25)),
        class_balancing=bool(params.get("class_balancing", False)),
    )
    optimizer = keras.optimizers.Adam(
        learning_rate=float(params["learning_rate"]),
        beta_1=float(params["beta_1"]),
        beta_2=float(params["beta_2"]),
        epsilon=float(params["epsilon"]),
        clipnorm=float(params["clipnorm"]),
    )
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[
            keras.metrics.AUC(curve="PR", name="pr_auc"),
            keras.metrics.AUC(curve="ROC", name="roc_auc"),
        ],
    )
    return model


def train_model(
    params: dict,
    train: pl.DataFrame,
    validation: pl.DataFrame | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    patience: int = DEFAULT_PATIENCE,
    use_weights: bool = False,
    callbacks: list | None = None,
    verbose: int = 0,
) -> TrainResult:
    """Train a model with `params` on `train`.

    With a validation frame, training stops early when validation PR AUC has
    not improved for `patience` epochs, and the best epoch's weights are kept.
    Without one, the model trains for exactly `epochs` epochs.
    """
    keras.utils.set_random_seed(seed)
    epochs = int(epochs or params["epochs"])
    batch_size = int(params.get("batch_size", DEFAULT_PARAMS["batch_size"]))
    model = create_compiled_model(params, train)
    train_data = make_dataset(
        train, batch_size, shuffle=True, seed=seed, use_weights=use_weights
    )
    callbacks = list(callbacks or [])
    validation_data = None
    if validation is not None:
        validation_data = make_dataset(validation, 4096, use_weights=use_weights)
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_pr_auc",
                mode="max",
                patience=patience,
                restore_best_weights=True,
            )
        )
    history = model.fit(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        callbacks=callbacks,
        verbose=verbose,
    ).history
    epochs_run = len(history["loss"])
    best_epoch = epochs_run
    if validation is not None:
        best_epoch = int(np.argmax(history["val_pr_auc"])) + 1
    return TrainResult(model, history, epochs_run, best_epoch)


def predict_probabilities(model: keras.Model, frame: pl.DataFrame) -> np.ndarray:
    """Return P(income > 50K) for every row of `frame`."""
    dataset = make_dataset(frame, 4096)
    return model.predict(dataset.map(lambda x, y: x), verbose=0).reshape(-1)


def compute_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Compute accuracy, ROC AUC, PR AUC (average precision) and log loss."""
    probabilities = np.clip(probabilities.astype("float64"), 1e-7, 1 - 1e-7)
    predicted = (probabilities >= threshold).astype(int)
    return {
        "accuracy": float(sk_metrics.accuracy_score(labels, predicted)),
        "roc_auc": float(sk_metrics.roc_auc_score(labels, probabilities)),
        "pr_auc": float(sk_metrics.average_precision_score(labels, probabilities)),
        "log_loss": float(sk_metrics.log_loss(labels, probabilities, labels=[0, 1])),
    }


def accuracy_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Return the decision threshold, from 0.05 to 0.95 in steps of 0.01, with
    the highest accuracy on these rows (the one nearest 0.5 among ties)."""
    candidates = np.round(np.arange(0.05, 0.951, 0.01), 2)
    accuracies = np.array(
        [np.mean((probabilities >= t) == (labels == 1)) for t in candidates]
    )
    best = np.flatnonzero(accuracies == accuracies.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
