"""Retrain the best configuration as a SageMaker training job.

`retrain_on_sagemaker` writes the train and validation splits to S3 as
parquet and submits a job that runs `python -m tabmodel.train_entry` in the
training image (docker/Dockerfile.training). It waits for the job and returns
the model artifact, SageMaker's `model.tar.gz` of /opt/ml/model. The entry
point writes a model package there, so `fetch_package` reads the artifact.

Jobs use managed spot training by default, with a checkpoint S3 URI, so a
replaced spot instance resumes from the last finished epoch.

The job is one `CreateTrainingJob` call through boto3. AWS_ENDPOINT_URL_SAGEMAKER
and METAFLOW_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) point the clients at other
endpoints.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from tabmodel.packaging import upload_bytes_s3
from tabmodel.train_entry import encode_hyperparameters

log = logging.getLogger(__name__)

TRAINERS = ("local", "sagemaker")
ENTRY_POINT = ["python", "-m", "tabmodel.train_entry"]
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CHANNELS = ("train", "validation")
TERMINAL_STATUSES = ("Completed", "Failed", "Stopped")
# SageMaker training job names: 1 to 63 letters, digits and single hyphens.
JOB_NAME_MAX_LENGTH = 63
# Time allowed beyond the job's stopping condition for provisioning, image
# download and the model upload, which the stopping condition does not count.
WAIT_MARGIN_S = 900


@dataclass(frozen=True)
class SageMakerConfig:
    """Settings of the training job; times in seconds."""

    image: str
    role_arn: str
    s3_prefix: str
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    volume_size_gb: int = 30
    spot: bool = True
    max_run_s: int = 3600
    max_wait_s: int = 5400
    poll_interval_s: float = 30.0

    def validate(self) -> None:
        """Check the settings before anything is uploaded.

        Raises:
            ValueError: naming the flow parameter, the value and the fix.
        """
        if not self.image:
            raise ValueError(
                "--training-image is required with --trainer sagemaker: the ECR "
                "URI of the image built from docker/Dockerfile.training."
            )
        if not self.role_arn.startswith("arn:"):
            raise ValueError(
                "--sagemaker-role must be the ARN of the job's IAM execution role. "
                f"Received: {self.role_arn!r}"
            )
        if not self.s3_prefix.startswith("s3://"):
            raise ValueError(
                "SageMaker needs an S3 location for the job's data: pass "
                "--sagemaker-bucket or use the S3 datastore. "
                f"Received: {self.s3_prefix!r}"
            )
        if not self.instance_type.startswith("ml."):
            raise ValueError(
                "--training-instance-type must be a SageMaker instance type such "
                f"as ml.g5.xlarge. Received: {self.instance_type!r}"
            )
        if self.max_run_s < 1:
            raise ValueError(
                f"--sagemaker-max-run must be 1 or more. Received: {self.max_run_s}"
            )
        if self.spot and self.max_wait_s < self.max_run_s:
            raise ValueError(
                f"--sagemaker-max-wait ({self.max_wait_s}) must be at least "
                f"--sagemaker-max-run ({self.max_run_s}) for spot training."
            )

    def wait_timeout_s(self) -> int:
        """Return how long to wait for the job before stopping it."""
        limit = self.max_wait_s if self.spot else self.max_run_s
        return limit + WAIT_MARGIN_S


def resolve_s3_prefix(sagemaker_bucket: str, datastore_root: str) -> str:
    """Return the S3 prefix for job files: `--sagemaker-bucket` (a bucket name
    or an s3:// URI) or else the datastore root when it is on S3, or "" when
    neither is set."""
    if sagemaker_bucket:
        if sagemaker_bucket.startswith("s3://"):
            return sagemaker_bucket.rstrip("/")
        return f"s3://{sagemaker_bucket.strip('/')}"
    if datastore_root.startswith("s3://"):
        return datastore_root.rstrip("/")
    return ""


def training_job_name(
    flow_name: str, run_id: str, attempt: int, now: datetime | None = None
) -> str:
    """Return a job name unique per run, step attempt and second.

    The flow and run part is cut to fit, so the attempt and UTC time stay.
    """
    now = now or datetime.now(UTC)
    suffix = f"-{attempt}-{now:%Y%m%d%H%M%S}"
    base = re.sub(r"[^A-Za-z0-9]+", "-", f"{flow_name}-{run_id}").strip("-")
    return base[: JOB_NAME_MAX_LENGTH - len(suffix)].rstrip("-") + suffix


def job_prefix(s3_prefix: str, flow_name: str, run_id: str, job_name: str) -> str:
    """Return the S3 prefix of one job's input, checkpoints and output."""
    return f"{s3_prefix.rstrip('/')}/sagemaker/{flow_name}/{run_id}/{job_name}"


def write_channels(frames: dict[str, pl.DataFrame], prefix: str) -> dict[str, str]:
    """Upload each frame as `<prefix>/input/<channel>/part-0.parquet`.

    Returns:
        The S3 prefix of each channel, as the job's InputDataConfig takes it.
    """
    channels = {}
    for channel, frame in frames.items():
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        channel_prefix = f"{prefix}/input/{channel}/"
        upload_bytes_s3(buffer.getvalue(), channel_prefix + "part-0.parquet")
        channels[channel] = channel_prefix
    return channels


def training_job_request(
    job_name: str,
    config: SageMakerConfig,
    channels: dict[str, str],
    hyperparameters: dict[str, str],
    prefix: str,
    tags: dict[str, str] | None = None,
) -> dict:
    """Build the CreateTrainingJob request for the training image's entry point."""
    stopping = {"MaxRuntimeInSeconds": int(config.max_run_s)}
    if config.spot:
        stopping["MaxWaitTimeInSeconds"] = int(config.max_wait_s)
    return {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {
            "TrainingImage": config.image,
            "TrainingInputMode": "File",
            "ContainerEntrypoint": list(ENTRY_POINT),
        },
        "RoleArn": config.role_arn,
        "HyperParameters": hyperparameters,
        "InputDataConfig": [
            {
                "ChannelName": channel,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "ContentType": "application/x-parquet",
                "InputMode": "File",
            }
            for channel, uri in channels.items()
        ],
        "OutputDataConfig": {"S3OutputPath": f"{prefix}/output"},
        "ResourceConfig": {
            "InstanceType": config.instance_type,
            "InstanceCount": int(config.instance_count),
            "VolumeSizeInGB": int(config.volume_size_gb),
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": bool(config.spot),
        "CheckpointConfig": {
            "S3Uri": f"{prefix}/checkpoints",
            "LocalPath": CHECKPOINT_LOCAL_PATH,
        },
        "Environment": {"TF_CPP_MIN_LOG_LEVEL": "2"},
        "Tags": [{"Key": key, "Value": value} for key, value in (tags or {}).items()],
    }


def wait_for_training_job(
    client,
    job_name: str,
    timeout_s: float,
    poll_interval_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll DescribeTrainingJob until the job completes.

    Logs each new secondary status. On timeout the job is stopped, so it does
    not run on after the step gives up.

    Returns:
        The last DescribeTrainingJob response, with status Completed.

    Raises:
        RuntimeError: the job failed or was stopped; the message has the reason.
        TimeoutError: the job did not finish within `timeout_s`.
    """
    deadline = clock() + timeout_s
    last_status = None
    while True:
        job = client.describe_training_job(TrainingJobName=job_name)
        status = job["TrainingJobStatus"]
        secondary = job.get("SecondaryStatus")
        if (status, secondary) != last_status:
            log.info("training job %s: %s (%s)", job_name, status, secondary)
            last_status = (status, secondary)
        if status == "Completed":
            return job
        if status in TERMINAL_STATUSES:
            raise RuntimeError(
                f"SageMaker training job {job_name} ended with status {status}: "
                f"{job.get('FailureReason', 'no failure reason given')}. "
                "Its logs are in CloudWatch under /aws/sagemaker/TrainingJobs."
            )
        if clock() >= deadline:
            log.error(
                "training job %s timed out after %s s; stopping it", job_name, timeout_s
            )
            client.stop_training_job(TrainingJobName=job_name)
            raise TimeoutError(
                f"SageMaker training job {job_name} did not finish within "
                f"{timeout_s} s (status {status}); it was stopped."
            )
        sleep(poll_interval_s)


def sagemaker_client():
    """Create a boto3 SageMaker client (AWS_ENDPOINT_URL_SAGEMAKER applies)."""
    import boto3

    return boto3.client("sagemaker")


def retrain_on_sagemaker(
    best_params: dict,
    epochs: int,
    train: pl.DataFrame,
    validation: pl.DataFrame,
    *,
    seed: int,
    run_key: str,
    job_name: str,
    prefix: str,
    config: SageMakerConfig,
    client=None,
) -> dict:
    """Upload the splits, run the training job and wait for it.

    Returns:
        `job_name`, `job_arn`, `model_uri` (the job's model.tar.gz), `status`,
        `billable_seconds` and `training_seconds` (None where SageMaker reports
        none), `spot` and the `hyperparameters` sent.
    """
    config.validate()
    client = client or sagemaker_client()
    channels = write_channels({"train": train, "validation": validation}, prefix)
    hyperparameters = encode_hyperparameters(
        {**best_params, "epochs": int(epochs), "seed": int(seed), "run": run_key}
    )
    request = training_job_request(
        job_name, config, channels, hyperparameters, prefix, tags={"run": run_key}
    )
    arn = client.create_training_job(**request)["TrainingJobArn"]
    log.info(
        "submitted training job %s (%s, spot %s) with input %s",
        job_name,
        config.instance_type,
        config.spot,
        prefix,
    )
    job = wait_for_training_job(
        client, job_name, config.wait_timeout_s(), config.poll_interval_s
    )
    return {
        "job_name": job_name,
        "job_arn": arn,
        "model_uri": job["ModelArtifacts"]["S3ModelArtifacts"],
        "status": job["TrainingJobStatus"],
        "billable_seconds": job.get("BillableTimeInSeconds"),
        "training_seconds": job.get("TrainingTimeInSeconds"),
        "spot": config.spot,
        "hyperparameters": hyperparameters,
    }
