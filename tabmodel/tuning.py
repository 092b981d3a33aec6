"""Hyperparameter search with Optuna: one study shared by parallel workers.

The study lives in a storage every worker can reach: a journal file for local
runs, or MySQL/PostgreSQL (Aurora MySQL in the cloud). The flow creates storage
and study once, before the fan-out, because several processes creating the
tables at once race and fail.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

log = logging.getLogger(__name__)

JOURNAL_SCHEME = "journal:"
PASSWORD_ENV = "TABMODEL_STORAGE_PASSWORD"
# The metric each trial maximises: PR AUC on the validation split.
OBJECTIVE_METRIC = "val_pr_auc"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# Seconds between heartbeats of a running trial, and how long a trial may go
# without one before another worker marks it failed and re-queues it.
HEARTBEAT_INTERVAL = 30
GRACE_PERIOD = 120
MAX_TRIAL_RETRIES = 2
# MySQL error codes worth retrying: deadlock, lock wait timeout, server gone
# away, connection lost during a query.
TRANSIENT_MYSQL_ERRORS = (1205, 1213, 2006, 2013)


def suggest_params(trial: optuna.Trial, max_epochs: int) -> dict:
    """Sample one configuration; conditional parameters only when they matter.

    This function is the whole search space.
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
    params["loss"] = trial.suggest_categorical("loss", ["focal", "cross_entropy"])
    if params["loss"] == "focal":
        params["focal_gamma"] = trial.suggest_float("focal_gamma", 0.5, 4.0)
        params["class_balancing"] = trial.suggest_categorical(
            "class_balancing", [False, True]
        )
        # Keras applies alpha only with class balancing on.
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


def default_storage_url(root: str | os.PathLike) -> str:
    """Return a journal-file storage URL under `root`, safe for local processes."""
    path = Path(root).resolve() / "optuna" / "journal.log"
    return f"{JOURNAL_SCHEME}{path}"


def check_storage_url(url: str) -> None:
    """Reject a storage URL that carries a password.

    Metaflow keeps every Parameter value as an artifact, so a password in
    `--storage` would be stored in plain text.

    Raises:
        ValueError: the URL contains a password or is not a storage URL.
    """
    if url.startswith(JOURNAL_SCHEME):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ValueError(
            f"Invalid --storage URL {url!r}. Expected journal:PATH, sqlite:///PATH, "
            "mysql+pymysql://USER@HOST/DB or postgresql://USER@HOST/DB."
        ) from error
    if parsed.password is not None:
        safe = parsed.render_as_string(hide_password=True)
        raise ValueError(
            f"--storage must not contain a password (received {safe}). Remove it "
            f"from the URL and set the environment variable {PASSWORD_ENV}, or "
            "pass --storage-secret with a Secrets Manager secret id."
        )


def redact(url: str) -> str:
    """Return `url` with any password replaced by asterisks."""
    if url.startswith(JOURNAL_SCHEME):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def url_from_secret(secret_id: str, base_url: str = "") -> str:
    """Build a MySQL URL from a Secrets Manager secret in the RDS format.

    A secret RDS manages for a cluster holds only username and password, so
    host, port and database come from the secret when present and otherwise
    from `base_url` (the `--storage` URL without a password). The endpoint
    follows boto3's configuration, so `AWS_ENDPOINT_URL_SECRETS_MANAGER` points
    it at an emulator.

    Raises:
        ValueError: the secret lacks credentials, or nothing names the host.
    """
    import boto3
    from sqlalchemy.engine import URL, make_url

    client = boto3.client("secretsmanager")
    secret = json.loads(client.get_secret_value(SecretId=secret_id)["SecretString"])
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
    return url.render_as_string(hide_password=False)


def resolve_storage_url(url: str, secret_id: str | None = None) -> str:
    """Return the URL to connect with, the password filled in at run time.

    The result may contain a password: pass it to `create_storage` and never
    log it or keep it as an artifact.
    """
    if secret_id:
        return url_from_secret(secret_id, url)
    password = os.environ.get(PASSWORD_ENV)
    if url.startswith(JOURNAL_SCHEME) or not password:
        return url
    from sqlalchemy.engine import make_url

    with_password = make_url(url).set(password=password)
    return with_password.render_as_string(hide_password=False)


def create_storage(url: str) -> optuna.storages.BaseStorage:
    """Open the storage at `url` (journal file or SQLAlchemy URL)."""
    if url.startswith(JOURNAL_SCHEME):
        path = Path(url[len(JOURNAL_SCHEME) :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {}
    if not url.startswith("sqlite"):
        # Pre-ping and recycling replace connections the server closed while a
        # long trial ran (MySQL's wait_timeout, proxies' idle timeouts).
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 280}
    return RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        grace_period=GRACE_PERIOD,
        failed_trial_callback=RetryFailedTrialCallback(max_retry=MAX_TRIAL_RETRIES),
    )


def create_study(url: str, study_name: str) -> optuna.Study:
    """Create the study, or load it when it exists (a warm start)."""
    storage = create_storage(url)
    return optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        load_if_exists=True,
    )


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


def create_pruning_callback(trial: optuna.Trial, monitor: str = OBJECTIVE_METRIC):
    """Return a Keras callback that reports `monitor` to Optuna each epoch.

    When the pruner says so, the callback stops training and records the
    epoch in its `pruned_epoch` attribute; the objective then raises
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


def log_finished_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Log one compact line per finished trial."""
    try:
        best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "none yet"
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    log.info(
        "trial %d worker %s: %s %s, best %s",
        trial.number,
        trial.user_attrs.get("worker", "?"),
        trial.state.name.lower(),
        value,
        best,
    )


def run_worker(config: WorkerConfig, train, validation) -> dict:
    """Run this worker's share of trials on the shared study.

    A trial already finished by this worker in this run (a resumed task) is not
    run again. Transient database errors are retried with backoff.

    Returns:
        Counts of this worker's trials by state.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = config.storage_url
    done = _finished_by_worker(url, config)
    remaining = config.n_trials - done
    if done:
        log.info(
            "worker %d: %d trials already finished, %d left",
            config.worker,
            done,
            remaining,
        )
    for attempt in range(5):
        if remaining <= 0:
            break
        try:
            study = _load_study(config)
            study.optimize(
                lambda trial: _objective(trial, config, train, validation),
                n_trials=remaining,
                callbacks=[log_finished_trial],
                gc_after_trial=True,
            )
            break
        except Exception as error:
            if not _is_transient(error) or attempt == 4:
                raise
            delay = 2**attempt + random.random()
            log.warning(
                "worker %d: transient storage error (%s), retrying in %.1f s",
                config.worker,
                type(error).__name__,
                delay,
            )
            time.sleep(delay)
            remaining = config.n_trials - _finished_by_worker(url, config)
    return worker_counts(create_storage(url), config)


def _load_study(config: WorkerConfig) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(
        seed=config.seed + config.worker,
        n_startup_trials=startup_trials(config.total_trials),
        multivariate=True,
        group=True,
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    return optuna.load_study(
        study_name=config.study_name,
        storage=create_storage(config.storage_url),
        sampler=sampler,
        pruner=pruner,
    )


def _objective(trial: optuna.Trial, config: WorkerConfig, train, validation) -> float:
    from tabmodel.training import train_model

    trial.set_user_attr("worker", config.worker)
    trial.set_user_attr("run_key", config.run_key)
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
    return float(max(result.history[OBJECTIVE_METRIC]))


def _is_transient(error: Exception) -> bool:
    from sqlalchemy.exc import DBAPIError

    if isinstance(error, DBAPIError):
        code = getattr(error.orig, "args", [None])[0]
        return error.connection_invalidated or code in TRANSIENT_MYSQL_ERRORS
    return False


def _finished_by_worker(url: str, config: WorkerConfig) -> int:
    counts = worker_counts(create_storage(url), config)
    return counts["complete"] + counts["pruned"]


def worker_counts(storage, config: WorkerConfig) -> dict:
    """Count this worker's trials in this run by state."""
    study = optuna.load_study(study_name=config.study_name, storage=storage)
    counts = {"complete": 0, "pruned": 0, "fail": 0}
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if (
            attrs.get("worker") != config.worker
            or attrs.get("run_key") != config.run_key
        ):
            continue
        state = trial.state.name.lower()
        if state in counts:
            counts[state] += 1
    return counts


def summarize_study(url: str, study_name: str, run_key: str) -> dict:
    """Summarise the study: best trial, and trial counts per worker and state.

    Counts cover this run's trials (`run_key`); the best trial is the best of
    the whole study, which includes earlier runs' trials on a warm start.

    Raises:
        RuntimeError: no trial in the study completed.
    """
    study = optuna.load_study(study_name=study_name, storage=create_storage(url))
    per_worker: dict[str, dict[str, int]] = {}
    history = []
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("run_key") != run_key:
            continue
        worker = str(trial.user_attrs.get("worker", "?"))
        counts = per_worker.setdefault(worker, {"complete": 0, "pruned": 0, "fail": 0})
        state = trial.state.name.lower()
        if state in counts:
            counts[state] += 1
        history.append(
            {
                "number": trial.number,
                "worker": worker,
                "state": state,
                "value": trial.value,
            }
        )
    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]
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
        "per_worker": per_worker,
        "history": history,
        "totals": {
            state: sum(c[state] for c in per_worker.values())
            for state in ("complete", "pruned", "fail")
        },
    }
