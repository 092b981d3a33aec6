"""A run that fails at deploy resumes there, reusing tuning and training."""

from __future__ import annotations

import pytest
from conftest import FLOW_FILE

RESUME_RUN = {"sample_rows": 2000, "workers": 2, "trials": 2, "max_epochs": 1}


@pytest.fixture(scope="module")
def failed_and_resumed(session_root, tmp_path_factory):
    """Fail a run at deploy with an unusable endpoint home, fix it, resume."""
    from metaflow import Runner

    broken_home = tmp_path_factory.mktemp("broken") / "not-a-directory"
    broken_home.write_text("a file where the endpoint directory should be\n")
    fixed_home = tmp_path_factory.mktemp("endpoints")
    with Runner(
        str(FLOW_FILE),
        show_output=False,
        cwd=str(session_root),
        env={"TABMODEL_HOME": str(broken_home)},
    ) as runner:
        failed = runner.run(**RESUME_RUN)
        failed_run, failed_output = failed.run, failed.stdout + failed.stderr
    with Runner(
        str(FLOW_FILE),
        show_output=False,
        cwd=str(session_root),
        env={"TABMODEL_HOME": str(fixed_home)},
    ) as runner:
        resumed = runner.resume(origin_run_id=failed_run.id)
        if resumed.status != "successful":
            pytest.fail(
                f"resume failed:\n{resumed.stdout[-3000:]}{resumed.stderr[-3000:]}"
            )
        return failed_run, failed_output, resumed.run, fixed_home


def test_first_run_fails(failed_and_resumed):
    failed_run, _, _, _ = failed_and_resumed
    assert not failed_run.successful


def test_failure_is_at_deploy(failed_and_resumed):
    failed_run, _, _, _ = failed_and_resumed
    assert not failed_run["deploy"].task.successful
    assert failed_run["evaluate"].task.successful


def test_failure_message_names_fix(failed_and_resumed):
    _, output, _, _ = failed_and_resumed
    assert "TABMODEL_HOME" in output
    assert "not a directory" in output


def test_resumed_run_succeeds(failed_and_resumed):
    _, _, resumed_run, _ = failed_and_resumed
    assert resumed_run.successful


@pytest.mark.parametrize(
    "step", ["start", "tune", "join_tuning", "retrain", "evaluate"]
)
def test_finished_steps_are_cloned(failed_and_resumed, step):
    failed_run, _, resumed_run, _ = failed_and_resumed
    for task in resumed_run[step]:
        assert task.origin_pathspec is not None
        assert task.origin_pathspec.startswith(f"IncomeFlow/{failed_run.id}/{step}/")


def test_deploy_runs_again(failed_and_resumed):
    _, _, resumed_run, _ = failed_and_resumed
    assert resumed_run["deploy"].task.origin_pathspec is None


def test_best_params_unchanged(failed_and_resumed):
    failed_run, _, resumed_run, _ = failed_and_resumed
    assert (
        resumed_run.data.best_params == failed_run["join_tuning"].task.data.best_params
    )


def test_resumed_deploy_publishes_model(failed_and_resumed):
    _, _, resumed_run, fixed_home = failed_and_resumed
    current = fixed_home / "endpoints" / "income" / "CURRENT"
    assert current.read_text().strip() == resumed_run.id
