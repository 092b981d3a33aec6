"""A real flow run whose tuning workers share one Optuna study in MariaDB.

One small run serves every test here, to keep the file near 5 minutes on 2
CPU cores: three workers whose credentials come from a Secrets Manager secret
on a local moto server (host and database from `--storage`). Worker 0 exits
mid-trial in its second trial through the test hook in `tabmodel.tuning`, and
short heartbeats let another worker re-run that trial.

The run needs MariaDB on 127.0.0.1:3306 (root, no password): the tests fail in
CI without it and are skipped otherwise. The plain `mysql+pymysql://` URL and
the TABMODEL_STORAGE_PASSWORD path are tested without a flow in
test_tuning.py.
"""

from __future__ import annotations

import gzip
import os
import re
import tempfile
from pathlib import Path

import optuna
import pytest
from conftest import FLOW_FILE, require_service
from optuna.trial import TrialState
from test_tuning import (
    HOST,
    MYSQL_PORT,
    moto_server,
    mysql_available,
    mysql_database,
    mysql_user,
)

from tabmodel import tuning

pytestmark = pytest.mark.service

RUN = {
    "sample_rows": 2000,
    "max_epochs": 1,
    "deploy_target": "none",
    "workers": 3,
    "trials": 4,
}
# Worker 0 has a share of 2 trials and dies in its second one.
DYING_WORKER = 0


def root_url(database: str) -> str:
    return f"mysql+pymysql://root@{HOST}:{MYSQL_PORT}/{database}"


@pytest.fixture(scope="module")
def tuning_run():
    """Run the flow once; yield (run, stdout + stderr, password, trials)."""
    from metaflow import Runner

    require_service("MySQL", *mysql_available())
    with (
        mysql_database() as database,
        mysql_user(database) as (user, password),
        moto_server() as moto,
        tempfile.TemporaryDirectory() as work,
    ):
        arn = moto.create_secret({"username": user, "password": password})
        env = {
            **moto.env(),
            tuning.PASSWORD_ENV: "",
            tuning.HEARTBEAT_INTERVAL_ENV: "1",
            tuning.GRACE_PERIOD_ENV: "3",
            tuning.TEST_EXIT_WORKER_ENV: str(DYING_WORKER),
            tuning.TEST_EXIT_AFTER_ENV: "1",
            tuning.TEST_EXIT_MARKER_ENV: str(Path(work) / "exited"),
        }
        with Runner(str(FLOW_FILE), show_output=False, env=env) as runner:
            result = runner.run(
                storage=f"mysql+pymysql://{HOST}:{MYSQL_PORT}/{database}",
                storage_secret=arn,
                **RUN,
            )
            output = result.stdout + result.stderr
            if result.status != "successful":
                pytest.fail(f"flow run failed ({result.status}):\n{output[-8000:]}")
            run = result.run
        # Root reads the study before the database is dropped.
        storage = tuning.create_storage(root_url(database), create_tables=False)
        name = run["start"].task.data.study_name_used
        study = optuna.load_study(study_name=name, storage=storage)
        yield run, output, password, study.get_trials(deepcopy=False)


def finished(trials) -> list:
    return [trial for trial in trials if trial.state in tuning.FINISHED_STATES]


def test_run_succeeds(tuning_run):
    run, _, _, _ = tuning_run
    assert run.successful


def test_finished_trials_equal_budget(tuning_run):
    _, _, _, trials = tuning_run
    assert len(finished(trials)) == RUN["trials"]


def test_one_study_holds_every_trial(tuning_run):
    """The budget, plus the one trial the dead worker left failed."""
    _, _, _, trials = tuning_run
    assert len(trials) == RUN["trials"] + 1
    assert len({trial.number for trial in trials}) == len(trials)


def test_all_workers_finished_trials(tuning_run):
    _, _, _, trials = tuning_run
    workers = {trial.user_attrs["worker"] for trial in finished(trials)}
    assert workers == set(range(RUN["workers"]))


def test_trials_carry_run_key(tuning_run):
    run, _, _, trials = tuning_run
    run_key = run["start"].task.data.run_key
    assert run_key == f"IncomeFlow/{run.id}"
    assert {trial.user_attrs["run_key"] for trial in trials} == {run_key}


def test_best_params_from_study(tuning_run):
    run, _, _, trials = tuning_run
    join = run["join_tuning"].task.data
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    best = max(complete, key=lambda trial: trial.value)
    assert join.best_trial == best.number
    assert join.best_params == best.params


def test_dead_worker_trial_failed(tuning_run):
    _, _, _, trials = tuning_run
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    assert len(failed) == 1
    assert failed[0].user_attrs["worker"] == DYING_WORKER


def test_dead_worker_trial_retried(tuning_run):
    _, _, _, trials = tuning_run
    failed = next(trial for trial in trials if trial.state == TrialState.FAIL)
    retries = [trial for trial in trials if "failed_trial" in trial.system_attrs]
    assert len(retries) == 1
    assert retries[0].system_attrs["failed_trial"] == failed.number
    assert retries[0].state in tuning.FINISHED_STATES
    assert retries[0].user_attrs["worker"] != DYING_WORKER


def test_join_counts_trials(tuning_run):
    run, _, _, _ = tuning_run
    join = run["join_tuning"].task.data
    totals = join.trial_totals
    assert totals["complete"] + totals["pruned"] == RUN["trials"]
    assert totals["fail"] == 1
    assert sorted(join.trial_counts) == ["0", "1", "2"]
    assert join.trial_counts[str(DYING_WORKER)]["fail"] == 1
    assert join.orphaned_trials == []


def test_join_records_dead_worker(tuning_run):
    run, _, _, _ = tuning_run
    join = run["join_tuning"].task.data
    assert list(join.worker_errors) == [str(DYING_WORKER)]


def test_dead_worker_task_caught(tuning_run):
    run, _, _, _ = tuning_run
    tasks = {task.index: task for task in run["tune"]}
    assert sorted(tasks) == [0, 1, 2]
    assert tasks[DYING_WORKER].data.tune_error is not None
    assert "worker_counts" not in tasks[DYING_WORKER]
    for worker in (1, 2):
        assert tasks[worker].data.tune_error is None


def test_start_keeps_no_password(tuning_run):
    run, _, password, _ = tuning_run
    start = run["start"].task.data
    assert password not in start.storage_url
    assert start.storage_secret.startswith("arn:aws:secretsmanager:")


def test_output_hides_password(tuning_run):
    _, output, password, _ = tuning_run
    assert password not in output
    assert "credentials from secret" in output


def test_datastore_hides_password(tuning_run):
    """No artifact or stored log of the session's runs contains the password."""
    _, _, password, _ = tuning_run
    root = Path(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"]) / ".metaflow"
    needle = password.encode()
    checked = 0
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        content = path.read_bytes()
        if content[:2] == b"\x1f\x8b":
            content = gzip.decompress(content)
        assert needle not in content, path
        checked += 1
    assert checked > 0


def test_one_log_line_per_trial(tuning_run):
    _, output, _, trials = tuning_run
    pattern = re.compile(r"tabmodel\.tuning: trial \d+ worker \d+: (complete|pruned) ")
    lines = [line for line in output.splitlines() if pattern.search(line)]
    assert len(lines) == len(finished(trials))
