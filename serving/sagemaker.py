"""Deploy a model package to a SageMaker real-time endpoint with plain boto3.

One deployment creates a SageMaker model (the run's model.tar.gz plus the
serving image) and an endpoint configuration, both named after the model
version, then creates the endpoint or, when it already exists, updates it to
the new configuration. It waits until the endpoint is InService and sends one
smoke request.

boto3 reads the region, credentials and endpoint URLs from the usual places
(AWS_DEFAULT_REGION, AWS_ENDPOINT_URL and so on), so tests point it at a local
moto server through the environment.
"""

from __future__ import annotations

import json
import logging
import re

log = logging.getLogger(__name__)

DEFAULT_INSTANCE_TYPE = "ml.m5.large"
VARIANT_NAME = "AllTraffic"
# SageMaker resource names: at most 63 characters of [a-zA-Z0-9-], starting
# with an alphanumeric character.
MAX_NAME_CHARS = 63
# The endpoint_in_service waiter polls DescribeEndpoint every WAITER_DELAY_S
# seconds, at most WAITER_MAX_ATTEMPTS times (30 minutes).
WAITER_DELAY_S = 30
WAITER_MAX_ATTEMPTS = 60

SMOKE_CSV = (
    b"39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, "
    b"Not-in-family, White, Male, 2174, 0, 40, United-States\n"
)


def resource_name(*parts: str) -> str:
    """Join `parts` into a valid SageMaker resource name (63 characters max)."""
    name = re.sub(r"[^a-zA-Z0-9-]+", "-", "-".join(parts)).strip("-")
    if not name:
        raise ValueError(f"No valid SageMaker name can be built from {parts!r}.")
    return name[:MAX_NAME_CHARS].rstrip("-")


def deploy_sagemaker(
    model_uri: str,
    endpoint: str,
    version: str,
    *,
    image: str,
    role: str,
    instance_type: str = DEFAULT_INSTANCE_TYPE,
    session=None,
    waiter_delay_s: int = WAITER_DELAY_S,
) -> dict:
    """Deploy the package at `model_uri` (s3://) as `version` of `endpoint`.

    Args:
        image: the serving image URI in ECR.
        role: the IAM role ARN SageMaker assumes to read the model and image.
        session: a boto3 Session; default: a new one from the environment.

    Returns:
        A record of the deployment: endpoint name, model version, the model
        and endpoint configuration names, the operation (create or update) and
        the smoke request's outcome.

    Raises:
        ValueError: a missing image or role, or a model URI that is not on S3.
        FileNotFoundError: no object exists at `model_uri`.
        botocore.exceptions.ClientError: a SageMaker call failed.
        botocore.exceptions.WaiterError: the endpoint did not reach InService.
    """
    _check_arguments(model_uri, image, role)
    if session is None:
        import boto3

        session = boto3.Session()
    _check_model_data(session.client("s3"), model_uri)
    client = session.client("sagemaker")
    endpoint = resource_name(endpoint)
    model_name = resource_name(endpoint, version)
    config_name = resource_name(endpoint, version)

    _create_model(client, model_name, model_uri, image, role)
    _create_endpoint_config(client, config_name, model_name, instance_type)
    operation = _create_or_update_endpoint(client, endpoint, config_name)
    log.info("waiting for endpoint %s to be InService", endpoint)
    client.get_waiter("endpoint_in_service").wait(
        EndpointName=endpoint,
        WaiterConfig={"Delay": waiter_delay_s, "MaxAttempts": WAITER_MAX_ATTEMPTS},
    )
    described = client.describe_endpoint(EndpointName=endpoint)
    return {
        "target": "sagemaker",
        "endpoint_name": endpoint,
        "endpoint_arn": described["EndpointArn"],
        "endpoint_status": described["EndpointStatus"],
        "model_version": version,
        "model_name": model_name,
        "endpoint_config_name": config_name,
        "operation": operation,
        "model_uri": model_uri,
        "image": image,
        "instance_type": instance_type,
        "smoke_test": smoke_test(session.client("sagemaker-runtime"), endpoint),
    }


def _check_arguments(model_uri: str, image: str, role: str) -> None:
    if not model_uri.startswith("s3://"):
        raise ValueError(
            f"SageMaker reads model data from S3, but the model is at {model_uri}. "
            "Run the flow with --datastore=s3 so the package is stored on S3."
        )
    if not image:
        raise ValueError(
            "--serving-image is required for the sagemaker target: the ECR URI "
            "of the image built from Dockerfile.serving."
        )
    if not role:
        raise ValueError(
            "--sagemaker-role is required for the sagemaker target: the ARN of "
            "an IAM role SageMaker can assume."
        )


def _check_model_data(s3, model_uri: str) -> None:
    from botocore.exceptions import ClientError

    bucket, _, key = model_uri[len("s3://") :].partition("/")
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        raise FileNotFoundError(
            f"Model package {model_uri} is not readable: {error}"
        ) from error


def _create_model(client, name: str, model_uri: str, image: str, role: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.create_model(
            ModelName=name,
            ExecutionRoleArn=role,
            PrimaryContainer={
                "Image": image,
                "ModelDataUrl": model_uri,
                "Mode": "SingleModel",
            },
        )
    except ClientError as error:
        if not _already_exists(error):
            raise
        # A redeploy of the same version: the existing model stays in use.
        log.info("SageMaker model %s exists; reusing it", name)
        return
    log.info("created SageMaker model %s from %s", name, model_uri)


def _create_endpoint_config(
    client, name: str, model_name: str, instance_type: str
) -> None:
    from botocore.exceptions import ClientError

    try:
        client.create_endpoint_config(
            EndpointConfigName=name,
            ProductionVariants=[
                {
                    "VariantName": VARIANT_NAME,
                    "ModelName": model_name,
                    "InitialInstanceCount": 1,
                    "InstanceType": instance_type,
                    "InitialVariantWeight": 1.0,
                }
            ],
        )
    except ClientError as error:
        if not _already_exists(error):
            raise
        log.info("endpoint configuration %s exists; reusing it", name)
        return
    log.info("created endpoint configuration %s", name)


def _create_or_update_endpoint(client, endpoint: str, config_name: str) -> str:
    """Point `endpoint` at `config_name`; return "create" or "update"."""
    if _endpoint_exists(client, endpoint):
        client.update_endpoint(EndpointName=endpoint, EndpointConfigName=config_name)
        log.info("updating endpoint %s to configuration %s", endpoint, config_name)
        return "update"
    client.create_endpoint(EndpointName=endpoint, EndpointConfigName=config_name)
    log.info("creating endpoint %s with configuration %s", endpoint, config_name)
    return "create"


def _endpoint_exists(client, endpoint: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.describe_endpoint(EndpointName=endpoint)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ValidationException":
            return False
        raise
    return True


def _already_exists(error) -> bool:
    message = error.response.get("Error", {}).get("Message", "")
    return "already exist" in message.lower()


def smoke_test(runtime, endpoint: str) -> dict:
    """Score one CSV row on `endpoint` and return what came back.

    A botocore error or an unexpected body is logged and recorded instead of
    raised, so the deployment record shows it. moto's
    InvokeEndpoint returns a canned body, which is recorded as `unparsed`.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = runtime.invoke_endpoint(
            EndpointName=endpoint,
            ContentType="text/csv",
            Accept="application/json",
            Body=SMOKE_CSV,
        )
        body = response["Body"].read()
    except (BotoCoreError, ClientError) as error:
        log.error("smoke request to endpoint %s failed: %s", endpoint, error)
        return {"status": "failed", "error": str(error)}
    excerpt = body[:200].decode("utf-8", "replace")
    try:
        predictions = json.loads(body)["predictions"]
        probability = float(predictions[0]["probability"])
    except (ValueError, KeyError, IndexError, TypeError):
        log.warning(
            "smoke request to endpoint %s returned an unexpected body: %r",
            endpoint,
            excerpt,
        )
        return {
            "status": "unparsed",
            "content_type": response.get("ContentType"),
            "body": excerpt,
        }
    log.info("smoke request to endpoint %s: probability %.4f", endpoint, probability)
    return {"status": "ok", "probability": probability, "body": excerpt}
