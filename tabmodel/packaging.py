"""Model packages: the trainable `.keras` model, a SavedModel serving signature
and metadata, in the `model.tar.gz` layout SageMaker unpacks to /opt/ml/model.

Package layout (paths inside the tarball)::

    model.keras      the trainable Keras model
    1/               SavedModel with the `serve` signature, one tensor per feature
    metadata.json    feature columns, threshold, metrics and provenance
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from tabmodel import schema

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "1"
METADATA_FILE = "metadata.json"
TARBALL = "model.tar.gz"
SIGNATURE = "serve"


def serving_signature_spec() -> dict:
    """Return the `serve` signature's inputs: one 1-D tensor per model input."""
    import tensorflow as tf

    spec = {
        name: tf.TensorSpec([None], tf.string, name=name)
        for name in schema.CATEGORICAL_FEATURES
    }
    spec.update(
        {
            name: tf.TensorSpec([None], tf.float32, name=name)
            for name in schema.NUMERIC_FEATURES
        }
    )
    return spec


def export_serving_model(model, path: str | os.PathLike) -> None:
    """Export a SavedModel whose `serve` signature returns `probability`.

    The signature is a traced graph, so the server calls it without Keras'
    per-call overhead (`model.predict` costs about 40 ms for one row).
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(features):
        inputs = {name: tf.expand_dims(value, -1) for name, value in features.items()}
        probability = model(inputs, training=False)
        return {"probability": tf.reshape(probability, [-1])}

    archive.add_endpoint(SIGNATURE, serve, input_signature=[serving_signature_spec()])
    archive.write_out(str(path), verbose=False)


def write_package(model, directory: str | os.PathLike, metadata: dict) -> Path:
    """Write the package files into `directory` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / KERAS_FILE)
    export_serving_model(model, directory / SAVED_MODEL_DIR)
    full_metadata = {
        "feature_columns": list(schema.FEATURE_COLUMNS),
        "classes": list(schema.CLASSES),
        "threshold": 0.5,
        **metadata,
    }
    (directory / METADATA_FILE).write_text(json.dumps(full_metadata, indent=2))
    return directory


def make_tarball(directory: str | os.PathLike, tarball: str | os.PathLike) -> Path:
    """Pack the files of `directory` at the root of a gzip tarball."""
    directory, tarball = Path(directory), Path(tarball)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:gz") as archive:
        for entry in sorted(directory.iterdir()):
            archive.add(entry, arcname=entry.name)
    return tarball


def unpack_tarball(tarball: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Unpack a package tarball into `directory`, rejecting unsafe paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as archive:
        archive.extractall(directory, filter="data")
    return directory


def load_keras_model(directory: str | os.PathLike):
    """Load the trainable model of an unpacked package."""
    import keras

    import tabmodel.model  # noqa: F401  (registers the custom layers)

    return keras.saving.load_model(Path(directory) / KERAS_FILE)


def read_metadata(directory: str | os.PathLike) -> dict:
    """Read the metadata of an unpacked package."""
    return json.loads((Path(directory) / METADATA_FILE).read_text())


def store_package(tarball: str | os.PathLike, destination: str) -> str:
    """Copy a tarball to `destination`, a local path or an `s3://` URI.

    Raises:
        FileExistsError: an object already exists there; packages are never
            overwritten.
    """
    if destination.startswith("s3://"):
        return upload_bytes_s3(Path(tarball).read_bytes(), destination)
    target = Path(destination)
    if target.exists():
        raise FileExistsError(f"Model package {target} exists; packages are immutable.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
        shutil.copyfileobj(open(tarball, "rb"), partial)
    os.replace(partial.name, target)
    return str(target)


def fetch_package(uri: str, directory: str | os.PathLike) -> Path:
    """Download (or copy) the tarball at `uri` and unpack it into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    local = directory / TARBALL
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        s3_client().download_file(bucket, key, str(local))
    else:
        shutil.copyfile(uri, local)
    unpack_tarball(local, directory)
    local.unlink()
    return directory


def upload_bytes_s3(body: bytes, uri: str) -> str:
    """Upload `body` to the `s3://` URI `uri` unless an object exists there.

    The existence check comes first; the upload then sends `If-None-Match: *`,
    so S3 also rejects the write when another writer created the key in
    between. An S3-compatible store that ignores the header leaves that
    window open.

    Raises:
        FileExistsError: an object already exists at `uri`.
    """
    from botocore.exceptions import ClientError

    client = s3_client()
    bucket, key = split_s3_uri(uri)
    if _s3_object_exists(client, bucket, key):
        raise FileExistsError(f"S3 object {uri} exists and is never overwritten.")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in _PRECONDITION_FAILED:
            raise FileExistsError(
                f"S3 object {uri} exists and is never overwritten."
            ) from error
        raise
    return uri


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into bucket and key.

    Raises:
        ValueError: `uri` is not an `s3://` URI with a bucket.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"Expected an s3://bucket/key URI. Received: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r}")
    return bucket, key


def s3_client():
    """Create a boto3 S3 client from Metaflow's S3 configuration.

    The endpoint and certificate settings are the ones ingest uses
    (`tabmodel.data.s3_client_options`), so METAFLOW_S3_ENDPOINT_URL selects an
    S3-compatible store for packages as it does for data and the datastore.
    """
    import boto3

    from tabmodel.data import s3_client_options

    return boto3.session.Session().client("s3", **s3_client_options())


# Error codes for a missing object (HEAD returns no body, so only the status)
# and for a failed If-None-Match precondition.
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_PRECONDITION_FAILED = ("412", "PreconditionFailed", "ConditionalRequestConflict")


def _s3_object_exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in _NOT_FOUND:
            return False
        raise
    return True
