"""The training container's entry point, run as the container runs it:
`python -m tabmodel.train_entry` with the job's paths in SM_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from tabmodel.data import load_adult
from tabmodel.split import sample_rows, train_validation_split
from tabmodel.train_entry import (
    INTERRUPTED_EXIT_STATUS,
    encode_hyperparameters,
    parse_hyperparameters,
)
from tabmodel.training import DEFAULT_PARAMS

SAMPLE_ROWS = 1200
ENTRY_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def channels(tmp_path_factory) -> Path:
    """Train and validation channels with parquet files from the bundled data."""
    root = tmp_path_factory.mktemp("channels")
    rows = sample_rows(load_adult("bundled").train, SAMPLE_ROWS, 3)
    train, validation = train_validation_split(rows, 0.2, 3)
    for name, frame in (("train", train), ("validation", validation)):
        (root / name).mkdir()
        frame.write_parquet(root / name / "part-0.parquet")
    return root


def job_dirs(tmp_path: Path, channels: Path, epochs: int) -> dict[str, str]:
    """Write hyperparameters.json and return the entry point's SM_* variables."""
    config = tmp_path / "config"
    config.mkdir()
    values = {**DEFAULT_PARAMS, "epochs": epochs, "seed": 5, "run": "IncomeFlow/7"}
    (config / "hyperparameters.json").write_text(
        json.dumps(encode_hyperparameters(values))
    )
    return {
        "SM_CHANNEL_TRAIN": str(channels / "train"),
        "SM_CHANNEL_VALIDATION": str(channels / "validation"),
        "SM_INPUT_CONFIG_DIR": str(config),
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "SM_OUTPUT_DIR": str(tmp_path / "output"),
        "TABMODEL_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
    }


def run_entry(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tabmodel.train_entry"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=ENTRY_TIMEOUT_S,
    )


def test_hyperparameters_round_trip():
    values = {"loss": "cross_entropy", "column_embedding": False, "epsilon": 1e-7}
    encoded = encode_hyperparameters(values)
    assert all(isinstance(value, str) for value in encoded.values())
    assert encoded["loss"] == "cross_entropy"
    assert parse_hyperparameters(encoded) == values


def test_hyperparameters_false_parses_to_bool():
    assert parse_hyperparameters({"column_embedding": "false"}) == {
        "column_embedding": False
    }


def test_entry_writes_loadable_package(tmp_path, channels):
    from tabmodel.packaging import load_keras_model, read_metadata
    from tabmodel.train_entry import read_channel
    from tabmodel.training import predict_probabilities

    env = job_dirs(tmp_path, channels, epochs=2)
    result = run_entry(env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    model_dir = Path(env["SM_MODEL_DIR"])
    assert (model_dir / "1" / "saved_model.pb").is_file()
    metadata = read_metadata(model_dir)
    assert metadata["epochs"] == 2
    assert metadata["initial_epoch"] == 0
    assert metadata["trainer"] == "sagemaker"
    assert metadata["run"] == "IncomeFlow/7"
    assert metadata["best_params"]["loss"] == "cross_entropy"
    assert len(metadata["history"]["loss"]) == 2

    model = load_keras_model(model_dir)
    probabilities = predict_probabilities(model, read_channel(channels / "validation"))
    assert probabilities.shape == (int(SAMPLE_ROWS * 0.2),)
    assert np.all((probabilities >= 0) & (probabilities <= 1))


def test_restart_resumes_from_checkpoint(tmp_path, channels):
    from tabmodel.packaging import read_metadata

    env = job_dirs(tmp_path, channels, epochs=3)
    checkpoints = Path(env["TABMODEL_CHECKPOINT_DIR"])

    interrupted = run_entry({**env, "TABMODEL_EXIT_AFTER_EPOCH": "1"})
    assert interrupted.returncode == INTERRUPTED_EXIT_STATUS, interrupted.stderr[-3000:]
    assert json.loads((checkpoints / "checkpoint.json").read_text())["epoch"] == 1
    assert (checkpoints / "checkpoint.keras").is_file()
    assert not (Path(env["SM_MODEL_DIR"]) / "metadata.json").exists()

    resumed = run_entry(env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "initial_epoch=1 of 3 epochs" in resumed.stdout
    metadata = read_metadata(env["SM_MODEL_DIR"])
    assert metadata["initial_epoch"] == 1
    assert metadata["epochs"] == 3
    # Only epochs 2 and 3 ran in the resumed process.
    assert len(metadata["history"]["loss"]) == 2
    assert json.loads((checkpoints / "checkpoint.json").read_text())["epoch"] == 3


def test_missing_channel_writes_failure_file(tmp_path, channels):
    env = job_dirs(tmp_path, channels, epochs=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_entry({**env, "SM_CHANNEL_TRAIN": str(empty)})
    assert result.returncode == 1
    failure = (Path(env["SM_OUTPUT_DIR"]) / "failure").read_text()
    assert "No parquet files in channel directory" in failure


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    from tabmodel.train_entry import distribution_scope, read_channel, train
    from tabmodel.training import DEFAULT_PARAMS

    channels, out = Path(sys.argv[1]), Path(sys.argv[2])
    with distribution_scope(["/cpu:0", "/cpu:1"]) as strategy:
        replicas = strategy.num_replicas_in_sync
    metadata = train(
        {**DEFAULT_PARAMS, "epochs": 1, "seed": 1},
        read_channel(channels / "train"),
        read_channel(channels / "validation"),
        out / "model",
        out / "checkpoints",
        devices=["/cpu:0", "/cpu:1"],
    )
    print(json.dumps({"replicas": replicas, "loss": metadata["history"]["loss"]}))
    """
)


def test_mirrored_strategy_on_two_devices(tmp_path, channels):
    # Two logical CPU devices stand in for two GPUs.
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(channels), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=ENTRY_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert len(report["loss"]) == 1
    assert np.isfinite(report["loss"][0])
    assert (tmp_path / "model" / "model.keras").is_file()
