"""The whole flow with Metaflow's S3 datastore on `rclone serve s3` (127.0.0.1).

Metaflow reads its configuration at import, and this test process imported it
with the local datastore, so the client reads run in a subprocess whose
environment points at S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import FLOW_FILE, REPO
from servers import require_rclone, start_s3_server

BUCKET = "tabmodel-test"
SYSROOT = f"s3://{BUCKET}/metaflow"
RUN_SETTINGS = {
    "sample_rows": 2000,
    "workers": 1,
    "trials": 1,
    "max_epochs": 1,
    "deploy_target": "none",
}
RUN_TIMEOUT_S = 600

READ_RUN = textwrap.dedent(
    """
    import json, sys
    from metaflow import Run, namespace

    namespace(None)
    run = Run(sys.argv[1])
    print(json.dumps({
        "successful": run.successful,
        "metrics": run.data.metrics,
        "model_uri": run.data.model_uri,
        "trainer": run.data.trainer,
    }))
    """
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An rclone S3 server with an empty bucket, and the flow's S3 settings."""
    rclone = require_rclone()
    root = tmp_path_factory.mktemp("s3-root")
    with start_s3_server(root, rclone=rclone) as server:
        server.client().create_bucket(Bucket=BUCKET)
        env = {
            **server.env(),
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DATASTORE_SYSROOT_S3": SYSROOT,
        }
        yield server, env, tmp_path_factory.mktemp("flow-cwd")


def run_flow(env: dict, cwd, journal=None, resume_from: str | None = None) -> str:
    """Run the flow on the S3 datastore, or resume `resume_from` at retrain,
    and return the new run's id."""
    from metaflow import Runner

    runner = Runner(
        str(FLOW_FILE), show_output=False, env={**os.environ, **env}, cwd=str(cwd)
    )
    with runner:
        if resume_from:
            result = runner.resume(step_to_rerun="retrain", origin_run_id=resume_from)
        else:
            # A journal file outside the datastore, because the default journal
            # path is derived from a local datastore root.
            result = runner.run(storage=f"journal:{journal}", **RUN_SETTINGS)
        if result.status != "successful":
            pytest.fail(
                f"flow run failed ({result.status}):\n{result.stdout[-4000:]}\n"
                f"{result.stderr[-4000:]}"
            )
        return result.run.id


def read_run(env: dict, cwd, run_id: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", READ_RUN, f"IncomeFlow/{run_id}"],
        cwd=cwd,
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def first_run(s3, tmp_path_factory):
    server, env, cwd = s3
    journal = tmp_path_factory.mktemp("optuna") / "journal.log"
    run_id = run_flow(env, cwd, journal)
    return run_id, read_run(env, cwd, run_id)


def test_client_reads_metrics_from_s3(first_run):
    _, data = first_run
    assert data["successful"]
    assert data["trainer"] == "local"
    assert 0.5 < data["metrics"]["roc_auc"] <= 1.0


def test_model_package_at_run_key(s3, first_run):
    server, _, _ = s3
    run_id, data = first_run
    key = f"metaflow/models/IncomeFlow/{run_id}/model.tar.gz"
    assert data["model_uri"] == f"s3://{BUCKET}/{key}"
    head = server.client().head_object(Bucket=BUCKET, Key=key)
    assert head["ContentLength"] > 0


def test_artifacts_stored_in_bucket(s3, first_run):
    server, _, _ = s3
    listing = server.client().list_objects_v2(
        Bucket=BUCKET, Prefix="metaflow/IncomeFlow/data/", MaxKeys=1
    )
    assert listing.get("KeyCount", 0) > 0


def test_second_run_keeps_first_package(s3, first_run):
    server, env, cwd = s3
    first_id, data = first_run
    client = server.client()
    key = f"metaflow/models/IncomeFlow/{first_id}/model.tar.gz"
    before = client.get_object(Bucket=BUCKET, Key=key)
    before_body = before["Body"].read()

    # Resuming at retrain starts a new run that clones the tuning steps and
    # trains and stores a new package, in half the time of a full run.
    second_id = run_flow(env, cwd, resume_from=first_id)
    second = read_run(env, cwd, second_id)

    assert second_id != first_id
    assert second["model_uri"] == (
        f"s3://{BUCKET}/metaflow/models/IncomeFlow/{second_id}/model.tar.gz"
    )
    after = client.get_object(Bucket=BUCKET, Key=key)
    assert after["ETag"] == before["ETag"]
    assert after["Body"].read() == before_body


def test_store_package_rejects_existing_key(s3, first_run, tmp_path, monkeypatch):
    from tabmodel.packaging import store_package

    server, env, _ = s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run_id, data = first_run
    tarball = tmp_path / "model.tar.gz"
    tarball.write_bytes(b"not a package")
    with pytest.raises(FileExistsError, match="never overwritten"):
        store_package(tarball, data["model_uri"])
    key = f"metaflow/models/IncomeFlow/{run_id}/model.tar.gz"
    body = server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body != b"not a package"
