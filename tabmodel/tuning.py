"""Hyperparameter search with Optuna: one study shared by parallel workers.

The study lives in a storage every worker can reach: a journal file for local
runs, or SQLite, MySQL or PostgreSQL (Aurora MySQL in the cloud). The flow
creates storage and study once, before the fan-out, because several processes
creating the tables at once race and fail.

Passwords never travel in `--storage`: they come from the environment variable
TABMODEL_STORAGE_PASSWORD or from a Secrets Manager secret, are added to the
URL only in memory, and are removed from the messages of errors raised here.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import (
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

log = logging.getLogger(__name__)

JOURNAL_SCHEME = "journal:"
PASSWORD_ENV = "TABMODEL_STORAGE_PASSWORD"
# The metric each trial maximises: PR AUC on the validation split.
OBJECTIVE_METRIC = "val_pr_auc"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
COUNTED_STATES = ("complete", "pruned", "fail")

# Seconds between heartbeats of a running trial, and how long a trial may go
# without one before another worker marks it failed and re-queues it. Only the
# SQL storages have heartbeats. The environment variables shorten them in tests.
HEARTBEAT_INTERVAL = 30
GRACE_PERIOD = 120
HEARTBEAT_INTERVAL_ENV = "TABMODEL_HEARTBEAT_INTERVAL"
GRACE_PERIOD_ENV = "TABMODEL_GRACE_PERIOD"
# How often a trial whose worker died is re-queued before it stays failed.
MAX_TRIAL_RETRIES = 2
# Seconds a worker that finished its share waits for other workers' running
# trials, so that it can re-run those whose worker dies, and seconds between
# its checks for stale or re-queued trials.
MAX_WAIT_FOR_OTHERS = 3600
WAIT_POLL_SECONDS = 2
# Attempts for storage calls that fail with a transient error; the delay
# doubles from 1 s, plus up to 1 s of jitter.
STORAGE_ATTEMPTS = 5
# Age in seconds after which the pool replaces a connection, so connections
# rarely outlive a server's or proxy's idle timeout; pre-ping catches the rest.
POOL_RECYCLE = 280

# MySQL/MariaDB error codes worth retrying: lock wait timeout (1205), deadlock
# (1213), can't connect (2003), server gone away (2006), connection lost during
# a query (2013, 2055).
TRANSIENT_MYSQL_ERRORS = frozenset({1205, 1213, 2003, 2006, 2013, 2055})
# PostgreSQL SQLSTATE codes worth retrying: serialization failure, deadlock,
# lock not available, server shutting down, and class 08 (connection errors).
TRANSIENT_POSTGRES_STATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P03"})

# Test hook that simulates a worker dying mid-trial. The worker whose id is in
# TABMODEL_TEST_EXIT_WORKER calls os._exit in its trial number
# TABMODEL_TEST_EXIT_AFTER (counted from 0 in this process, default 0). It
# fires only while the file TABMODEL_TEST_EXIT_MARKER does not exist, and
# creates that file, so it fires once per marker.
TEST_EXIT_WORKER_ENV = "TABMODEL_TEST_EXIT_WORKER"
TEST_EXIT_AFTER_ENV = "TABMODEL_TEST_EXIT_AFTER"
TEST_EXIT_MARKER_ENV = "TABMODEL_TEST_EXIT_MARKER"


# Trials this process started, for the test hook.
_trials_started = itertools.count()


class StorageError(RuntimeError):
    """A storage error whose message had the database password removed."""


class TrialError(RuntimeError):
    """Training failed for one configuration, so the trial fails and the worker
    goes on."""


def suggest_params(trial: optuna.Trial, max_epochs: int) -> dict:
    """Sample one configuration; conditional parameters only when they matter.

    This function is the whole search space. `mlp_multiple_<i>` exists for
    each hidden MLP layer, the focal loss parameters only for the focal loss,
    and `focal_alpha` only with class balancing on, because Keras' focal loss
    ignores alpha otherwise.
    """
    params = {
        "num_layers": trial.suggest_int("num_layers", 1, 4),
        "embedding_dims": trial.suggest_categorical("embedding_dims", [8, 16, 32]),
        "num_heads": trial.suggest_categorical("num_heads", [1, 2, 4, 8]),
        "transformer_dropout": trial.suggest_float("transformer_dropout", 0.0, 0.3),
        "mlp_hidden_layers": trial.suggest_int("mlp_hidden_layers", 1, 3),
    }
    for index in range(params["mlp_hidden_layers"]):
        params[f"mlp_multiple_{index}"] = trial.suggest_categorical(
            f"mlp_multiple_{index}", [1, 2, 4]
        )
    params["mlp_dropout"] = trial.suggest_float("mlp_dropout", 0.0, 0.4)
    params["numeric_embedding"] = trial.suggest_categorical(
        "numeric_embedding", ["piecewise_linear", "linear"]
    )
    if params["numeric_embedding"] == "piecewise_linear":
        params["numeric_bins"] = trial.suggest_categorical("numeric_bins", [8, 16, 32])
    params["loss"] = trial.suggest_categorical("loss", ["focal", "cross_entropy"])
    if params["loss"] == "focal":
        params["focal_gamma"] = trial.suggest_float("focal_gamma", 0.5, 4.0)
        params["class_balancing"] = trial.suggest_categorical(
            "class_balancing", [False, True]
        )
        if params["class_balancing"]:
            params["focal_alpha"] = trial.suggest_float("focal_alpha", 0.1, 0.9)
    params["learning_rate"] = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    params["beta_1"] = trial.suggest_float("beta_1", 0.8, 0.95)
    params["beta_2"] = trial.suggest_float("beta_2", 0.98, 0.9999)
    params["epsilon"] = trial.suggest_float("epsilon", 1e-8, 1e-5, log=True)
    params["clipnorm"] = trial.suggest_float("clipnorm", 0.5, 5.0)
    params["batch_size"] = trial.suggest_categorical("batch_size", [256, 512])
    params["epochs"] = trial.suggest_int("epochs", min(3, max_epochs), max_epochs)
    return params


def enqueue_default_trial(study: optuna.Study, max_epochs: int) -> bool:
    """Queue the package's default configuration as the first trial of a new study.

    The default (`tabmodel.training.DEFAULT_PARAMS`) measured well on the full
    data, so the search never ends below it. A study that already has trials
    (a warm start) is left alone.

    Returns:
        Whether a trial was queued.
    """
    from tabmodel.training import DEFAULT_PARAMS

    if study.get_trials(deepcopy=False):
        return False
    searched = {k: v for k, v in DEFAULT_PARAMS.items() if k != "column_embedding"}
    searched["epochs"] = min(int(searched["epochs"]), max_epochs)
    study.enqueue_trial(searched)
    return True


# --- Storage URLs and credentials -------------------------------------------


def default_storage_url(root: str | os.PathLike) -> str:
    """Return a journal-file storage URL that local processes can share.

    The file lives under the local datastore `root`. With an S3 datastore it
    lives under `TABMODEL_HOME` (default `~/.tabmodel`) instead, which only
    tasks on this machine reach: runs on AWS Batch need `--storage` or
    `--storage-secret`.
    """
    if str(root).startswith("s3://"):
        home = Path(os.environ.get("TABMODEL_HOME") or Path.home() / ".tabmodel")
        log.warning(
            "no --storage given with an S3 datastore: using a journal file under "
            "%s, which only tasks on this machine can reach",
            home,
        )
        root = home
    path = Path(root).resolve() / "optuna" / "journal.log"
    return f"{JOURNAL_SCHEME}{path}"


def check_storage_url(url: str) -> None:
    """Reject a storage URL that carries a password or cannot be parsed.

    Metaflow keeps every Parameter value as an artifact, so a password in
    `--storage` would be stored in plain text.

    Raises:
        ValueError: the URL contains a password or is not a storage URL. The
            message never contains the password.
    """
    if url.startswith(JOURNAL_SCHEME):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        # The URL is not echoed: an unparseable URL may still hold a password.
        raise ValueError(
            "Invalid --storage URL. Expected journal:PATH, sqlite:///PATH, "
            "mysql+pymysql://USER@HOST:PORT/DB or postgresql://USER@HOST:PORT/DB."
        ) from None
    if parsed.password is not None:
        raise ValueError(
            f"--storage must not contain a password (received {redact(url)}). "
            f"Remove it from the URL and set the environment variable "
            f"{PASSWORD_ENV}, or pass --storage-secret with a Secrets Manager "
            "secret id."
        )


def reject_password_in_arguments(arguments: list[str]) -> None:
    """Exit with status 2 when a `--storage` command-line value has a password.

    Call it before Metaflow parses the arguments, because Metaflow stores
    Parameter values as artifacts as soon as a run starts.
    """
    for index, argument in enumerate(arguments):
        value = None
        if argument.startswith("--storage="):
            value = argument.split("=", 1)[1]
        elif argument == "--storage" and index + 1 < len(arguments):
            value = arguments[index + 1]
        if value is None:
            continue
        try:
            check_storage_url(value)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None


def redact(url: str) -> str:
    """Return `url` with any password replaced by asterisks."""
    if url.startswith(JOURNAL_SCHEME):
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable storage URL>"


def normalize_storage_url(url: str) -> str:
    """Return `url` with plain `postgresql://` mapped to the psycopg 3 driver.

    SQLAlchemy 2.0 maps `postgresql://` to psycopg2, which this project does
    not install; SQLAlchemy 2.1 already maps it to psycopg. Other URLs are
    returned unchanged.
    """
    if url.startswith(JOURNAL_SCHEME):
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername != "postgresql" or importlib.util.find_spec("psycopg2"):
        return url
    return parsed.set(drivername="postgresql+psycopg").render_as_string(
        hide_password=False
    )


def url_from_secret(secret_id: str, base_url: str = "") -> str:
    """Build a database URL from a Secrets Manager secret in the RDS format.

    A secret RDS manages for a cluster holds only username and password, so
    host, port and database come from the secret when present and otherwise
    from `base_url` (the `--storage` URL without a password), whose driver is
    kept. The endpoint follows boto3's configuration, so
    `AWS_ENDPOINT_URL_SECRETS_MANAGER` points it at an emulator.

    Raises:
        ValueError: the secret is not JSON, lacks credentials, or nothing
            names the host.
    """
    import boto3
    from sqlalchemy.engine import URL, make_url

    client = boto3.client("secretsmanager")
    secret_string = client.get_secret_value(SecretId=secret_id)["SecretString"]
    try:
        secret = json.loads(secret_string)
    except json.JSONDecodeError:
        secret = None
    if not isinstance(secret, dict):
        raise ValueError(
            f"Secret {secret_id} is not a JSON object. Expected the JSON RDS uses: "
            '{"username": ..., "password": ..., "host": ..., "port": ..., '
            '"dbname": ...}.'
        ) from None
    base = (
        make_url(base_url)
        if base_url and not base_url.startswith(JOURNAL_SCHEME)
        else None
    )
    missing = [key for key in ("username", "password") if key not in secret]
    host = secret.get("host") or (base.host if base else None)
    if not host:
        missing.append("host")
    if missing:
        raise ValueError(
            f"Secret {secret_id} lacks {', '.join(missing)}. Expected the JSON RDS "
            "uses (username, password, host, port, dbname); pass the host in "
            "--storage, e.g. mysql+pymysql://HOST:3306/optuna, if the secret has none."
        )
    url = URL.create(
        base.drivername if base else "mysql+pymysql",
        username=secret["username"],
        password=secret["password"],
        host=host,
        port=int(secret.get("port") or (base.port if base and base.port else 3306)),
        database=secret.get("dbname") or (base.database if base else None) or "optuna",
    )
    return normalize_storage_url(url.render_as_string(hide_password=False))


def resolve_storage_url(url: str, secret_id: str | None = None) -> str:
    """Return the URL to connect with, the password filled in at run time.

    The password comes from the secret `secret_id` when given, otherwise from
    the environment variable TABMODEL_STORAGE_PASSWORD. The result may
    contain a password: pass it to `create_storage` and never log it or keep
    it as an artifact.
    """
    if secret_id:
        return url_from_secret(secret_id, url)
    password = os.environ.get(PASSWORD_ENV)
    if url.startswith(JOURNAL_SCHEME) or not password:
        return normalize_storage_url(url)
    from sqlalchemy.engine import make_url

    with_password = make_url(url).set(password=password)
    return normalize_storage_url(with_password.render_as_string(hide_password=False))


def _password_of(url: str) -> str | None:
    if url.startswith(JOURNAL_SCHEME):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password or None
    except ArgumentError:
        return None


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _safe_message(error: BaseException, password: str | None) -> str:
    """Return `error`'s type and message with `password` replaced by ***."""
    message = f"{type(error).__name__}: {error}"
    if password:
        message = message.replace(password, "***")
    return message


@contextlib.contextmanager
def hide_password_in_errors(url: str) -> Iterator[None]:
    """Re-raise errors that mention the password of `url` as `StorageError`.

    Drivers and SQLAlchemy may put the connection URL into a message. The
    replacement drops the original exception and its chain, because Metaflow
    prints and stores a caught exception with its chain.
    """
    password = _password_of(url)
    try:
        yield
    except Exception as error:
        if not password or not any(
            password in f"{link} {link!r}" for link in _error_chain(error)
        ):
            raise
        message = "; caused by ".join(
            _safe_message(link, password) for link in _error_chain(error)
        )
        raise StorageError(message) from None


# --- Storage and study -------------------------------------------------------


def heartbeat_settings() -> tuple[int, int]:
    """Return (heartbeat interval, grace period) in seconds.

    TABMODEL_HEARTBEAT_INTERVAL and TABMODEL_GRACE_PERIOD override the
    defaults of 30 s and 120 s.

    Raises:
        ValueError: an override is not a positive integer.
    """
    settings = []
    for name, default in (
        (HEARTBEAT_INTERVAL_ENV, HEARTBEAT_INTERVAL),
        (GRACE_PERIOD_ENV, GRACE_PERIOD),
    ):
        raw = os.environ.get(name, "")
        try:
            value = int(raw) if raw else default
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{name} must be a positive integer. Received: {raw!r}")
        settings.append(value)
    return settings[0], settings[1]


def create_storage(
    url: str, *, create_tables: bool = True
) -> optuna.storages.BaseStorage:
    """Open the storage at `url` (journal file or SQLAlchemy URL).

    SQL storages get pooled connections with pre-ping and recycling, and
    heartbeats: a trial without a heartbeat for the grace period is marked
    failed by the next worker that starts a trial, and re-queued up to
    MAX_TRIAL_RETRIES times. Pass `create_tables=False` where another process
    has created the tables, because concurrent creation races.
    """
    with hide_password_in_errors(url):
        if url.startswith(JOURNAL_SCHEME):
            path = Path(url[len(JOURNAL_SCHEME) :])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        url = normalize_storage_url(url)
        engine_kwargs = {}
        if not url.startswith("sqlite"):
            # Pre-ping and recycling replace connections the server closed
            # while a long trial ran (wait_timeout, proxies' idle timeouts).
            engine_kwargs = {"pool_pre_ping": True, "pool_recycle": POOL_RECYCLE}
        interval, grace = heartbeat_settings()
        with _quiet_experimental_warnings():
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=RequeueStaleTrials(
                    max_retry=MAX_TRIAL_RETRIES
                ),
                skip_table_creation=not create_tables,
            )


@contextlib.contextmanager
def _quiet_experimental_warnings() -> Iterator[None]:
    # Heartbeats, the retry callback and TPE's `group` option are marked
    # experimental in Optuna 5.1, and this module uses them on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def create_study(url: str, study_name: str) -> optuna.Study:
    """Create the storage's tables and the study, or load the study when it
    exists (a warm start). Transient database errors are retried."""

    def create() -> optuna.Study:
        return optuna.create_study(
            storage=create_storage(url),
            study_name=study_name,
            direction="maximize",
            load_if_exists=True,
        )

    return retry_transient(create, "create study", url)


def is_transient(error: BaseException) -> bool:
    """Return whether `error`, or an error it was raised from, is worth retrying.

    Transient errors are deadlocks, lock wait timeouts, lost or refused connections
    (MySQL, PostgreSQL), "database is locked" (SQLite), and any connection
    SQLAlchemy invalidated. Optuna wraps SQLAlchemy errors in
    `StorageInternalError`, so the whole chain is checked.
    """
    from sqlalchemy.exc import DBAPIError

    for link in _error_chain(error):
        if not isinstance(link, DBAPIError):
            continue
        if link.connection_invalidated:
            return True
        orig = link.orig
        args = getattr(orig, "args", ())
        if args and args[0] in TRANSIENT_MYSQL_ERRORS:
            return True
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if state and (state in TRANSIENT_POSTGRES_STATES or state.startswith("08")):
            return True
        if "database is locked" in str(orig):
            return True
    return False


def retry_transient(function: Callable, operation: str, url: str, worker: int = -1):
    """Call `function`, retrying transient database errors with backoff.

    Raises:
        StorageError: the error mentions the storage password.
        Exception: any other error, or a transient one after STORAGE_ATTEMPTS.
    """
    password = _password_of(url)
    with hide_password_in_errors(url):
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return function()
            except Exception as error:
                if not is_transient(error) or attempt == STORAGE_ATTEMPTS - 1:
                    raise
                delay = 2**attempt + random.random()
                log.warning(
                    "worker %d: %s failed with a transient storage error, "
                    "retry %d of %d in %.1f s: %s",
                    worker,
                    operation,
                    attempt + 1,
                    STORAGE_ATTEMPTS - 1,
                    delay,
                    _safe_message(error, password),
                )
                time.sleep(delay)


# --- Workers -----------------------------------------------------------------


def trials_per_worker(trials: int, workers: int) -> list[int]:
    """Split `trials` among `workers` as evenly as possible."""
    if workers < 1 or trials < workers:
        raise ValueError(
            f"--trials must be at least --workers, and --workers at least 1. "
            f"Received: trials={trials}, workers={workers}"
        )
    return [trials // workers + (i < trials % workers) for i in range(workers)]


def startup_trials(total_trials: int) -> int:
    """Return TPE's random start-up count: a quarter of the budget, 2 to 10."""
    return max(2, min(10, total_trials // 4))


def sampler_seed(seed: int, worker: int, finished: int) -> int:
    """Return the TPE seed of one worker.

    Each worker gets its own seed, so the parallel workers' random start-up
    trials differ. A worker that resumes with some trials finished gets
    another seed, so it does not repeat the configurations it already ran.
    """
    return random.Random(f"{seed}/{worker}/{finished}").randrange(2**31)


@dataclass
class WorkerConfig:
    """Everything one tuning worker needs, apart from the data."""

    storage_url: str
    study_name: str
    worker: int
    n_trials: int
    total_trials: int
    max_epochs: int
    seed: int
    run_key: str
    # Number of workers in the run. With it, a worker that finished its share
    # also waits for workers that have not started all of theirs; 0 waits only
    # for running trials.
    workers: int = 0


Objective = Callable[[optuna.Trial], float]


def create_pruning_callback(trial: optuna.Trial, monitor: str = OBJECTIVE_METRIC):
    """Return a Keras callback that reports `monitor` to Optuna each epoch.

    When the pruner decides to prune, the callback stops training and records the
    epoch in its `pruned_epoch` attribute, so the objective can raise
    `optuna.TrialPruned`.
    """
    import keras

    class OptunaPruning(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.pruned_epoch = None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(monitor)
            if value is None:
                return
            trial.report(float(value), epoch)
            if trial.should_prune():
                self.pruned_epoch = epoch
                self.model.stop_training = True

    return OptunaPruning()


def training_objective(config: WorkerConfig, train, validation) -> Objective:
    """Return the objective that trains one TabTransformer per trial and
    returns its best validation PR AUC."""

    def objective(trial: optuna.Trial) -> float:
        from tabmodel.training import (
            accuracy_threshold,
            label_array,
            predict_probabilities,
            train_model,
        )

        params = suggest_params(trial, config.max_epochs)
        pruning = create_pruning_callback(trial)
        result = train_model(
            params,
            train,
            validation,
            seed=config.seed + trial.number,
            callbacks=[pruning],
        )
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("val_roc_auc", max(result.history["val_roc_auc"]))
        if pruning.pruned_epoch is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_epoch + 1}")
        probabilities = predict_probabilities(result.model, validation)
        trial.set_user_attr(
            "threshold", accuracy_threshold(label_array(validation), probabilities)
        )
        return float(max(result.history[OBJECTIVE_METRIC]))

    return objective


def log_finished_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Log one compact line per finished trial."""
    try:
        best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "none yet"
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    retried = trial.system_attrs.get("failed_trial")
    log.info(
        "trial %d worker %s: %s %s in %.0f s%s, best %s",
        trial.number,
        trial.user_attrs.get("worker", "?"),
        trial.state.name.lower(),
        value,
        seconds,
        "" if retried is None else f" (retry of trial {retried})",
        best,
    )


def run_worker(
    config: WorkerConfig, objective: Objective, on_trial: Callable | None = None
) -> dict:
    """Run this worker's share of trials on the shared study, then wait for the
    other workers and make up the trials of those that died.

    `on_trial(study, trial)` is called after each of this worker's trials, as
    Optuna calls its callbacks. Trials this worker already finished in this
    run (a resumed task) are not run again. A configuration whose training
    raises fails its trial, and the worker goes on. Transient database
    errors are retried with backoff.

    Returns:
        Counts of this worker's trials in this run by state (complete,
        pruned, fail).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = config.storage_url
    storage = retry_transient(
        lambda: create_storage(url, create_tables=False), "open storage", url
    )
    with hide_password_in_errors(url):
        done = _attempted_by_worker(storage, config)
        if done:
            log.info(
                "worker %d: %d trials already finished, %d left",
                config.worker,
                done,
                max(0, config.n_trials - done),
            )
        for attempt in range(STORAGE_ATTEMPTS):
            remaining = config.n_trials - done
            if remaining <= 0:
                break
            try:
                study = _load_study(storage, config, done)
                study.optimize(
                    _tagged(objective, config),
                    n_trials=remaining,
                    catch=(TrialError,),
                    callbacks=[log_finished_trial, *([on_trial] if on_trial else [])],
                    gc_after_trial=True,
                )
                break
            except Exception as error:
                if not is_transient(error) or attempt == STORAGE_ATTEMPTS - 1:
                    raise
                delay = 2**attempt + random.random()
                log.warning(
                    "worker %d: transient storage error, retry %d of %d in %.1f s: %s",
                    config.worker,
                    attempt + 1,
                    STORAGE_ATTEMPTS - 1,
                    delay,
                    _safe_message(error, _password_of(url)),
                )
                time.sleep(delay)
                done = retry_transient(
                    lambda: _attempted_by_worker(storage, config),
                    "count trials",
                    url,
                    config.worker,
                )
        retry_transient(
            lambda: _rerun_stale_trials(storage, config, objective),
            "re-run stale trials",
            url,
            config.worker,
        )
        return retry_transient(
            lambda: worker_counts(storage, config), "count trials", url, config.worker
        )


def _load_study(storage, config: WorkerConfig, finished: int) -> optuna.Study:
    with _quiet_experimental_warnings():
        sampler = optuna.samplers.TPESampler(
            seed=sampler_seed(config.seed, config.worker, finished),
            n_startup_trials=startup_trials(config.total_trials),
            multivariate=True,
            group=True,
            # Running trials of other workers count as their worst value, so
            # parallel workers spread out instead of sampling the same region.
            constant_liar=True,
        )
    # Early epochs rank configurations poorly (a low learning rate starts slow),
    # so the pruner compares trials only from the fifth epoch on, and only once
    # three trials have finished.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=4)
    return optuna.load_study(
        study_name=config.study_name, storage=storage, sampler=sampler, pruner=pruner
    )


def _tagged(objective: Objective, config: WorkerConfig) -> Objective:
    """Wrap `objective`: tag each trial with worker and run, and turn training
    errors into `TrialError` so that only the trial fails."""

    def run_trial(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", config.worker)
        trial.set_user_attr("run_key", config.run_key)
        _exit_for_test(config.worker)
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            if is_transient(error):
                raise
            message = _safe_message(error, _password_of(config.storage_url))
            log.exception(
                "trial %d worker %d: training failed", trial.number, config.worker
            )
            trial.set_user_attr("error", message[:500])
            raise TrialError(message) from None

    return run_trial


def _exit_for_test(worker: int) -> None:
    started = next(_trials_started)
    target = os.environ.get(TEST_EXIT_WORKER_ENV)
    marker = os.environ.get(TEST_EXIT_MARKER_ENV)
    if target is None or marker is None or int(target) != worker:
        return
    if started != int(os.environ.get(TEST_EXIT_AFTER_ENV) or 0):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    # Wait past the first heartbeat: a trial without one is never stale.
    interval, _ = heartbeat_settings()
    time.sleep(interval + 1)
    log.warning("worker %d: exiting mid-trial for a test (%s)", worker, marker)
    logging.shutdown()
    os._exit(17)


class RequeueStaleTrials(RetryHeartbeatStaleTrialCallback):
    """Re-queue a stale trial, as the parent class does, and count the
    re-queued trials of this process in `requeued`.

    Optuna calls the callback only in the process that marked the trial
    failed, so each stale trial is counted by one worker.
    """

    def __init__(self, max_retry: int | None = None):
        super().__init__(max_retry=max_retry)
        self.requeued: list[int] = []

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        super().__call__(study, trial)
        after = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if after > before:
            self.requeued.append(trial.number)
        log.warning(
            "trial %d of worker %s had no heartbeat for the grace period: "
            "marked failed, %s",
            trial.number,
            trial.user_attrs.get("worker", "?"),
            "re-queued" if after > before else "retries exhausted",
        )


def _rerun_stale_trials(storage, config: WorkerConfig, objective: Objective) -> None:
    """Wait for other workers' running trials and for workers that still have
    trials to start, and run one more trial for each stale trial this worker
    re-queued.

    A trial whose heartbeat is older than the grace period belongs to a worker
    that died. The worker that marks it failed re-queues a copy and runs one
    trial more than its share: the copy, or a new trial when another worker
    took the copy. So the dead worker's trial is made up once. With
    `config.workers` set, the wait also spans the moment between two trials of
    another worker, so a worker that dies in its last trial is covered too,
    unless every worker with trials left runs nothing for the grace period.
    Journal storage has no heartbeats, so there the worker returns at once.
    """
    if not isinstance(storage, RDBStorage):
        return
    callback = storage.get_heartbeat_stale_trial_callback()
    if not isinstance(callback, RequeueStaleTrials):
        return
    deadline = time.monotonic() + MAX_WAIT_FOR_OTHERS
    _, grace_period = heartbeat_settings()
    idle_deadline = time.monotonic() + grace_period
    study = _load_study(storage, config, config.n_trials)
    made_up = 0
    while True:
        with _quiet_experimental_warnings():
            optuna.storages.fail_stale_trials(study)
        owed = len(callback.requeued) - made_up
        if owed > 0:
            log.info("worker %d: running %d re-queued trials", config.worker, owed)
            made_up += owed
            study.optimize(
                _tagged(objective, config),
                n_trials=owed,
                catch=(TrialError,),
                callbacks=[log_finished_trial],
                gc_after_trial=True,
            )
            continue
        run_trials = _run_trials(study, config.run_key)
        running = [t.number for t in run_trials if t.state == TrialState.RUNNING]
        pending = _workers_with_unstarted_trials(run_trials, config)
        if not running and not pending:
            return
        if running:
            idle_deadline = time.monotonic() + grace_period
        elif time.monotonic() > idle_deadline:
            # Workers with trials left ran nothing for the grace period, so
            # they died between trials and no worker will run their trials.
            log.warning(
                "worker %d: workers %s ran no trial for %d s; stopped waiting",
                config.worker,
                pending,
                grace_period,
            )
            return
        if time.monotonic() > deadline:
            # NOTE: a trial whose worker died before its first heartbeat is
            # never marked stale, so the wait needs this limit.
            log.warning(
                "worker %d: stopped waiting after %d s for running trials %s",
                config.worker,
                MAX_WAIT_FOR_OTHERS,
                running,
            )
            return
        time.sleep(WAIT_POLL_SECONDS)


def _workers_with_unstarted_trials(run_trials: list, config: WorkerConfig) -> list:
    """Return the workers that have started fewer trials than their share."""
    if not config.workers:
        return []
    started = collections.Counter(t.user_attrs.get("worker") for t in run_trials)
    shares = trials_per_worker(config.total_trials, config.workers)
    return [w for w, share in enumerate(shares) if started[w] < share]


def _attempted_by_worker(storage, config: WorkerConfig) -> int:
    """Count this worker's trials in this run that used up budget: finished
    ones, and failed ones whose training raised. Trials failed by a lost
    connection or a dead worker do not count, so they are made up."""
    study = optuna.load_study(study_name=config.study_name, storage=storage)
    count = 0
    for trial in _run_trials(study, config.run_key):
        if trial.user_attrs.get("worker") != config.worker:
            continue
        if trial.state in FINISHED_STATES or (
            trial.state == TrialState.FAIL and "error" in trial.user_attrs
        ):
            count += 1
    return count


def _run_trials(study: optuna.Study, run_key: str) -> list:
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.user_attrs.get("run_key") == run_key
    ]


def worker_counts(storage, config: WorkerConfig) -> dict:
    """Count this worker's trials in this run by state."""
    study = optuna.load_study(study_name=config.study_name, storage=storage)
    counts = dict.fromkeys(COUNTED_STATES, 0)
    for trial in _run_trials(study, config.run_key):
        state = trial.state.name.lower()
        if trial.user_attrs.get("worker") == config.worker and state in counts:
            counts[state] += 1
    return counts


# --- Results -----------------------------------------------------------------


def fail_orphaned_trials(url: str, study_name: str, run_key: str) -> list[int]:
    """Mark this run's trials that are still running as failed.

    Call this only after every worker of the run ended: a trial still running
    then belongs to a worker that died, and no other worker will finish it.

    Returns:
        The numbers of the trials marked failed.
    """

    def fail() -> list[int]:
        storage = create_storage(url, create_tables=False)
        study = optuna.load_study(study_name=study_name, storage=storage)
        failed = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("run_key") != run_key:
                continue
            try:
                storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            failed.append(trial.number)
        return failed

    failed = retry_transient(fail, "fail orphaned trials", url)
    if failed:
        log.warning("marked trials %s failed: their worker ended", failed)
    return failed


def load_study(url: str, study_name: str) -> optuna.Study:
    """Load an existing study without creating tables."""
    with hide_password_in_errors(url):
        return optuna.load_study(
            study_name=study_name, storage=create_storage(url, create_tables=False)
        )


def summarize_study(url: str, study_name: str, run_key: str) -> dict:
    """Summarise the study: best trial, and trial counts per worker and state.

    Counts cover this run's trials (`run_key`). The best trial is the best of
    the whole study, which includes earlier runs' trials on a warm start.

    Raises:
        RuntimeError: no trial in the study completed.
    """
    study = retry_transient(
        lambda: optuna.load_study(
            study_name=study_name, storage=create_storage(url, create_tables=False)
        ),
        "load study",
        url,
    )
    with hide_password_in_errors(url):
        return _summarize(study, study_name, run_key)


def _summarize(study: optuna.Study, study_name: str, run_key: str) -> dict:
    per_worker: dict[str, dict[str, int]] = {}
    history = []
    for trial in _run_trials(study, run_key):
        worker = str(trial.user_attrs.get("worker", "?"))
        counts = per_worker.setdefault(worker, dict.fromkeys(COUNTED_STATES, 0))
        state = trial.state.name.lower()
        if state in counts:
            counts[state] += 1
        history.append(
            {
                "number": trial.number,
                "worker": worker,
                "state": state,
                "value": trial.value,
                "retry_of": trial.system_attrs.get("failed_trial"),
            }
        )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(
            f"No trial of study {study_name!r} completed, so there is no best "
            "configuration. Check the tuning workers' logs, then resume the run."
        )
    best = study.best_trial
    return {
        "best_params": dict(best.params),
        "best_value": float(best.value),
        "best_trial": best.number,
        "best_epoch": int(
            best.user_attrs.get("best_epoch", best.params.get("epochs", 1))
        ),
        "best_threshold": float(best.user_attrs.get("threshold", 0.5)),
        "per_worker": per_worker,
        "history": history,
        "totals": {
            state: sum(counts[state] for counts in per_worker.values())
            for state in COUNTED_STATES
        },
    }
