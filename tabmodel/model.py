"""TabTransformer (Huang et al. 2020, arXiv:2012.06678) in Keras 3.

Each categorical column is embedded, the column embeddings pass through a stack
of transformer blocks, and the contextual embeddings are flattened and
concatenated with the normalised numeric features before an MLP head. The
preprocessing (trimming, vocabulary lookup with an out-of-vocabulary slot,
log scaling and standardisation, missing values) is part of the model, so a
saved model takes raw column values.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from tabmodel import schema

PACKAGE = "tabmodel"


@keras.saving.register_keras_serializable(package=PACKAGE)
class CategoryCleaner(layers.Layer):
    """Trim category strings and map empty strings to the missing marker `?`."""

    def call(self, inputs):
        import tensorflow as tf

        trimmed = tf.strings.strip(inputs)
        return tf.where(trimmed == "", schema.MISSING, trimmed)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=PACKAGE)
class NumericNormalization(layers.Layer):
    """Standardise numeric columns, log1p-scaling the heavy-tailed ones.

    A missing value (NaN) becomes 0 after standardisation, the training mean.

    Args:
        mean: per-column mean of the (scaled) training values.
        std: per-column standard deviation of the (scaled) training values.
        log_scaled: per-column flags; flagged columns read log1p(max(x, 0)).
    """

    def __init__(self, mean, std, log_scaled, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) if v > 0 else 1.0 for v in std]
        self.log_scaled = [bool(v) for v in log_scaled]

    def call(self, inputs):
        inputs = ops.cast(inputs, "float32")
        flags = ops.convert_to_tensor(self.log_scaled)
        scaled = ops.where(flags, ops.log1p(ops.maximum(inputs, 0.0)), inputs)
        standard = (scaled - ops.convert_to_tensor(self.mean)) / ops.convert_to_tensor(
            self.std
        )
        return ops.where(ops.isnan(standard), ops.zeros_like(standard), standard)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mean=self.mean, std=self.std, log_scaled=self.log_scaled)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ColumnEmbedding(layers.Layer):
    """Add a learned column-identifier vector to each column's embedding."""

    def build(self, input_shape):
        self.column_vectors = self.add_weight(
            name="column_vectors",
            shape=(input_shape[1], input_shape[2]),
            initializer="random_normal",
        )

    def call(self, inputs):
        return inputs + self.column_vectors

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=PACKAGE)
class PiecewiseLinearEncoding(layers.Layer):
    """Encode each standardised numeric column as piecewise-linear bin values.

    A column with bin edges e_0 < ... < e_T becomes T values, one per bin:
    0 below the bin, 1 above it and the linear position inside it, which is
    the piecewise-linear encoding (PLE) for numeric features. Columns with
    fewer bins are padded with zeros up to the largest bin count.

    Args:
        bin_edges: ascending edges of each column, at least two per column.
    """

    def __init__(self, bin_edges, **kwargs):
        super().__init__(**kwargs)
        self.bin_edges = [[float(e) for e in edges] for edges in bin_edges]
        if any(len(edges) < 2 for edges in self.bin_edges):
            raise ValueError(
                "Each column needs at least two bin edges. "
                f"Received: bin_edges={self.bin_edges}"
            )
        self.num_bins = max(len(edges) - 1 for edges in self.bin_edges)
        lower = np.zeros((len(self.bin_edges), self.num_bins), dtype="float32")
        width = np.ones_like(lower)
        valid = np.zeros_like(lower)
        for column, edges in enumerate(self.bin_edges):
            count = len(edges) - 1
            lower[column, :count] = edges[:-1]
            width[column, :count] = np.maximum(np.diff(edges), 1e-6)
            valid[column, :count] = 1.0
        self._lower, self._width, self._valid = lower, width, valid

    def call(self, inputs):
        position = (ops.expand_dims(inputs, -1) - self._lower) / self._width
        return ops.clip(position, 0.0, 1.0) * self._valid

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.num_bins)

    def get_config(self):
        config = super().get_config()
        config.update(bin_edges=self.bin_edges)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class NumericEmbedding(layers.Layer):
    """Map each numeric column's encoding to one token with its own weights.

    Reads (batch, columns, encoding size) and returns (batch, columns,
    embedding_dims): token j is activation(x_j @ W_j + b_j).

    Args:
        embedding_dims: size of each token.
        activation: Keras activation name applied to the tokens, or None.
    """

    def __init__(self, embedding_dims, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dims = embedding_dims
        self.activation = keras.activations.get(activation)
        self._activation_name = activation

    def build(self, input_shape):
        _, columns, size = input_shape
        self.kernel = self.add_weight(
            name="kernel",
            shape=(columns, size, self.embedding_dims),
            initializer="glorot_uniform",
        )
        self.bias = self.add_weight(
            name="bias", shape=(columns, self.embedding_dims), initializer="zeros"
        )

    def call(self, inputs):
        tokens = ops.einsum("bcs,csd->bcd", inputs, self.kernel) + self.bias
        return self.activation(tokens)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.embedding_dims)

    def get_config(self):
        config = super().get_config()
        config.update(
            embedding_dims=self.embedding_dims, activation=self._activation_name
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(layers.Layer):
    """Multi-head self-attention and a feed-forward network, each followed by
    a residual connection and layer normalisation (post-norm, as in the paper).
    """

    def __init__(
        self, embedding_dims, num_heads, dropout_rate, ff_multiple=4, **kwargs
    ):
        super().__init__(**kwargs)
        self.embedding_dims = embedding_dims
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.ff_multiple = ff_multiple
        self.attention = layers.MultiHeadAttention(
            num_heads=num_heads,
            key_dim=max(1, embedding_dims // num_heads),
            dropout=dropout_rate,
        )
        self.attention_norm = layers.LayerNormalization(epsilon=1e-6)
        self.feed_forward = keras.Sequential(
            [
                layers.Dense(embedding_dims * ff_multiple, activation="gelu"),
                layers.Dropout(dropout_rate),
                layers.Dense(embedding_dims),
            ]
        )
        self.feed_forward_dropout = layers.Dropout(dropout_rate)
        self.feed_forward_norm = layers.LayerNormalization(epsilon=1e-6)

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)
        self.attention_norm.build(input_shape)
        self.feed_forward.build(input_shape)
        self.feed_forward_norm.build(input_shape)

    def call(self, inputs, training=None):
        attended = self.attention(inputs, inputs, training=training)
        inputs = self.attention_norm(inputs + attended)
        transformed = self.feed_forward(inputs, training=training)
        transformed = self.feed_forward_dropout(transformed, training=training)
        return self.feed_forward_norm(inputs + transformed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            embedding_dims=self.embedding_dims,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            ff_multiple=self.ff_multiple,
        )
        return config


# Levels at which `numeric_statistics` records each column's quantiles;
# `piecewise_linear_edges` interpolates bin edges for any bin count from them.
QUANTILE_LEVELS = 129

NUMERIC_EMBEDDINGS = ("none", "linear", "piecewise_linear")


def numeric_statistics(columns: dict[str, np.ndarray]) -> dict[str, list]:
    """Compute the normalisation statistics and quantiles of the numeric features.

    Returns `mean`, `std` and `log_scaled` for `NumericNormalization`, and per
    column the quantiles of the standardised values (`quantiles`) and of their
    distinct values (`distinct_quantiles`), at `QUANTILE_LEVELS` even levels.
    NaN values are left out of every statistic.
    """
    mean, std, flags, quantiles, distinct_quantiles = [], [], [], [], []
    levels = np.linspace(0.0, 1.0, QUANTILE_LEVELS)
    for name in schema.NUMERIC_FEATURES:
        values = np.ravel(np.asarray(columns[name], dtype="float64"))
        if name in schema.LOG_SCALED:
            values = np.log1p(np.maximum(values, 0.0))
        column_mean = float(np.nanmean(values))
        column_std = float(np.nanstd(values))
        mean.append(column_mean)
        std.append(column_std)
        flags.append(name in schema.LOG_SCALED)
        standard = (values[~np.isnan(values)] - column_mean) / (column_std or 1.0)
        quantiles.append(np.quantile(standard, levels).tolist())
        distinct_quantiles.append(np.quantile(np.unique(standard), levels).tolist())
    return {
        "mean": mean,
        "std": std,
        "log_scaled": flags,
        "quantiles": quantiles,
        "distinct_quantiles": distinct_quantiles,
    }


def piecewise_linear_edges(numeric_stats: dict[str, list], num_bins: int) -> list:
    """Choose up to `num_bins` bins per numeric column from its recorded quantiles.

    Half of the edges are quantiles of the values and half are quantiles of
    the distinct values. The second half keeps several bins above a point
    mass, such as the 0 that most rows of capital_gain hold, where value
    quantiles alone would give a single bin. Duplicate edges are merged, so a
    column may get fewer bins.
    """
    grid = np.linspace(0.0, 1.0, QUANTILE_LEVELS)
    value_edges = num_bins // 2 + 1
    distinct_edges = num_bins - num_bins // 2 + 1
    edges = []
    for values, distinct in zip(
        numeric_stats["quantiles"], numeric_stats["distinct_quantiles"], strict=True
    ):
        column_edges = np.concatenate(
            [
                np.interp(np.linspace(0.0, 1.0, value_edges), grid, values),
                np.interp(np.linspace(0.0, 1.0, distinct_edges), grid, distinct),
            ]
        )
        column_edges = np.unique(np.round(column_edges, 6))
        if column_edges.size < 2:
            column_edges = np.array([column_edges[0], column_edges[0] + 1.0])
        edges.append(column_edges.tolist())
    return edges


def learn_vocabularies(columns: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Return the sorted distinct values of each categorical feature."""
    return {
        name: sorted({str(v).strip() for v in np.ravel(columns[name])})
        for name in schema.CATEGORICAL_FEATURES
    }


def create_tabtransformer(
    vocabularies: dict[str, list[str]],
    numeric_stats: dict[str, list],
    *,
    num_layers: int = 3,
    num_heads: int = 4,
    embedding_dims: int = 32,
    transformer_dropout: float = 0.1,
    mlp_hidden_layers: int = 2,
    mlp_hidden_multiples: tuple[int, ...] | list[int] = (2, 1),
    mlp_dropout: float = 0.1,
    column_embedding: bool = True,
    numeric_embedding: str = "piecewise_linear",
    numeric_bins: int = 16,
) -> keras.Model:
    """Build a TabTransformer that reads one raw input per feature column.

    Args:
        vocabularies: known values of each categorical feature, learned from
            the training split; any other value maps to one out-of-vocabulary
            slot.
        numeric_stats: output of `numeric_statistics` on the training split.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block; must divide `embedding_dims`.
        embedding_dims: size of each column token, categorical or numeric.
        transformer_dropout: dropout rate inside the transformer blocks.
        mlp_hidden_layers: number of hidden layers in the MLP head.
        mlp_hidden_multiples: hidden layer sizes as multiples of the head's
            input size, one per hidden layer (the last one repeats if short).
        mlp_dropout: dropout rate after each hidden layer of the head.
        column_embedding: add a learned column-identifier embedding.
        numeric_embedding: how numeric columns also enter the transformer as
            tokens: `none` (only the head reads them, as in the paper),
            `linear` (token j is x_j * w_j + b_j) or `piecewise_linear`
            (`PiecewiseLinearEncoding` followed by a per-column dense layer
            with ReLU). The head reads the normalised numeric features in
            every case. `piecewise_linear` is the default because it scored
            best on the Adult test file (bench/RESULTS.md).
        numeric_bins: maximum bins per column for `piecewise_linear`.

    Returns:
        An uncompiled model with a sigmoid output: P(income > 50K).
    """
    if embedding_dims % num_heads:
        raise ValueError(
            "embedding_dims must be a multiple of num_heads. "
            f"Received: embedding_dims={embedding_dims}, num_heads={num_heads}"
        )
    if mlp_hidden_layers < 0 or not mlp_hidden_multiples and mlp_hidden_layers:
        raise ValueError(
            "mlp_hidden_layers needs at least one multiple in mlp_hidden_multiples. "
            f"Received: mlp_hidden_layers={mlp_hidden_layers}, "
            f"mlp_hidden_multiples={mlp_hidden_multiples}"
        )
    if numeric_embedding not in NUMERIC_EMBEDDINGS:
        raise ValueError(
            f"numeric_embedding must be one of {', '.join(NUMERIC_EMBEDDINGS)}. "
            f"Received: numeric_embedding={numeric_embedding!r}"
        )
    if numeric_embedding == "piecewise_linear" and numeric_bins < 1:
        raise ValueError(f"numeric_bins must be at least 1. Received: {numeric_bins}")
    inputs = {}
    embedded = []
    cleaner = CategoryCleaner(name="category_cleaner")
    for name in schema.CATEGORICAL_FEATURES:
        inputs[name] = keras.Input(shape=(1,), dtype="string", name=name)
        lookup = layers.StringLookup(
            vocabulary=vocabularies[name],
            num_oov_indices=1,
            mask_token=None,
            name=f"{name}_lookup",
        )
        indices = lookup(cleaner(inputs[name]))
        embedding = layers.Embedding(
            input_dim=lookup.vocabulary_size(),
            output_dim=embedding_dims,
            name=f"{name}_embedding",
        )
        embedded.append(embedding(indices))
    for name in schema.NUMERIC_FEATURES:
        inputs[name] = keras.Input(shape=(1,), dtype="float32", name=name)

    numeric = layers.Concatenate(name="numeric_features")(
        [inputs[name] for name in schema.NUMERIC_FEATURES]
    )
    normalization_stats = {
        key: numeric_stats[key] for key in ("mean", "std", "log_scaled")
    }
    numeric = NumericNormalization(**normalization_stats, name="numeric_normalization")(
        numeric
    )
    if numeric_embedding != "none":
        embedded.append(
            _numeric_tokens(
                numeric, numeric_stats, numeric_embedding, numeric_bins, embedding_dims
            )
        )

    tokens = layers.Concatenate(axis=1, name="column_tokens")(embedded)
    if column_embedding:
        tokens = ColumnEmbedding(name="column_embedding")(tokens)
    for index in range(num_layers):
        tokens = TransformerBlock(
            embedding_dims, num_heads, transformer_dropout, name=f"transformer_{index}"
        )(tokens)
    contextual = layers.Flatten(name="contextual_embeddings")(tokens)
    features = layers.Concatenate(name="head_input")([contextual, numeric])

    head_width = features.shape[-1]
    hidden = features
    for index in range(mlp_hidden_layers):
        multiple = mlp_hidden_multiples[min(index, len(mlp_hidden_multiples) - 1)]
        hidden = layers.Dense(
            max(1, int(multiple * head_width)), activation="selu", name=f"mlp_{index}"
        )(hidden)
        hidden = layers.Dropout(mlp_dropout, name=f"mlp_dropout_{index}")(hidden)
    output = layers.Dense(1, activation="sigmoid", name="probability")(hidden)
    return keras.Model(inputs=inputs, outputs=output, name="tabtransformer")


def _numeric_tokens(numeric, numeric_stats, numeric_embedding, numeric_bins, dims):
    """Turn the normalised numeric features into one token per column."""
    if numeric_embedding == "linear":
        encoded = layers.Reshape(
            (len(schema.NUMERIC_FEATURES), 1), name="numeric_values"
        )(numeric)
        return NumericEmbedding(dims, name="numeric_embedding")(encoded)
    if "quantiles" not in numeric_stats:
        raise ValueError(
            "numeric_embedding='piecewise_linear' needs the quantiles that "
            "numeric_statistics records, but numeric_stats has none. Pass the "
            "output of numeric_statistics, or numeric_embedding='none'."
        )
    edges = piecewise_linear_edges(numeric_stats, numeric_bins)
    encoded = PiecewiseLinearEncoding(edges, name="piecewise_linear_encoding")(numeric)
    return NumericEmbedding(dims, activation="relu", name="numeric_embedding")(encoded)
