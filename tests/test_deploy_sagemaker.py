"""`--deploy-target sagemaker` against moto's server mode on 127.0.0.1.

moto accepts any image URI and role and marks endpoints InService at once.
Its InvokeEndpoint returns a canned body, so the smoke request is recorded as
unparsed. moto 5.2.5 does not implement UpdateEndpoint (it returns HTTP 500),
so the second-deploy test checks the request the deployer sends and marks the
rest as an expected failure until moto supports it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, require_service

from serving.deploy import deploy_package

pytestmark = pytest.mark.service

REGION = "us-east-1"
BUCKET = "tabmodel-models"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/tabmodel-serving:test"
ROLE = "arn:aws:iam::123456789012:role/tabmodel-sagemaker"
STARTUP_TIMEOUT_S = 30


def _moto_command(port: int) -> list[str]:
    binary = Path(sys.executable).with_name("moto_server")
    if binary.exists():
        return [str(binary), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_listening(url: str, process: subprocess.Popen) -> str | None:
    """Return None once moto responds, else the reason it is not available."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"moto_server exited with code {process.returncode}"
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                return None
        except urllib.error.HTTPError:
            return None
        except OSError:
            time.sleep(0.2)
    return f"moto_server did not answer within {STARTUP_TIMEOUT_S} s"


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    """A moto server on a free port, with boto3 pointed at it by environment."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log_file:
        try:
            process = subprocess.Popen(
                _moto_command(port), stdout=log_file, stderr=subprocess.STDOUT
            )
        except OSError as error:
            require_service("moto", False, f"cannot start moto_server: {error}")
    reason = _wait_listening(url, process)
    if reason:
        process.kill()
        process.wait()
        require_service("moto", False, f"{reason}; log: {log_path}")
    settings = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _session():
    import boto3

    return boto3.Session(region_name=REGION)


def _upload_package(session, key: str) -> str:
    """Upload a small stand-in model.tar.gz to moto's S3 and return its URI."""
    s3 = session.client("s3")
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        content = b'{"threshold": 0.5}'
        info = tarfile.TarInfo("metadata.json")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    s3.put_object(Bucket=BUCKET, Key=key, Body=buffer.getvalue())
    return f"s3://{BUCKET}/{key}"


def _deploy(session, model_uri: str, endpoint: str, version: str) -> dict:
    return deploy_package(
        model_uri,
        "sagemaker",
        endpoint,
        version,
        image=IMAGE,
        role=ROLE,
        instance_type="ml.m5.large",
        session=session,
    )


def test_sagemaker_deploy_creates_resources(moto_url):
    session = _session()
    model_uri = _upload_package(session, "models/IncomeFlow/101/model.tar.gz")

    record = _deploy(session, model_uri, "income-create", "101")

    sagemaker = session.client("sagemaker")
    model = sagemaker.describe_model(ModelName=record["model_name"])
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == model_uri
    assert model["ExecutionRoleArn"] == ROLE
    config = sagemaker.describe_endpoint_config(
        EndpointConfigName=record["endpoint_config_name"]
    )
    variant = config["ProductionVariants"][0]
    assert variant["ModelName"] == record["model_name"]
    assert variant["InstanceType"] == "ml.m5.large"
    assert variant["InitialInstanceCount"] == 1
    endpoint = sagemaker.describe_endpoint(EndpointName="income-create")
    assert endpoint["EndpointConfigName"] == record["endpoint_config_name"]
    assert endpoint["EndpointStatus"] == "InService"
    assert record["endpoint_name"] == "income-create"
    assert record["model_version"] == "101"
    assert record["operation"] == "create"
    # moto's InvokeEndpoint returns a canned body, not predictions.
    assert record["smoke_test"]["status"] in ("ok", "unparsed")


def test_sagemaker_names_unique_per_version(moto_url):
    session = _session()
    first = _deploy(
        session, _upload_package(session, "models/a/1/model.tar.gz"), "income-a", "1"
    )
    second = _deploy(
        session, _upload_package(session, "models/a/2/model.tar.gz"), "income-b", "2"
    )
    assert first["endpoint_config_name"] != second["endpoint_config_name"]
    assert first["model_name"] != second["model_name"]


def test_sagemaker_second_deploy_updates(moto_url):
    from botocore.exceptions import ClientError

    session = _session()
    sent = []
    session.events.register(
        "provide-client-params.sagemaker.*",
        lambda model, params, **_: sent.append((model.name, dict(params))),
    )
    first_uri = _upload_package(session, "models/IncomeFlow/201/model.tar.gz")
    second_uri = _upload_package(session, "models/IncomeFlow/202/model.tar.gz")
    first = _deploy(session, first_uri, "income-update", "201")
    assert first["operation"] == "create"
    sent.clear()

    try:
        second = _deploy(session, second_uri, "income-update", "202")
    except ClientError as error:
        operations = [name for name, _ in sent]
        assert "CreateEndpoint" not in operations
        update = [params for name, params in sent if name == "UpdateEndpoint"]
        assert update, f"no UpdateEndpoint request sent; sent: {operations}"
        assert update[0]["EndpointName"] == "income-update"
        assert update[0]["EndpointConfigName"] != first["endpoint_config_name"]
        status = error.response["ResponseMetadata"].get("HTTPStatusCode")
        pytest.xfail(f"moto does not implement UpdateEndpoint (HTTP {status})")

    assert second["operation"] == "update"
    endpoint = session.client("sagemaker").describe_endpoint(
        EndpointName="income-update"
    )
    assert endpoint["EndpointConfigName"] == second["endpoint_config_name"]


def test_sagemaker_rejects_local_model_uri(tmp_path):
    with pytest.raises(ValueError, match="--datastore=s3"):
        deploy_package(
            str(tmp_path / "model.tar.gz"),
            "sagemaker",
            "income",
            "1",
            image=IMAGE,
            role=ROLE,
        )


def test_sagemaker_requires_image_and_role():
    with pytest.raises(ValueError, match="--serving-image"):
        deploy_package(
            "s3://bucket/model.tar.gz", "sagemaker", "income", "1", role=ROLE
        )
    with pytest.raises(ValueError, match="--sagemaker-role"):
        deploy_package(
            "s3://bucket/model.tar.gz", "sagemaker", "income", "1", image=IMAGE
        )


def test_sagemaker_missing_model_data(moto_url):
    session = _session()
    s3 = session.client("s3")
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    with pytest.raises(FileNotFoundError, match="not readable"):
        _deploy(session, f"s3://{BUCKET}/absent/model.tar.gz", "income-missing", "1")
