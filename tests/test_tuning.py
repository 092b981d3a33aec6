"""Tuning without the flow: search space, storage URLs and credentials, the
retry rules, and workers in separate processes sharing one study.

The storage tests use MariaDB on 127.0.0.1:3306 (user root, no password),
PostgreSQL on 127.0.0.1:5432 (user postgres, trust authentication) and a moto
server on 127.0.0.1 for Secrets Manager. Each test creates its own database
and drops it afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from conftest import REPO, free_port, require_service
from optuna.trial import TrialState

from tabmodel import tuning

HOST = "127.0.0.1"
MYSQL_PORT = 3306
POSTGRES_PORT = 5432
AWS_REGION = "us-east-1"

# A worker process: runs `run_worker` with a trivial objective. argv[1] is the
# WorkerConfig as JSON; each trial sleeps briefly so that workers interleave.
WORKER_SCRIPT = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO)
from tabmodel import tuning

def objective(trial):
    x = trial.suggest_float("x", -10.0, 10.0)
    time.sleep(0.2)
    return -((x - 2.0) ** 2)

config = tuning.WorkerConfig(**json.loads(sys.argv[1]))
print(json.dumps(tuning.run_worker(config, objective)))
"""


# --- Services ----------------------------------------------------------------


def mysql_available() -> tuple[bool, str]:
    """Return whether MariaDB/MySQL accepts root on 127.0.0.1:3306, and why not."""
    import pymysql

    try:
        pymysql.connect(
            host=HOST, port=MYSQL_PORT, user="root", connect_timeout=3
        ).close()
    except pymysql.MySQLError as error:
        return False, f"cannot connect to {HOST}:{MYSQL_PORT} as root: {error}"
    return True, ""


def postgres_available() -> tuple[bool, str]:
    """Return whether PostgreSQL accepts postgres on 127.0.0.1:5432, and why not."""
    import psycopg

    try:
        psycopg.connect(
            host=HOST, port=POSTGRES_PORT, user="postgres", connect_timeout=3
        ).close()
    except psycopg.Error as error:
        return False, f"cannot connect to {HOST}:{POSTGRES_PORT} as postgres: {error}"
    return True, ""


def mysql_execute(*statements: str) -> None:
    """Run statements as MySQL root, outside any database."""
    import pymysql

    connection = pymysql.connect(
        host=HOST, port=MYSQL_PORT, user="root", autocommit=True
    )
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


@contextmanager
def mysql_database() -> Iterator[str]:
    """Create a MySQL database for one test, yield its name, then drop it."""
    require_service("MySQL", *mysql_available())
    name = f"tabmodel_test_{secrets.token_hex(4)}"
    mysql_execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        mysql_execute(f"DROP DATABASE IF EXISTS {name}")


@contextmanager
def mysql_user(database: str) -> Iterator[tuple[str, str]]:
    """Create a MySQL user with a random password and all rights on `database`.

    Yields (user, password). The user exists for both host names a TCP
    connection from 127.0.0.1 can match.
    """
    user = f"tabmodel_{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_hex(12)}"
    hosts = ("localhost", HOST)
    for host in hosts:
        mysql_execute(
            f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'",
            f"GRANT ALL ON {database}.* TO '{user}'@'{host}'",
        )
    try:
        yield user, password
    finally:
        for host in hosts:
            mysql_execute(f"DROP USER IF EXISTS '{user}'@'{host}'")


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create a PostgreSQL database for one test, yield its name, then drop it."""
    import psycopg

    require_service("PostgreSQL", *postgres_available())
    name = f"tabmodel_test_{secrets.token_hex(4)}"
    options = {"host": HOST, "port": POSTGRES_PORT, "user": "postgres"}
    with psycopg.connect(**options, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(**options, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class MotoServer:
    """A `moto_server` process on 127.0.0.1 and the environment boto3 needs."""

    def __init__(self):
        self.port = free_port()
        self.endpoint_url = f"http://{HOST}:{self.port}"
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "moto_server"),
                "-H",
                HOST,
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def env(self) -> dict[str, str]:
        """Return the variables that point boto3's Secrets Manager client here."""
        return {
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": AWS_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(
            f"moto_server not listening on port {self.port} after {timeout} s"
        )

    def create_secret(self, value: dict | str) -> str:
        """Store `value` (JSON-encoded unless a string) and return the secret's ARN."""
        import boto3

        client = boto3.client(
            "secretsmanager",
            endpoint_url=self.endpoint_url,
            region_name=AWS_REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        text = value if isinstance(value, str) else json.dumps(value)
        name = f"tabmodel/test/{secrets.token_hex(4)}"
        return client.create_secret(Name=name, SecretString=text)["ARN"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def moto_server() -> Iterator[MotoServer]:
    """Start a moto server, or end the calling test when moto is missing."""
    binary = Path(sys.executable).parent / "moto_server"
    require_service(
        "moto", binary.exists(), f"{binary} not found: install moto[server]"
    )
    server = MotoServer()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def moto():
    with moto_server() as server:
        yield server


@pytest.fixture
def moto_env(moto, monkeypatch):
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    return moto


def storage_url(kind: str, root: Path, database: str | None) -> str:
    """Return a password-free storage URL of `kind` for one test."""
    if kind == "journal":
        return f"journal:{root / 'journal.log'}"
    if kind == "sqlite":
        return f"sqlite:///{root / 'study.db'}"
    if kind == "mysql":
        return f"mysql+pymysql://root@{HOST}:{MYSQL_PORT}/{database}"
    return f"postgresql://postgres@{HOST}:{POSTGRES_PORT}/{database}"


@pytest.fixture(params=["journal", "sqlite", "mysql", "postgresql"])
def storage(request, tmp_path) -> Iterator[str]:
    """A password-free storage URL of each kind, on a fresh database."""
    if request.param == "mysql":
        with mysql_database() as name:
            yield storage_url("mysql", tmp_path, name)
    elif request.param == "postgresql":
        with postgres_database() as name:
            yield storage_url("postgresql", tmp_path, name)
    else:
        yield storage_url(request.param, tmp_path, None)


def worker_config(
    url: str, worker: int, n_trials: int, **overrides
) -> tuning.WorkerConfig:
    values = {
        "storage_url": url,
        "study_name": "study",
        "worker": worker,
        "n_trials": n_trials,
        "total_trials": 2 * n_trials,
        "max_epochs": 2,
        "seed": 7,
        "run_key": "TestFlow/1",
    }
    values.update(overrides)
    return tuning.WorkerConfig(**values)


def start_worker(
    config: tuning.WorkerConfig, env: dict | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, json.dumps(vars(config))],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def quadratic(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    return -((x - 2.0) ** 2)


# --- Search space -------------------------------------------------------------


def sampled_params(count: int = 200) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = []
    for _ in range(count):
        trial = study.ask()
        samples.append(tuning.suggest_params(trial, max_epochs=12))
        study.tell(trial, 0.0)
    return samples


def test_search_space_alpha_only_with_balancing():
    samples = sampled_params()
    for params in samples:
        balancing = params.get("class_balancing", False)
        assert ("focal_alpha" in params) == balancing, params
    assert any("focal_alpha" in params for params in samples)


def test_search_space_focal_params_only_for_focal():
    samples = sampled_params()
    for params in samples:
        focal = params["loss"] == "focal"
        assert ("focal_gamma" in params) == focal, params
        assert ("class_balancing" in params) == focal, params
    assert {params["loss"] for params in samples} == {"focal", "cross_entropy"}


def test_search_space_one_multiple_per_mlp_layer():
    for params in sampled_params():
        multiples = sorted(key for key in params if key.startswith("mlp_multiple_"))
        expected = [f"mlp_multiple_{i}" for i in range(params["mlp_hidden_layers"])]
        assert multiples == expected


def test_search_space_epochs_within_max():
    for params in sampled_params(50):
        assert 3 <= params["epochs"] <= 12
    trial = optuna.create_study().ask()
    assert tuning.suggest_params(trial, max_epochs=1)["epochs"] == 1


def test_search_space_heads_divide_embedding():
    for params in sampled_params():
        assert params["embedding_dims"] % params["num_heads"] == 0


# --- Storage URLs and credentials -------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "mysql+pymysql://admin:{password}@db.internal:3306/optuna",
        "postgresql://admin:{password}@db.internal/optuna",
        "mysql+pymysql://admin:{password}@db.internal",
    ],
)
def test_password_in_storage_rejected(url):
    password = "s3cret-Value-9"
    with pytest.raises(ValueError) as raised:
        tuning.check_storage_url(url.format(password=password))
    message = str(raised.value)
    assert tuning.PASSWORD_ENV in message
    assert "--storage-secret" in message
    assert password not in message
    assert password not in "".join(traceback.format_exception(raised.value))


def test_unparseable_storage_not_echoed():
    with pytest.raises(ValueError) as raised:
        tuning.check_storage_url("not a url with s3cret-Value-9")
    assert "s3cret-Value-9" not in str(raised.value)
    assert "journal:PATH" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "journal:/tmp/optuna/journal.log",
        "sqlite:///tmp/study.db",
        "mysql+pymysql://admin@db.internal:3306/optuna",
        "postgresql://admin@db.internal/optuna",
        "postgresql+psycopg://admin@db.internal/optuna",
    ],
)
def test_storage_without_password_accepted(url):
    tuning.check_storage_url(url)


def test_redact_hides_password():
    redacted = tuning.redact("mysql+pymysql://admin:s3cret@db.internal/optuna")
    assert "s3cret" not in redacted
    assert redacted == "mysql+pymysql://admin:***@db.internal/optuna"


def test_resolve_adds_env_password(monkeypatch):
    monkeypatch.setenv(tuning.PASSWORD_ENV, "p@ss:word/1")
    url = tuning.resolve_storage_url("mysql+pymysql://admin@db.internal:3306/optuna")
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    assert parsed.password == "p@ss:word/1"
    assert parsed.username == "admin"
    assert parsed.host == "db.internal"
    assert parsed.database == "optuna"


def test_resolve_without_env_password_unchanged(monkeypatch):
    monkeypatch.delenv(tuning.PASSWORD_ENV, raising=False)
    url = "mysql+pymysql://admin@db.internal:3306/optuna"
    assert tuning.resolve_storage_url(url) == url


def test_resolve_journal_ignores_password(monkeypatch):
    monkeypatch.setenv(tuning.PASSWORD_ENV, "unused")
    assert tuning.resolve_storage_url("journal:/tmp/j.log") == "journal:/tmp/j.log"


def test_plain_postgresql_uses_psycopg():
    import importlib.util

    if importlib.util.find_spec("psycopg2"):
        pytest.skip("psycopg2 is installed, so postgresql:// keeps its default driver")
    url = tuning.normalize_storage_url("postgresql://admin@db.internal/optuna")
    assert url == "postgresql+psycopg://admin@db.internal/optuna"


def test_explicit_driver_kept():
    url = "mysql+pymysql://admin@db.internal/optuna"
    assert tuning.normalize_storage_url(url) == url


def test_secret_builds_url(moto_env):
    arn = moto_env.create_secret(
        {
            "username": "admin",
            "password": "from-secret-1",
            "host": "db.internal",
            "port": 3307,
            "dbname": "studies",
        }
    )
    from sqlalchemy.engine import make_url

    url = make_url(tuning.url_from_secret(arn))
    assert url.drivername == "mysql+pymysql"
    assert url.username == "admin"
    assert url.password == "from-secret-1"
    assert url.host == "db.internal"
    assert url.port == 3307
    assert url.database == "studies"


def test_secret_without_host_uses_storage(moto_env):
    arn = moto_env.create_secret({"username": "admin", "password": "from-secret-2"})
    from sqlalchemy.engine import make_url

    url = make_url(
        tuning.resolve_storage_url("postgresql://db.internal:5433/optuna", arn)
    )
    assert url.drivername == "postgresql+psycopg"
    assert url.username == "admin"
    assert url.password == "from-secret-2"
    assert url.host == "db.internal"
    assert url.port == 5433
    assert url.database == "optuna"


def test_secret_overrides_env_password(moto_env, monkeypatch):
    monkeypatch.setenv(tuning.PASSWORD_ENV, "from-env")
    arn = moto_env.create_secret({"username": "admin", "password": "from-secret-3"})
    url = tuning.resolve_storage_url("mysql+pymysql://db.internal/optuna", arn)
    assert "from-secret-3" in url
    assert "from-env" not in url


def test_secret_without_host_or_storage_rejected(moto_env):
    arn = moto_env.create_secret({"username": "admin", "password": "from-secret-4"})
    with pytest.raises(ValueError) as raised:
        tuning.url_from_secret(arn)
    assert "lacks host" in str(raised.value)
    assert "from-secret-4" not in str(raised.value)


def test_secret_without_password_rejected(moto_env):
    arn = moto_env.create_secret({"username": "admin", "host": "db.internal"})
    with pytest.raises(ValueError, match="lacks password"):
        tuning.url_from_secret(arn)


def test_secret_not_json_rejected(moto_env):
    arn = moto_env.create_secret("password=s3cret-Value-9")
    with pytest.raises(ValueError) as raised:
        tuning.url_from_secret(arn)
    assert "not a JSON object" in str(raised.value)
    assert "s3cret-Value-9" not in str(raised.value)


def test_error_with_password_redacted():
    url = "mysql+pymysql://admin:s3cret-Value-9@db.internal/optuna"
    with pytest.raises(tuning.StorageError) as raised:
        with tuning.hide_password_in_errors(url):
            try:
                raise KeyError("connect to " + url)
            except KeyError as error:
                raise RuntimeError("storage failed") from error
    text = "".join(traceback.format_exception(raised.value))
    assert "s3cret-Value-9" not in text
    assert "***" in str(raised.value)
    assert raised.value.__suppress_context__


def test_error_without_password_unchanged():
    url = "mysql+pymysql://admin:s3cret-Value-9@db.internal/optuna"
    with pytest.raises(KeyError):
        with tuning.hide_password_in_errors(url):
            raise KeyError("no credentials here")


def test_heartbeat_settings_from_env(monkeypatch):
    monkeypatch.setenv(tuning.HEARTBEAT_INTERVAL_ENV, "2")
    monkeypatch.setenv(tuning.GRACE_PERIOD_ENV, "5")
    assert tuning.heartbeat_settings() == (2, 5)
    monkeypatch.setenv(tuning.GRACE_PERIOD_ENV, "0")
    with pytest.raises(ValueError, match=tuning.GRACE_PERIOD_ENV):
        tuning.heartbeat_settings()


def test_heartbeat_settings_default(monkeypatch):
    monkeypatch.delenv(tuning.HEARTBEAT_INTERVAL_ENV, raising=False)
    monkeypatch.delenv(tuning.GRACE_PERIOD_ENV, raising=False)
    assert tuning.heartbeat_settings() == (30, 120)


# --- Budget split and seeds ---------------------------------------------------


@pytest.mark.parametrize(
    ("trials", "workers", "expected"),
    [(8, 2, [4, 4]), (7, 3, [3, 2, 2]), (3, 3, [1, 1, 1]), (5, 1, [5])],
)
def test_trials_per_worker_splits(trials, workers, expected):
    assert tuning.trials_per_worker(trials, workers) == expected


@pytest.mark.parametrize(("trials", "workers"), [(2, 3), (4, 0)])
def test_trials_per_worker_rejects(trials, workers):
    with pytest.raises(ValueError, match="--trials must be at least --workers"):
        tuning.trials_per_worker(trials, workers)


@pytest.mark.parametrize(("budget", "expected"), [(2, 2), (8, 2), (20, 5), (100, 10)])
def test_startup_trials_sized_for_budget(budget, expected):
    assert tuning.startup_trials(budget) == expected


def test_sampler_seed_differs_per_worker():
    seeds = {tuning.sampler_seed(42, worker, 0) for worker in range(8)}
    assert len(seeds) == 8
    assert tuning.sampler_seed(42, 1, 0) == tuning.sampler_seed(42, 1, 0)
    assert tuning.sampler_seed(42, 1, 0) != tuning.sampler_seed(42, 1, 3)


# --- Transient errors ---------------------------------------------------------


def dbapi_error(orig: Exception):
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, orig)


@pytest.mark.parametrize("code", [1205, 1213, 2006, 2013])
def test_mysql_transient_codes(code):
    import pymysql

    assert tuning.is_transient(dbapi_error(pymysql.err.OperationalError(code, "x")))


def test_mysql_access_denied_not_transient():
    import pymysql

    error = pymysql.err.OperationalError(1045, "Access denied")
    assert not tuning.is_transient(dbapi_error(error))


@pytest.mark.parametrize("name", ["DeadlockDetected", "SerializationFailure"])
def test_postgres_transient_states(name):
    import psycopg

    assert tuning.is_transient(dbapi_error(getattr(psycopg.errors, name)("x")))


def test_postgres_syntax_error_not_transient():
    import psycopg

    assert not tuning.is_transient(dbapi_error(psycopg.errors.SyntaxError("x")))


def test_sqlite_locked_transient():
    error = sqlite3.OperationalError("database is locked")
    assert tuning.is_transient(dbapi_error(error))


def test_wrapped_transient_detected():
    import pymysql

    try:
        try:
            raise dbapi_error(pymysql.err.OperationalError(1213, "Deadlock found"))
        except Exception as error:
            raise optuna.exceptions.StorageInternalError("commit failed") from error
    except optuna.exceptions.StorageInternalError as wrapped:
        assert tuning.is_transient(wrapped)


def test_plain_error_not_transient():
    assert not tuning.is_transient(ValueError("bad parameter"))


def test_retry_transient_retries(monkeypatch):
    import pymysql

    monkeypatch.setattr(tuning.time, "sleep", lambda seconds: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise dbapi_error(pymysql.err.OperationalError(2013, "Lost connection"))
        return "ok"

    assert tuning.retry_transient(flaky, "test", "sqlite:///x.db") == "ok"
    assert len(calls) == 3


def test_retry_transient_raises_other_errors():
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("bad")

    with pytest.raises(ValueError):
        tuning.retry_transient(broken, "test", "sqlite:///x.db")
    assert len(calls) == 1


def test_lost_mysql_connection_transient():
    """A query on a connection the server killed raises a transient error."""
    import sqlalchemy

    with mysql_database() as name:
        engine = sqlalchemy.create_engine(f"mysql+pymysql://root@{HOST}/{name}")
        try:
            with engine.connect() as connection:
                connection_id = connection.exec_driver_sql(
                    "SELECT CONNECTION_ID()"
                ).scalar()
                mysql_execute(f"KILL {connection_id}")
                with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
                    connection.exec_driver_sql("SELECT 1")
            assert tuning.is_transient(raised.value)
        finally:
            engine.dispose()


# --- Workers on one study -----------------------------------------------------


def test_worker_runs_its_share(tmp_path):
    url = storage_url("sqlite", tmp_path, None)
    tuning.create_study(url, "study")
    counts = tuning.run_worker(worker_config(url, 0, 3), quadratic)
    assert counts == {"complete": 3, "pruned": 0, "fail": 0}
    study = optuna.load_study(study_name="study", storage=url)
    assert len(study.trials) == 3
    for trial in study.trials:
        assert trial.user_attrs["worker"] == 0
        assert trial.user_attrs["run_key"] == "TestFlow/1"


def test_resumed_worker_skips_finished(tmp_path):
    url = storage_url("sqlite", tmp_path, None)
    tuning.create_study(url, "study")
    config = worker_config(url, 0, 3)
    tuning.run_worker(config, quadratic)
    counts = tuning.run_worker(config, quadratic)
    assert counts["complete"] == 3
    assert len(optuna.load_study(study_name="study", storage=url).trials) == 3


def test_warm_start_counts_own_run(tmp_path):
    url = storage_url("sqlite", tmp_path, None)
    tuning.create_study(url, "study")
    tuning.run_worker(worker_config(url, 0, 3, run_key="TestFlow/1"), quadratic)
    tuning.create_study(url, "study")
    tuning.run_worker(worker_config(url, 0, 2, run_key="TestFlow/2"), quadratic)
    study = optuna.load_study(study_name="study", storage=url)
    assert len(study.trials) == 5
    summary = tuning.summarize_study(url, "study", "TestFlow/2")
    assert summary["totals"] == {"complete": 2, "pruned": 0, "fail": 0}
    assert summary["best_value"] == study.best_value
    assert summary["best_trial"] == study.best_trial.number


def test_pruned_trials_counted_not_failed(tmp_path):
    url = storage_url("sqlite", tmp_path, None)
    tuning.create_study(url, "study")

    def pruned(trial):
        trial.suggest_float("x", 0, 1)
        if trial.number % 2:
            raise optuna.TrialPruned()
        return 1.0

    counts = tuning.run_worker(worker_config(url, 0, 4), pruned)
    assert counts == {"complete": 2, "pruned": 2, "fail": 0}


def test_training_error_fails_only_trial(tmp_path):
    url = storage_url("sqlite", tmp_path, None)
    tuning.create_study(url, "study")

    def sometimes_broken(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            raise FloatingPointError("loss is NaN")
        return x

    counts = tuning.run_worker(worker_config(url, 0, 3), sometimes_broken)
    assert counts == {"complete": 2, "pruned": 0, "fail": 1}
    failed = optuna.load_study(study_name="study", storage=url).trials[1]
    assert failed.state == TrialState.FAIL
    assert "FloatingPointError: loss is NaN" in failed.user_attrs["error"]


def test_summary_without_complete_trial_raises(tmp_path):
    url = storage_url("sqlite", tmp_path, None)
    tuning.create_study(url, "study")
    with pytest.raises(RuntimeError, match="No trial of study 'study' completed"):
        tuning.summarize_study(url, "study", "TestFlow/1")


# study.ask() on a storage with heartbeats warns; the test needs a bare running trial.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_orphaned_trials_marked_failed(tmp_path):
    url = storage_url("sqlite", tmp_path, None)
    study = tuning.create_study(url, "study")
    orphan = study.ask()
    orphan.set_user_attr("run_key", "TestFlow/1")
    other_run = study.ask()
    other_run.set_user_attr("run_key", "TestFlow/2")
    assert tuning.fail_orphaned_trials(url, "study", "TestFlow/1") == [orphan.number]
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.RUNNING]


def test_two_processes_share_study(storage):
    """Two worker processes fill one study created once, on every storage kind."""
    tuning.create_study(storage, "study")
    workers = [start_worker(worker_config(storage, worker, 3)) for worker in (0, 1)]
    outputs = [worker.communicate(timeout=180) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
        assert json.loads(stdout.splitlines()[-1]) == {
            "complete": 3,
            "pruned": 0,
            "fail": 0,
        }
    study = optuna.load_study(
        study_name="study", storage=tuning.create_storage(storage)
    )
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    assert all(trial.state == TrialState.COMPLETE for trial in trials)
    assert sorted(trial.user_attrs["worker"] for trial in trials) == [0, 0, 0, 1, 1, 1]
    assert len({trial.number for trial in trials}) == 6


def test_dead_worker_trial_retried(tmp_path):
    """A worker that dies mid-trial leaves a stale trial; the other worker
    marks it failed and runs its re-queued copy."""
    url = storage_url("sqlite", tmp_path, None)
    tuning.create_study(url, "study")
    env = {
        tuning.HEARTBEAT_INTERVAL_ENV: "1",
        tuning.GRACE_PERIOD_ENV: "2",
        tuning.TEST_EXIT_WORKER_ENV: "1",
        tuning.TEST_EXIT_MARKER_ENV: str(tmp_path / "exited"),
    }
    dying = start_worker(worker_config(url, 1, 2), env)
    dying.communicate(timeout=60)
    assert dying.returncode == 17
    surviving = start_worker(worker_config(url, 0, 2), env)
    stdout, stderr = surviving.communicate(timeout=120)
    assert surviving.returncode == 0, stderr[-3000:]
    trials = optuna.load_study(study_name="study", storage=url).get_trials(
        deepcopy=False
    )
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    assert [trial.user_attrs["worker"] for trial in failed] == [1]
    retries = [trial for trial in trials if "failed_trial" in trial.system_attrs]
    assert [trial.system_attrs["failed_trial"] for trial in retries] == [
        failed[0].number
    ]
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["worker"] == 0
    assert json.loads(stdout.splitlines()[-1])["complete"] == 3
    assert "retry of trial" in stderr


def test_env_password_opens_mysql(monkeypatch):
    with mysql_database() as name, mysql_user(name) as (user, password):
        url = f"mysql+pymysql://{user}@{HOST}:{MYSQL_PORT}/{name}"
        tuning.check_storage_url(url)
        monkeypatch.setenv(tuning.PASSWORD_ENV, password)
        study = tuning.create_study(tuning.resolve_storage_url(url), "study")
        study.optimize(quadratic, n_trials=2)
        assert len(study.trials) == 2


def test_wrong_password_not_in_error(monkeypatch):
    with mysql_database() as name, mysql_user(name) as (user, _):
        url = f"mysql+pymysql://{user}@{HOST}:{MYSQL_PORT}/{name}"
        monkeypatch.setenv(tuning.PASSWORD_ENV, "wrong-Password-77")
        with pytest.raises(Exception) as raised:
            tuning.create_study(tuning.resolve_storage_url(url), "study")
        text = "".join(traceback.format_exception(raised.value))
        assert "wrong-Password-77" not in text
        assert "Access denied" in text


def test_secret_opens_mysql(moto_env):
    """The plain URL names host and database; the secret contains the credentials."""
    with mysql_database() as name, mysql_user(name) as (user, password):
        arn = moto_env.create_secret({"username": user, "password": password})
        url = f"mysql+pymysql://{HOST}:{MYSQL_PORT}/{name}"
        study = tuning.create_study(tuning.resolve_storage_url(url, arn), "study")
        study.optimize(quadratic, n_trials=1)
        assert len(study.trials) == 1
