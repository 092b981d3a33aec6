"""SageMaker job submission against moto's server mode on 127.0.0.1.

moto (5.2) accepts CreateTrainingJob, stores the request and reports the job
Completed at once, with a model artifact URI but no object behind it, so these
tests check what was submitted, not a training run.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from conftest import free_port, require_service

from tabmodel import sagemaker_training as sm
from tabmodel.train_entry import parse_hyperparameters

BUCKET = "tabmodel-jobs"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/tabmodel-training:1"
ROLE = "arn:aws:iam::123456789012:role/tabmodel-sagemaker"
PARAMS = {"num_layers": 2, "loss": "cross_entropy", "column_embedding": False}


@pytest.fixture(scope="module")
def moto_url():
    """A moto server on 127.0.0.1, stopped after the module's tests."""
    binary = Path(sys.executable).parent / "moto_server"
    require_service("moto_server", binary.is_file(), f"{binary} not found")
    port = free_port()
    process = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto_server did not start on {url}")
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def aws_env(moto_url, monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_SAGEMAKER": moto_url,
        "METAFLOW_S3_ENDPOINT_URL": moto_url,
    }.items():
        monkeypatch.setenv(name, value)
    from tabmodel.packaging import s3_client

    client = s3_client()
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return client


def frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    train = pl.DataFrame(
        {"age": [30.0, 40.0, 50.0], "income": ["<=50K", ">50K", ">50K"]}
    )
    validation = pl.DataFrame({"age": [35.0], "income": ["<=50K"]})
    return train, validation


def config(**overrides) -> sm.SageMakerConfig:
    settings = {
        "image": IMAGE,
        "role_arn": ROLE,
        "s3_prefix": f"s3://{BUCKET}/metaflow",
        "instance_type": "ml.g5.2xlarge",
        "max_run_s": 1800,
        "max_wait_s": 3600,
        "poll_interval_s": 0.1,
    }
    return sm.SageMakerConfig(**{**settings, **overrides})


def submit(job_name: str, **overrides) -> tuple[dict, dict]:
    """Run retrain_on_sagemaker against moto; return its result and the
    job's DescribeTrainingJob response."""
    train, validation = frames()
    prefix = sm.job_prefix(f"s3://{BUCKET}/metaflow", "IncomeFlow", "17", job_name)
    result = sm.retrain_on_sagemaker(
        PARAMS,
        4,
        train,
        validation,
        seed=9,
        run_key="IncomeFlow/17",
        job_name=job_name,
        prefix=prefix,
        config=config(**overrides),
    )
    job = sm.sagemaker_client().describe_training_job(TrainingJobName=job_name)
    return result, job


def test_submitted_job_settings(aws_env):
    result, job = submit("incomeflow-17-0-settings")
    prefix = f"s3://{BUCKET}/metaflow/sagemaker/IncomeFlow/17/incomeflow-17-0-settings"

    algorithm = job["AlgorithmSpecification"]
    assert algorithm["TrainingImage"] == IMAGE
    assert algorithm["ContainerEntrypoint"] == ["python", "-m", "tabmodel.train_entry"]
    assert job["RoleArn"] == ROLE
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 1
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 1800
    assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] == 3600
    assert job["CheckpointConfig"]["S3Uri"] == prefix + "/checkpoints"
    assert job["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert job["OutputDataConfig"]["S3OutputPath"] == prefix + "/output"

    channels = {
        channel["ChannelName"]: channel["DataSource"]["S3DataSource"]["S3Uri"]
        for channel in job["InputDataConfig"]
    }
    assert channels == {
        "train": prefix + "/input/train/",
        "validation": prefix + "/input/validation/",
    }

    assert all(isinstance(value, str) for value in job["HyperParameters"].values())
    hyperparameters = parse_hyperparameters(job["HyperParameters"])
    assert hyperparameters == {**PARAMS, "epochs": 4, "seed": 9, "run": "IncomeFlow/17"}

    assert result["status"] == "Completed"
    assert result["model_uri"] == job["ModelArtifacts"]["S3ModelArtifacts"]
    assert result["model_uri"].startswith(prefix + "/output/")
    assert result["model_uri"].endswith("/model.tar.gz")


def test_channels_written_as_parquet(aws_env):
    submit("incomeflow-17-0-channels")
    key = (
        "metaflow/sagemaker/IncomeFlow/17/incomeflow-17-0-channels/"
        "input/train/part-0.parquet"
    )
    body = aws_env.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert pl.read_parquet(io.BytesIO(body)).equals(frames()[0])


def test_resubmitting_same_job_keeps_input(aws_env):
    submit("incomeflow-17-0-repeat")
    with pytest.raises(FileExistsError, match="never overwritten"):
        submit("incomeflow-17-0-repeat")


def test_on_demand_job_has_no_max_wait(aws_env):
    _, job = submit("incomeflow-17-0-ondemand", spot=False)
    assert job["EnableManagedSpotTraining"] is False
    assert "MaxWaitTimeInSeconds" not in job["StoppingCondition"]


class FakeSageMaker:
    """Returns the given DescribeTrainingJob statuses in order and records stops."""

    def __init__(self, *statuses: str):
        self.statuses = list(statuses)
        self.stopped = []

    def describe_training_job(self, TrainingJobName):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {
            "TrainingJobStatus": status,
            "SecondaryStatus": status,
            "FailureReason": "AlgorithmError: out of memory",
        }

    def stop_training_job(self, TrainingJobName):
        self.stopped.append(TrainingJobName)


def test_wait_polls_until_completed():
    client = FakeSageMaker("InProgress", "InProgress", "Completed")
    sleeps = []
    job = sm.wait_for_training_job(client, "job", 100, 5, sleep=sleeps.append)
    assert job["TrainingJobStatus"] == "Completed"
    assert sleeps == [5, 5]


def test_wait_raises_failure_reason():
    client = FakeSageMaker("InProgress", "Failed")
    with pytest.raises(RuntimeError, match="out of memory"):
        sm.wait_for_training_job(client, "job", 100, 0, sleep=lambda _: None)


def test_wait_timeout_stops_job():
    client = FakeSageMaker("InProgress")
    ticks = iter(range(100))
    with pytest.raises(TimeoutError, match="did not finish within 10 s"):
        sm.wait_for_training_job(
            client, "job", 10, 1, clock=lambda: next(ticks), sleep=lambda _: None
        )
    assert client.stopped == ["job"]


def test_job_name_valid_and_bounded():
    name = sm.training_job_name(
        "IncomeFlow",
        "argo-incomeflow-" + "x" * 80,
        2,
        datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert len(name) <= 63
    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name)
    assert name.endswith("-2-20250102030405")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": ""}, "--training-image is required"),
        ({"role_arn": "tabmodel-role"}, "--sagemaker-role"),
        ({"s3_prefix": ""}, "--sagemaker-bucket"),
        ({"instance_type": "g5.xlarge"}, "--training-instance-type"),
        ({"max_run_s": 7200, "max_wait_s": 3600}, "--sagemaker-max-wait"),
    ],
)
def test_config_rejects_invalid_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides).validate()


def test_s3_prefix_defaults_to_s3_datastore():
    assert sm.resolve_s3_prefix("", "s3://data/metaflow/") == "s3://data/metaflow"
    assert sm.resolve_s3_prefix("jobs", "s3://data/metaflow") == "s3://jobs"
    assert sm.resolve_s3_prefix("", "/home/me/.metaflow") == ""
