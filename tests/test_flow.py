"""The whole flow on the real data with small settings, then its endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import SMALL_RUN, post

from tabmodel import tuning
from tabmodel.data import read_raw


def test_run_succeeds(small_run):
    assert small_run.successful


def test_latest_successful_run_is_small_run(small_run):
    from metaflow import Flow

    assert Flow("IncomeFlow").latest_successful_run.id == small_run.id


@pytest.mark.parametrize("name", ["accuracy", "roc_auc", "pr_auc", "log_loss"])
def test_metrics_have_key(small_run, name):
    assert name in small_run.data.metrics


def test_test_roc_auc_above_080(small_run):
    assert small_run.data.metrics["roc_auc"] > 0.80


def test_baseline_metrics_recorded(small_run):
    assert small_run.data.baseline_metrics["roc_auc"] > 0.80


def test_model_uri_is_existing_tarball(small_run):
    path = Path(small_run.data.model_uri)
    assert path.name == "model.tar.gz"
    assert path.is_file()


def test_model_uri_contains_run_id(small_run):
    assert f"/IncomeFlow/{small_run.id}/" in small_run.data.model_uri


def test_trials_of_two_workers_in_one_study(small_run):
    data = small_run["start"].task.data
    storage = tuning.create_storage(data.storage_url)
    study = optuna.load_study(study_name=data.study_name_used, storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == SMALL_RUN["trials"]
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}


def test_finished_trials_equal_budget(small_run):
    totals = small_run.data.trial_totals
    assert totals["complete"] + totals["pruned"] == SMALL_RUN["trials"]


def test_best_params_from_study(small_run):
    assert "learning_rate" in small_run.data.best_params


def test_split_keeps_test_file_whole(small_run):
    counts = small_run.data.split_counts
    assert counts["test"] == 16281
    assert counts["train"] + counts["validation"] == SMALL_RUN["sample_rows"]


def test_deploy_records_version(small_run):
    assert small_run.data.model_version == small_run.id


def _test_rows(count: int) -> bytes:
    lines = read_raw("bundled", "adult.test").content.decode().splitlines()
    rows = [line.rsplit(",", 1)[0] for line in lines[1 : 1 + count]]
    return ("\n".join(rows) + "\n").encode()


def test_server_scores_three_test_rows(deployed_server):
    status, _, body = post(
        deployed_server.url + "/invocations", _test_rows(3), "text/csv"
    )
    assert status == 200
    predictions = json.loads(body)["predictions"]
    assert len(predictions) == 3
    for prediction in predictions:
        assert 0.0 <= prediction["probability"] <= 1.0


def test_server_serves_deployed_version(deployed_server, small_run):
    status, headers, _ = post(
        deployed_server.url + "/invocations", _test_rows(1), "text/csv"
    )
    assert status == 200
    assert headers["x-model-version"] == small_run.id


def test_storage_password_rejected_before_run(tmp_path):
    import subprocess
    import sys

    from conftest import FLOW_FILE

    completed = subprocess.run(
        [
            sys.executable,
            str(FLOW_FILE),
            "run",
            "--storage",
            "mysql+pymysql://root:hunter2@127.0.0.1/optuna",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert "TABMODEL_STORAGE_PASSWORD" in completed.stderr
    assert "hunter2" not in completed.stderr + completed.stdout
    assert not (tmp_path / ".metaflow").exists()
