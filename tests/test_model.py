"""Behaviour of the TabTransformer: outputs, custom layers, saving and inputs."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402

from tabmodel import schema  # noqa: E402
from tabmodel.data import load_adult  # noqa: E402
from tabmodel.model import (  # noqa: E402
    CategoryCleaner,
    ColumnEmbedding,
    NumericEmbedding,
    NumericNormalization,
    PiecewiseLinearEncoding,
    TransformerBlock,
    create_tabtransformer,
    learn_vocabularies,
    numeric_statistics,
    piecewise_linear_edges,
)
from tabmodel.split import sample_rows, train_validation_split  # noqa: E402
from tabmodel.training import (  # noqa: E402
    DEFAULT_PARAMS,
    compute_metrics,
    feature_arrays,
    label_array,
    predict_probabilities,
    train_model,
)

SAMPLE_ROWS = 2000

# A tiny model that still contains every custom layer.
TINY_PARAMS = {
    **DEFAULT_PARAMS,
    "num_layers": 1,
    "num_heads": 2,
    "embedding_dims": 8,
    "numeric_embedding": "piecewise_linear",
    "numeric_bins": 8,
    "batch_size": 256,
    "epochs": 1,
}


@pytest.fixture(scope="module")
def adult():
    return load_adult()


@pytest.fixture(scope="module")
def splits(adult):
    sample = sample_rows(adult.train, SAMPLE_ROWS, seed=0)
    return train_validation_split(sample, 0.2, seed=0)


@pytest.fixture(scope="module")
def holdout_rows(adult):
    return adult.test.head(200)


@pytest.fixture(scope="module")
def trained(splits):
    train, validation = splits
    return train_model(TINY_PARAMS, train, validation, epochs=2, seed=0)


@pytest.fixture(scope="module")
def probabilities(trained, holdout_rows):
    return predict_probabilities(trained.model, holdout_rows)


def test_output_shape(trained, holdout_rows):
    output = trained.model.predict_on_batch(feature_arrays(holdout_rows))
    assert output.shape == (holdout_rows.height, 1)


def test_output_at_least_zero(probabilities):
    assert probabilities.min() >= 0.0


def test_output_at_most_one(probabilities):
    assert probabilities.max() <= 1.0


@pytest.mark.parametrize("numeric_embedding", ["none", "linear", "piecewise_linear"])
def test_numeric_embedding_builds(splits, numeric_embedding):
    arrays = feature_arrays(splits[0])
    model = create_tabtransformer(
        learn_vocabularies(arrays),
        numeric_statistics(arrays),
        num_layers=1,
        num_heads=2,
        embedding_dims=8,
        numeric_embedding=numeric_embedding,
    )
    assert model.predict_on_batch(arrays).shape == (splits[0].height, 1)


def test_unknown_numeric_embedding_raises(splits):
    arrays = feature_arrays(splits[0])
    with pytest.raises(ValueError, match="periodic"):
        create_tabtransformer(
            learn_vocabularies(arrays),
            numeric_statistics(arrays),
            numeric_embedding="periodic",
        )


@pytest.mark.parametrize(
    "layer",
    [
        CategoryCleaner(),
        NumericNormalization([1.0, 2.0], [0.5, 0.0], [False, True]),
        ColumnEmbedding(),
        TransformerBlock(8, 2, 0.1, ff_multiple=2),
        PiecewiseLinearEncoding([[0.0, 1.0, 3.0], [0.0, 2.0]]),
        NumericEmbedding(8, activation="relu"),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1.0, [0.0, 0.0]),
        (0.5, [0.5, 0.0]),
        (2.0, [1.0, 0.5]),
        (5.0, [1.0, 1.0]),
    ],
)
def test_piecewise_linear_encoding_values(value, expected):
    encoding = PiecewiseLinearEncoding([[0.0, 1.0, 3.0]])
    encoded = keras.ops.convert_to_numpy(encoding(np.array([[value]], "float32")))
    np.testing.assert_allclose(encoded[0, 0], expected)


def test_piecewise_linear_edges_split_point_mass(adult):
    stats = numeric_statistics(feature_arrays(adult.train))
    column = schema.NUMERIC_FEATURES.index("capital_gain")
    edges = piecewise_linear_edges(stats, 16)[column]
    # Over 90% of rows have no capital gain, yet the nonzero values keep bins.
    assert len(edges) > 4


PREDICT_SCRIPT = """
import sys
import keras
import numpy as np
import tabmodel.model

model = keras.saving.load_model(sys.argv[1])
inputs = dict(np.load(sys.argv[2]))
np.save(sys.argv[3], model.predict_on_batch(inputs))
"""


def test_saved_model_predicts_same_in_new_process(trained, holdout_rows, tmp_path):
    model_path = tmp_path / "model.keras"
    inputs_path = tmp_path / "inputs.npz"
    output_path = tmp_path / "output.npy"
    inputs = feature_arrays(holdout_rows)
    trained.model.save(model_path)
    np.savez(inputs_path, **inputs)
    expected = trained.model.predict_on_batch(inputs)

    subprocess.run(
        [sys.executable, "-c", PREDICT_SCRIPT, model_path, inputs_path, output_path],
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    np.testing.assert_allclose(np.load(output_path), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("occupation", "Astronaut"),
        ("occupation", None),
        ("occupation", "?"),
        ("occupation", ""),
        ("native_country", "  "),
        ("age", float("nan")),
        ("capital_gain", float("nan")),
    ],
    ids=["unseen", "none", "question_mark", "empty", "blank", "nan_age", "nan_gain"],
)
def test_unusual_input_gives_probability(trained, holdout_rows, column, value):
    rows = holdout_rows.head(5).with_columns(
        pl.lit(value, dtype=holdout_rows.schema[column]).alias(column)
    )
    probabilities = predict_probabilities(trained.model, rows)
    assert np.all(np.isfinite(probabilities))
    assert np.all(probabilities >= 0.0)
    assert np.all(probabilities <= 1.0)


def test_training_deterministic(trained, splits):
    train, validation = splits
    again = train_model(TINY_PARAMS, train, validation, epochs=2, seed=0)
    first = compute_metrics(
        label_array(validation), predict_probabilities(trained.model, validation)
    )
    second = compute_metrics(
        label_array(validation), predict_probabilities(again.model, validation)
    )
    assert first["pr_auc"] == second["pr_auc"]
