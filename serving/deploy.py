"""Publish a model package to a deploy target."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from serving import registry

log = logging.getLogger(__name__)


def deploy_package(
    model_uri: str,
    target: str,
    endpoint: str,
    version: str,
    *,
    image: str = "",
    role: str = "",
    instance_type: str = "",
    session=None,
) -> dict:
    """Deploy the package at `model_uri` as `version` of `endpoint`.

    `image`, `role`, `instance_type` and `session` (a boto3 Session) apply to
    the sagemaker target only; see `serving.sagemaker.deploy_sagemaker`.

    Returns:
        A record of the deployment: target, endpoint name and model version.
        A local deploy adds the directory the server reads. A SageMaker deploy
        adds
        the model and endpoint configuration names and the smoke request.
    """
    if target == "none":
        return {"target": "none", "endpoint_name": None, "model_version": None}
    if target == "local":
        return _deploy_local(model_uri, endpoint, version)
    if target == "sagemaker":
        from serving.sagemaker import DEFAULT_INSTANCE_TYPE, deploy_sagemaker

        return deploy_sagemaker(
            model_uri,
            endpoint,
            version,
            image=image,
            role=role,
            instance_type=instance_type or DEFAULT_INSTANCE_TYPE,
            session=session,
        )
    raise ValueError(
        f"Unknown deploy target {target!r}. Expected local, sagemaker or none."
    )


def _deploy_local(model_uri: str, endpoint: str, version: str) -> dict:
    from tabmodel.packaging import fetch_package

    with tempfile.TemporaryDirectory() as work:
        unpacked = fetch_package(model_uri, Path(work) / "package")
        directory = registry.publish(unpacked, endpoint, version)
    return {
        "target": "local",
        "endpoint_name": endpoint,
        "model_version": version,
        "model_directory": str(directory),
        "home": str(registry.home()),
    }


def sample_exchange(model_uri: str, frame, rows: int = 3) -> dict:
    """Score the first `rows` rows of `frame` with the package, as the server would.

    Returns:
        The CSV request body and the JSON response body for those rows.
    """
    import polars as pl

    from serving.parsing import CSV, parse_body
    from serving.predictor import Predictor
    from tabmodel import schema
    from tabmodel.packaging import fetch_package

    sample = frame.head(rows).select(schema.FEATURE_COLUMNS)
    sample = sample.with_columns(
        pl.col(name).fill_null(schema.MISSING) for name in schema.CATEGORICAL_FEATURES
    )
    request = sample.write_csv(include_header=False, float_precision=0).strip()
    with tempfile.TemporaryDirectory() as work:
        predictor = Predictor(fetch_package(model_uri, Path(work) / "package"))
        probabilities = predictor.predict(parse_body(request.encode(), CSV))
        labels = predictor.labels(probabilities)
    predictions = [
        {"probability": round(float(p), 6), "label": label}
        for p, label in zip(probabilities, labels, strict=True)
    ]
    return {"request": request, "response": {"predictions": predictions}}
