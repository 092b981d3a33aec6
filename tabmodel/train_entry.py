"""Training entry point of the training container: `python -m tabmodel.train_entry`.

SageMaker starts the container with the job's files in the paths below. The
platform itself sets no `SM_*` variables (the SageMaker training toolkit does,
and this image does not use it), so the defaults are the platform's paths and
the variables only override them, for tests or other launchers.

==========================  ============================  =======================
variable                    default                       contents
==========================  ============================  =======================
SM_CHANNEL_TRAIN            /opt/ml/input/data/train      parquet files to train on
SM_CHANNEL_VALIDATION       /opt/ml/input/data/validation parquet files (optional)
SM_INPUT_CONFIG_DIR         /opt/ml/input/config          hyperparameters.json
SM_MODEL_DIR                /opt/ml/model                 the model package
SM_OUTPUT_DIR               /opt/ml/output                `failure` on an error
TABMODEL_CHECKPOINT_DIR     /opt/ml/checkpoints           checkpoint per epoch
==========================  ============================  =======================

SageMaker uploads SM_MODEL_DIR as `model.tar.gz`, so the entry point writes the
package layout of `tabmodel.packaging` there and the artifact is a package that
`fetch_package` reads. With a checkpoint configured, SageMaker syncs the
checkpoint directory to S3 and restores it when a spot instance is replaced.
The entry point then resumes from the last saved epoch.

Hyperparameters are the model parameters of `tabmodel.training` plus the
control keys `epochs`, `seed`, `run` and `train_on_validation`. SageMaker
passes every value as a string, and `encode_hyperparameters` and
`parse_hyperparameters` define the encoding: JSON, except that strings stay raw.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import polars as pl  # noqa: E402

log = logging.getLogger("tabmodel.train_entry")

HYPERPARAMETERS_FILE = "hyperparameters.json"
CHECKPOINT_FILE = "checkpoint.keras"
CHECKPOINT_STATE_FILE = "checkpoint.json"
FAILURE_FILE = "failure"
CONTROL_KEYS = ("epochs", "seed", "run", "train_on_validation")
# Exit status after the epoch that TABMODEL_EXIT_AFTER_EPOCH names (EX_TEMPFAIL).
INTERRUPTED_EXIT_STATUS = 75
# SageMaker stores at most 1024 bytes of the failure file as FailureReason.
FAILURE_REASON_MAX_BYTES = 1024


def encode_hyperparameters(values: dict) -> dict[str, str]:
    """Encode values as SageMaker hyperparameter strings: strings raw, others JSON."""
    return {
        name: value if isinstance(value, str) else json.dumps(value)
        for name, value in values.items()
    }


def parse_hyperparameters(raw: dict) -> dict:
    """Decode hyperparameter strings: JSON values where they parse, strings otherwise.

    A string that is valid JSON (`"true"`, `"3"`) decodes to that JSON value, so
    a model parameter must not be a string that reads as JSON.
    """
    values = {}
    for name, value in raw.items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        values[name] = value
    return values


def read_channel(directory: str | os.PathLike) -> pl.DataFrame:
    """Read and concatenate the parquet files of a channel directory, by name.

    Raises:
        FileNotFoundError: the directory contains no `*.parquet` file.
    """
    files = sorted(Path(directory).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"No parquet files in channel directory {directory}. Check the "
            "job's InputDataConfig S3 URI."
        )
    return pl.concat([pl.read_parquet(file) for file in files])


@contextlib.contextmanager
def distribution_scope(devices: list[str] | None = None) -> Iterator[object | None]:
    """Run the block under `tf.distribute.MirroredStrategy` when several devices
    are visible, and yield the strategy (None with one device or none).

    Model creation, `compile`, checkpoint loading and `fit` must all run inside
    the block so the variables are mirrored. `devices` defaults to the visible
    GPUs.
    """
    import tensorflow as tf

    if devices is None:
        devices = [
            device.name.replace("physical_device:", "")
            for device in tf.config.list_physical_devices("GPU")
        ]
    if len(devices) < 2:
        yield None
        return
    strategy = tf.distribute.MirroredStrategy(devices)
    log.info("training on %d devices with MirroredStrategy", len(devices))
    with strategy.scope():
        yield strategy


def _build_from_first_replica(model, strategy) -> None:
    """Make `fit` build the model from one replica's batch instead of a reduced one.

    Keras 3.15 `fit` under a tf.distribute strategy averages the first batch
    across replicas to get input shapes (`_maybe_symbolic_build`), and that
    average fails on this model's string inputs with "Value for attr 'T' of
    string is not in the list of allowed values". One replica's batch has the
    same dtypes and shapes, so building from it is equivalent.
    """
    from keras import tree

    # NOTE: overrides a private Keras method on this model instance only; check
    # it when upgrading Keras past 3.15.
    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                break
            data_batch = tree.map_structure(
                lambda value: strategy.experimental_local_results(value)[0], batch
            )
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = build


def checkpoint_callback(directory: Path, epochs: int, exit_after_epoch: int | None):
    """Create a Keras callback that saves the model and optimizer after each epoch.

    Each save replaces the previous checkpoint atomically, then records the
    completed epoch count in `checkpoint.json`. With `exit_after_epoch` set, the
    process exits with INTERRUPTED_EXIT_STATUS after saving that epoch, as a
    spot interruption would end it.
    """
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            completed = epoch + 1
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / f"partial-{CHECKPOINT_FILE}"
            self.model.save(partial)
            os.replace(partial, directory / CHECKPOINT_FILE)
            state = {"epoch": completed, "epochs": epochs}
            (directory / CHECKPOINT_STATE_FILE).write_text(json.dumps(state))
            log.info("checkpoint saved after epoch %d of %d", completed, epochs)
            if exit_after_epoch is not None and completed == exit_after_epoch:
                log.warning(
                    "exiting after epoch %d because TABMODEL_EXIT_AFTER_EPOCH is set",
                    completed,
                )
                logging.shutdown()
                os._exit(INTERRUPTED_EXIT_STATUS)

    return EpochCheckpoint()


def load_checkpoint(directory: Path):
    """Return the checkpointed model and its completed epochs, or (None, 0)."""
    state_file = directory / CHECKPOINT_STATE_FILE
    model_file = directory / CHECKPOINT_FILE
    if not (state_file.is_file() and model_file.is_file()):
        return None, 0
    import keras

    import tabmodel.model  # noqa: F401  (registers the custom layers)

    state = json.loads(state_file.read_text())
    return keras.saving.load_model(model_file), int(state["epoch"])


def train(
    hyperparameters: dict,
    train_frame: pl.DataFrame,
    validation_frame: pl.DataFrame | None,
    model_dir: Path,
    checkpoint_dir: Path | None,
    *,
    metadata: dict | None = None,
    exit_after_epoch: int | None = None,
    devices: list[str] | None = None,
) -> dict:
    """Train (or resume from a checkpoint) and write the package to `model_dir`.

    The flow's local retrain calls this too, with no `checkpoint_dir`, so both
    trainers train the same way.

    With `train_on_validation` (the default, as in the flow's local retrain)
    the model trains on train + validation for exactly `epochs` epochs. With
    it off, validation metrics are logged per epoch and training still runs
    all epochs, because a restarted job must end at the same epoch.

    `metadata` adds keys to the package metadata (the run, the trainer).
    `devices` are the devices for `distribution_scope` (default: the GPUs).

    Returns:
        The package metadata.
    """
    import keras

    from tabmodel.packaging import write_package
    from tabmodel.training import create_compiled_model, make_dataset

    params = {k: v for k, v in hyperparameters.items() if k not in CONTROL_KEYS}
    epochs = int(hyperparameters["epochs"])
    seed = int(hyperparameters.get("seed", 0))
    train_on_validation = bool(hyperparameters.get("train_on_validation", True))
    if epochs < 1:
        raise ValueError(f"Hyperparameter epochs must be 1 or more. Received: {epochs}")

    fit_frame, monitor_frame = train_frame, validation_frame
    if train_on_validation and validation_frame is not None:
        fit_frame, monitor_frame = pl.concat([train_frame, validation_frame]), None
    batch_size = int(params.get("batch_size", 256))

    with distribution_scope(devices) as strategy:
        model, initial_epoch = None, 0
        if checkpoint_dir is not None:
            model, initial_epoch = load_checkpoint(checkpoint_dir)
        if model is None:
            keras.utils.set_random_seed(seed)
            model = create_compiled_model(params, fit_frame)
        else:
            log.info(
                "resuming from checkpoint in %s: initial_epoch=%d of %d epochs",
                checkpoint_dir,
                initial_epoch,
                epochs,
            )
            # NOTE: a resumed run draws other shuffles and dropout masks than an
            # uninterrupted one, so its weights differ, but not its epoch count.
            keras.utils.set_random_seed(seed + initial_epoch)
        if strategy is not None:
            _build_from_first_replica(model, strategy)
        history = {}
        if initial_epoch < epochs:
            train_data = make_dataset(
                fit_frame, batch_size, shuffle=True, seed=seed + initial_epoch
            )
            validation_data = None
            if monitor_frame is not None:
                validation_data = make_dataset(monitor_frame, 4096)
            callbacks = []
            if checkpoint_dir is not None:
                callbacks.append(
                    checkpoint_callback(checkpoint_dir, epochs, exit_after_epoch)
                )
            history = model.fit(
                train_data,
                validation_data=validation_data,
                epochs=epochs,
                initial_epoch=initial_epoch,
                callbacks=callbacks,
                verbose=2,
            ).history

    metadata = {
        **(metadata or {}),
        "best_params": params,
        "threshold": float(params.get("threshold", 0.5)),
        "epochs": epochs,
        "initial_epoch": initial_epoch,
        "training_rows": fit_frame.height,
        "history": {
            name: [float(v) for v in values] for name, values in history.items()
        },
    }
    write_package(model, model_dir, metadata)
    log.info(
        "wrote the model package to %s after epochs %d to %d",
        model_dir,
        initial_epoch + 1,
        epochs,
    )
    return metadata


def _path_from_env(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def _write_failure(output_dir: Path, error: BaseException) -> None:
    # SageMaker reports the failure file's content as the job's FailureReason.
    reason = f"{type(error).__name__}: {error}".encode()[:FAILURE_REASON_MAX_BYTES]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / FAILURE_FILE).write_bytes(reason)
    except OSError as write_error:
        log.error("could not write the failure file in %s: %s", output_dir, write_error)


def main() -> int:
    """Read the job's configuration and data, train and write the model package."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    output_dir = _path_from_env("SM_OUTPUT_DIR", "/opt/ml/output")
    try:
        config_dir = _path_from_env("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")
        raw = json.loads((config_dir / HYPERPARAMETERS_FILE).read_text())
        hyperparameters = parse_hyperparameters(raw)
        train_frame = read_channel(
            _path_from_env("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")
        )
        validation_dir = _path_from_env(
            "SM_CHANNEL_VALIDATION", "/opt/ml/input/data/validation"
        )
        validation_frame = (
            read_channel(validation_dir) if validation_dir.is_dir() else None
        )
        # For tests only: end the process after this epoch's checkpoint.
        exit_after = os.environ.get("TABMODEL_EXIT_AFTER_EPOCH")
        train(
            hyperparameters,
            train_frame,
            validation_frame,
            model_dir=_path_from_env("SM_MODEL_DIR", "/opt/ml/model"),
            checkpoint_dir=_path_from_env(
                "TABMODEL_CHECKPOINT_DIR", "/opt/ml/checkpoints"
            ),
            metadata={"run": hyperparameters.get("run", ""), "trainer": "sagemaker"},
            exit_after_epoch=int(exit_after) if exit_after else None,
        )
    except Exception as error:
        traceback.print_exc()
        _write_failure(output_dir, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
