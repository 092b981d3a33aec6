"""Tune, train, evaluate and deploy a TabTransformer on the UCI Adult census data.

python flows/income_flow.py run                 # the whole pipeline
python flows/income_flow.py run --help          # every parameter
python flows/income_flow.py resume              # continue a failed run
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from metaflow import (  # noqa: E402
    FlowSpec,
    Parameter,
    card,
    catch,
    current,
    resources,
    step,
    timeout,
)

logging.basicConfig(
    level=logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    force=True,
)
for noisy in ("absl", "tensorflow", "h5py", "matplotlib", "botocore", "urllib3"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
log = logging.getLogger("income_flow")


class IncomeFlow(FlowSpec):
    """Predict whether income exceeds 50K from the 1994 US census (UCI Adult).

    Steps: start (create the Optuna study) -> ingest (read and verify the data)
    -> split (train/validation) -> tune (one task per worker, one shared study)
    -> join_tuning (pick the best trial) -> retrain (train + validation, best
    parameters) -> evaluate (official test file, boosted-tree baseline) ->
    deploy (publish the model package) -> end.
    """

    data = Parameter(
        "data",
        default="bundled",
        help="Where adult.data and adult.test are: 'bundled' (the verified copy "
        "shipped with the package), a local directory, or an https:// or s3:// "
        "prefix. Gzip copies (adult.data.gz) are accepted.",
    )
    sample_rows = Parameter(
        "sample-rows",
        default=0,
        type=int,
        help="Rows of the training file to use, as a stratified sample; 0 uses "
        "all 32,561 rows.",
    )
    validation_share = Parameter(
        "validation-share",
        default=0.2,
        type=float,
        help="Share of the training rows held out for validation (0 to 1).",
    )
    workers = Parameter(
        "workers",
        default=2,
        type=int,
        help="Parallel tuning tasks, all sharing one Optuna study.",
    )
    trials = Parameter(
        "trials",
        default=8,
        type=int,
        help="Total tuning trials, split evenly across the workers.",
    )
    max_epochs = Parameter(
        "max-epochs",
        default=12,
        type=int,
        help="Maximum training epochs per trial; early stopping may end sooner.",
    )
    storage = Parameter(
        "storage",
        default="",
        help="Optuna storage URL without a password: journal:PATH, sqlite:///PATH, "
        "mysql+pymysql://USER@HOST/DB or postgresql://USER@HOST/DB. The password "
        "comes from TABMODEL_STORAGE_PASSWORD. Default: a journal file next to the "
        "local Metaflow datastore.",
    )
    storage_secret = Parameter(
        "storage-secret",
        default="",
        help="Secrets Manager secret id or ARN with the RDS JSON (username, "
        "password, host, port, dbname); overrides --storage.",
    )
    study_name = Parameter(
        "study-name",
        default="",
        help="Optuna study to use; an existing study continues (warm start). "
        "Default: IncomeFlow-<run id>.",
    )
    seed = Parameter(
        "seed",
        default=42,
        type=int,
        help="Seed for sampling, splitting, the tuner and model initialisation.",
    )
    deploy_target = Parameter(
        "deploy-target",
        default="local",
        help="Where to deploy the model: 'local' (a local endpoint that "
        "python -m serving serves) or 'none'.",
    )
    endpoint_name = Parameter(
        "endpoint-name",
        default="income",
        help="Name of the endpoint the model is published to.",
    )

    @step
    def start(self):
        """Check the parameters and create the Optuna study once, before the
        workers fan out."""
        from tabmodel import tuning
        from tabmodel.pipeline import validate_parameters

        validate_parameters(self)
        self.storage_url = self.storage or tuning.default_storage_url(
            _datastore_root(self)
        )
        tuning.check_storage_url(self.storage_url)
        self.study_name_used = self.study_name or f"IncomeFlow-{current.run_id}"
        # Trials of this run carry this key, so a resumed run counts them.
        self.run_key = f"{current.flow_name}/{current.run_id}"
        url = tuning.resolve_storage_url(self.storage_url, self.storage_secret or None)
        tuning.create_study(url, self.study_name_used)
        self.trial_shares = tuning.trials_per_worker(self.trials, self.workers)
        log.info(
            "study %s on %s: %d trials across %d workers",
            self.study_name_used,
            tuning.redact(self.storage_url),
            self.trials,
            self.workers,
        )
        self.next(self.ingest)

    @step
    def ingest(self):
        """Read adult.data and adult.test, verify checksums and validate every row."""
        from tabmodel.data import load_adult, positives

        adult = load_adult(self.data)
        self.full_train = adult.train
        self.test = adult.test
        self.provenance = adult.provenance
        log.info(
            "ingested %d training rows (%d positive) and %d test rows (%d positive); "
            "checksum %s",
            self.full_train.height,
            positives(self.full_train),
            self.test.height,
            positives(self.test),
            self.provenance["checksum"],
        )
        self.next(self.split)

    @card(id="data")
    @step
    def split(self):
        """Sample (optionally) and split the training file into train and
        validation, stratified by label."""
        from tabmodel.reports import data_card
        from tabmodel.split import sample_rows, train_validation_split

        rows = sample_rows(self.full_train, self.sample_rows, self.seed)
        self.train, self.validation = train_validation_split(
            rows, self.validation_share, self.seed
        )
        self.split_counts = {
            "train": self.train.height,
            "validation": self.validation.height,
            "test": self.test.height,
        }
        log.info("split: %s", self.split_counts)
        current.card.extend(
            data_card(
                {"train": self.train, "validation": self.validation, "test": self.test},
                self.provenance,
            )
        )
        self.worker_ids = list(range(self.workers))
        self.next(self.tune, foreach="worker_ids")

    @catch(var="tune_error", print_exception=True)
    @timeout(hours=4)
    @resources(cpu=2, memory=8000)
    @step
    def tune(self):
        """Run this worker's share of trials against the shared study."""
        from tabmodel import tuning
        from tabmodel.pipeline import limit_threads

        limit_threads(self.workers)
        config = tuning.WorkerConfig(
            storage_url=tuning.resolve_storage_url(
                self.storage_url, self.storage_secret or None
            ),
            study_name=self.study_name_used,
            worker=self.input,
            n_trials=self.trial_shares[self.input],
            total_trials=self.trials,
            max_epochs=self.max_epochs,
            seed=self.seed,
            run_key=self.run_key,
        )
        self.worker_counts = tuning.run_worker(config, self.train, self.validation)
        log.info("worker %d finished: %s", self.input, self.worker_counts)
        self.next(self.join_tuning)

    @step
    def join_tuning(self, inputs):
        """Pick the best trial of the study and record each worker's outcome."""
        from tabmodel import tuning

        self.worker_errors = {
            str(task.input): repr(task.tune_error)
            for task in inputs
            if getattr(task, "tune_error", None)
        }
        self.merge_artifacts(inputs, exclude=["worker_counts", "tune_error"])
        url = tuning.resolve_storage_url(self.storage_url, self.storage_secret or None)
        summary = tuning.summarize_study(url, self.study_name_used, self.run_key)
        self.best_params = summary["best_params"]
        self.best_value = summary["best_value"]
        self.best_epoch = summary["best_epoch"]
        self.trial_counts = summary["per_worker"]
        self.trial_totals = summary["totals"]
        self.trial_history = summary["history"]
        log.info(
            "tuning: %s; best trial %d, validation PR AUC %.4f; failed workers: %s",
            self.trial_totals,
            summary["best_trial"],
            self.best_value,
            sorted(self.worker_errors) or "none",
        )
        self.next(self.retrain)

    @timeout(hours=2)
    @resources(gpu=1, cpu=4, memory=16000)
    @step
    def retrain(self):
        """Train the best configuration on train + validation and store the
        model package under this run's id."""
        from tabmodel.pipeline import package_destination, retrain_and_package

        destination = package_destination(_datastore_root(self), current)
        self.model_uri, self.retrain_epochs = retrain_and_package(
            self.best_params,
            self.best_epoch,
            self.train,
            self.validation,
            seed=self.seed,
            destination=destination,
            metadata={"run": self.run_key, "best_params": self.best_params},
        )
        log.info(
            "retrained for %d epochs; package %s", self.retrain_epochs, self.model_uri
        )
        self.next(self.evaluate)

    @card(id="evaluation")
    @step
    def evaluate(self):
        """Score the model and a boosted-tree baseline on the official test file."""
        from tabmodel.pipeline import evaluate_package
        from tabmodel.reports import evaluation_card

        result = evaluate_package(
            self.model_uri, self.train, self.validation, self.test, seed=self.seed
        )
        self.metrics = result["metrics"]
        self.baseline_metrics = result["baseline_metrics"]
        current.card.extend(
            evaluation_card(
                result["labels"],
                result["probabilities"],
                self.metrics,
                self.baseline_metrics,
                result["baseline_probabilities"],
            )
        )
        log.info(
            "test metrics: %s; baseline: %s",
            _rounded(self.metrics),
            _rounded(self.baseline_metrics),
        )
        self.next(self.deploy)

    @step
    def deploy(self):
        """Publish the model package to the deploy target."""
        from serving.deploy import deploy_package

        self.deployment = deploy_package(
            self.model_uri, self.deploy_target, self.endpoint_name, current.run_id
        )
        self.model_version = self.deployment.get("model_version")
        log.info("deploy: %s", self.deployment)
        self.next(self.end)

    @step
    def end(self):
        """Report where the model is and how it scored."""
        log.info(
            "run %s: test ROC AUC %.4f, accuracy %.4f; model %s",
            current.run_id,
            self.metrics["roc_auc"],
            self.metrics["accuracy"],
            self.model_uri,
        )


def _datastore_root(flow) -> str:
    # NOTE: Metaflow has no public accessor for the datastore root in a step;
    # this private attribute is the one Metaflow 2.19 uses internally.
    return flow._datastore.parent_datastore.datastore_root


def _rounded(metrics: dict) -> dict:
    return {name: round(value, 4) for name, value in metrics.items()}


if __name__ == "__main__":
    IncomeFlow()
