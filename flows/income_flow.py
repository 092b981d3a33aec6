"""Tune, train, evaluate and deploy a TabTransformer on the UCI Adult census data.

python flows/income_flow.py run                 # the whole pipeline
python flows/income_flow.py run --help          # every parameter
python flows/income_flow.py resume              # continue a failed run
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from metaflow import (  # noqa: E402
    FlowSpec,
    Parameter,
    card,
    catch,
    current,
    resources,
    retry,
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
        default=16,
        type=int,
        help="Total tuning trials, split evenly across the workers.",
    )
    max_epochs = Parameter(
        "max-epochs",
        default=20,
        type=int,
        help="Maximum training epochs per trial; early stopping may end sooner.",
    )
    # Metaflow stores Parameter values before `start` runs, so the __main__
    # block rejects a --storage value with a password before Metaflow starts.
    storage = Parameter(
        "storage",
        default="",
        help="Optuna storage URL without a password: journal:PATH, sqlite:///PATH, "
        "mysql+pymysql://USER@HOST:PORT/DB or postgresql://USER@HOST:PORT/DB "
        "(psycopg driver). The password comes from TABMODEL_STORAGE_PASSWORD or "
        "from --storage-secret. Default: a journal file next to the local "
        "Metaflow datastore.",
    )
    storage_secret = Parameter(
        "storage-secret",
        default="",
        help="Secrets Manager secret id or ARN with the RDS JSON (username, "
        "password, host, port, dbname), read at run time. Host, port and "
        "database missing from the secret come from --storage, whose driver is "
        "used (default mysql+pymysql).",
    )
    study_name = Parameter(
        "study-name",
        default="",
        help="Optuna study to use; an existing study continues (warm start) and "
        "its earlier trials inform the sampler. Default: IncomeFlow-<run id>.",
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
        "python -m serving serves), 'sagemaker' (a SageMaker real-time endpoint; "
        "needs --serving-image, --sagemaker-role and an S3 datastore) or 'none'.",
    )
    serving_image = Parameter(
        "serving-image",
        default="",
        help="ECR URI of the serving image built from Dockerfile.serving, e.g. "
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/tabmodel-serving:latest. "
        "Used by --deploy-target sagemaker.",
    )
    instance_type = Parameter(
        "instance-type",
        default="ml.m5.large",
        help="SageMaker instance type of the endpoint (one instance). Used by "
        "--deploy-target sagemaker.",
    )
    endpoint_name = Parameter(
        "endpoint-name",
        default="income",
        help="Name of the endpoint the model is published to.",
    )
    trainer = Parameter(
        "trainer",
        default="local",
        help="Where retrain trains the final model: 'local' (in the step's own "
        "process, or its AWS Batch container with --with batch) or 'sagemaker' "
        "(a SageMaker training job running tabmodel.train_entry).",
    )
    training_image = Parameter(
        "training-image",
        default="",
        help="ECR URI of the training image (docker/Dockerfile.training) for "
        "--trainer sagemaker. For AWS Batch, set the image with "
        "--with batch:image=URI or METAFLOW_BATCH_CONTAINER_IMAGE instead.",
    )
    sagemaker_role = Parameter(
        "sagemaker-role",
        default="",
        help="ARN of the IAM execution role of SageMaker training jobs and "
        "models: it reads the data and model package in S3 and pulls the images. "
        "Used by --trainer sagemaker and --deploy-target sagemaker.",
    )
    training_instance_type = Parameter(
        "training-instance-type",
        default="ml.g5.xlarge",
        help="SageMaker instance type of the training job.",
    )
    spot = Parameter(
        "spot",
        default=True,
        type=bool,
        help="Use managed spot training for the SageMaker job (true or false); "
        "the job resumes from its last epoch checkpoint after an interruption.",
    )
    sagemaker_max_run = Parameter(
        "sagemaker-max-run",
        default=3600,
        type=int,
        help="Maximum training time of the SageMaker job, in seconds.",
    )
    sagemaker_max_wait = Parameter(
        "sagemaker-max-wait",
        default=5400,
        type=int,
        help="Maximum time of a spot job, waiting for capacity included, in "
        "seconds; at least --sagemaker-max-run.",
    )
    sagemaker_bucket = Parameter(
        "sagemaker-bucket",
        default="",
        help="S3 bucket or s3://bucket/prefix for the job's input data, "
        "checkpoints and model artifact. Default: the S3 datastore root.",
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
        # Trials of this run carry this key; `resume` clones this step, so a
        # resumed run finds and skips the trials already finished.
        self.run_key = f"{current.flow_name}/{current.run_id}"
        url = tuning.resolve_storage_url(self.storage_url, self.storage_secret or None)
        study = tuning.create_study(url, self.study_name_used)
        self.trials_before = len(study.get_trials(deepcopy=False))
        tuning.enqueue_default_trial(study, self.max_epochs)
        self.trial_shares = tuning.trials_per_worker(self.trials, self.workers)
        log.info(
            "study %s on %s%s: %d trials across %d workers, %d earlier trials",
            self.study_name_used,
            tuning.redact(self.storage_url),
            f" (credentials from secret {self.storage_secret})"
            if self.storage_secret
            else "",
            self.trials,
            self.workers,
            self.trials_before,
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
    @card(type="blank", id="progress", refresh_interval=10)
    @step
    def tune(self):
        """Run this worker's share of trials against the shared study."""
        from tabmodel import tuning
        from tabmodel.pipeline import limit_threads
        from tabmodel.reports import TuningProgress

        limit_threads(self.workers)
        # The URL may contain the password, so it stays a local variable and
        # never becomes an artifact.
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
            workers=self.workers,
        )
        objective = tuning.training_objective(config, self.train, self.validation)
        progress = TuningProgress(current.card["progress"], self.input, config.n_trials)
        self.worker_counts = tuning.run_worker(config, objective, on_trial=progress)
        log.info("worker %d finished: %s", self.input, self.worker_counts)
        self.next(self.join_tuning)

    @card(id="tuning")
    @step
    def join_tuning(self, inputs):
        """Pick the best trial of the study and record each worker's outcome."""
        from tabmodel import tuning
        from tabmodel.reports import tuning_card

        # A worker that raised, or whose process died, has `tune_error` set by
        # @catch and no `worker_counts`; its finished trials are in the study.
        self.worker_errors = {
            str(task.input): repr(task.tune_error)
            for task in inputs
            if getattr(task, "tune_error", None)
        }
        self.merge_artifacts(inputs, exclude=["worker_counts", "tune_error"])
        url = tuning.resolve_storage_url(self.storage_url, self.storage_secret or None)
        self.orphaned_trials = tuning.fail_orphaned_trials(
            url, self.study_name_used, self.run_key
        )
        summary = tuning.summarize_study(url, self.study_name_used, self.run_key)
        self.best_params = summary["best_params"]
        self.best_value = summary["best_value"]
        self.best_trial = summary["best_trial"]
        self.best_epoch = summary["best_epoch"]
        self.best_threshold = summary["best_threshold"]
        self.trial_counts = summary["per_worker"]
        self.trial_totals = summary["totals"]
        self.trial_history = summary["history"]
        study = tuning.load_study(url, self.study_name_used)
        current.card.extend(tuning_card(summary, study))
        for worker, error in sorted(self.worker_errors.items()):
            log.warning("worker %s failed: %s", worker, error)
        log.info(
            "tuning: %s; best trial %d, validation PR AUC %.4f; failed workers: %s",
            self.trial_totals,
            self.best_trial,
            self.best_value,
            sorted(self.worker_errors) or "none",
        )
        self.next(self.retrain)

    # Its inputs were validated in `start`, so a failure here is the machine's
    # (a spot interruption, an out-of-memory kill, a SageMaker API error) and
    # worth one more try.
    @retry(times=1, minutes_between_retries=1)
    @timeout(hours=2)
    @resources(gpu=1, cpu=4, memory=16000)
    @step
    def retrain(self):
        """Train the best configuration on train + validation, locally or as a
        SageMaker training job, and record the model package's location."""
        from tabmodel.pipeline import (
            package_destination,
            retrain_and_package,
            retrain_epochs,
        )

        self.training_job = None
        if self.trainer == "sagemaker":
            self.training_job = _retrain_on_sagemaker(self)
            self.model_uri = self.training_job["model_uri"]
            self.retrain_epochs = retrain_epochs(self.best_epoch)
        elif self.trainer == "local":
            destination = package_destination(_datastore_root(self), current)
            self.model_uri, self.retrain_epochs = retrain_and_package(
                self.best_params,
                self.best_epoch,
                self.train,
                self.validation,
                seed=self.seed,
                destination=destination,
                metadata={"run": self.run_key, "best_params": self.best_params},
                threshold=self.best_threshold,
            )
        else:
            raise ValueError(
                f"--trainer must be 'local' or 'sagemaker'. Received: {self.trainer!r}"
            )
        log.info(
            "retrained for %d epochs (%s); package %s",
            self.retrain_epochs,
            self.trainer,
            self.model_uri,
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
        self.threshold = result["threshold"]
        current.card.extend(
            evaluation_card(
                result["labels"],
                result["probabilities"],
                self.metrics,
                self.baseline_metrics,
                result["baseline_probabilities"],
                threshold=self.threshold,
            )
        )
        log.info(
            "test metrics: %s; baseline: %s",
            _rounded(self.metrics),
            _rounded(self.baseline_metrics),
        )
        self.next(self.deploy)

    @card(id="deployment")
    @step
    def deploy(self):
        """Publish the model package to the deploy target."""
        from serving.deploy import deploy_package, sample_exchange
        from tabmodel.reports import deployment_card

        self.deployment = deploy_package(
            self.model_uri,
            self.deploy_target,
            self.endpoint_name,
            current.run_id,
            image=self.serving_image,
            role=self.sagemaker_role,
            instance_type=self.instance_type,
        )
        self.model_version = self.deployment.get("model_version")
        sample = sample_exchange(self.model_uri, self.test)
        current.card.extend(deployment_card(self.deployment, self.model_uri, sample))
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


def _retrain_on_sagemaker(flow) -> dict:
    from tabmodel import sagemaker_training as sm
    from tabmodel.pipeline import retrain_epochs

    prefix = sm.resolve_s3_prefix(flow.sagemaker_bucket, _datastore_root(flow))
    config = sm.SageMakerConfig(
        image=flow.training_image,
        role_arn=flow.sagemaker_role,
        s3_prefix=prefix,
        instance_type=flow.training_instance_type,
        spot=flow.spot,
        max_run_s=flow.sagemaker_max_run,
        max_wait_s=flow.sagemaker_max_wait,
    )
    config.validate()
    job_name = sm.training_job_name(
        current.flow_name, current.run_id, current.retry_count
    )
    return sm.retrain_on_sagemaker(
        {**flow.best_params, "threshold": flow.best_threshold},
        retrain_epochs(flow.best_epoch),
        flow.train,
        flow.validation,
        seed=flow.seed,
        run_key=flow.run_key,
        job_name=job_name,
        prefix=sm.job_prefix(prefix, current.flow_name, current.run_id, job_name),
        config=config,
    )


def _rounded(metrics: dict) -> dict:
    return {name: round(value, 4) for name, value in metrics.items()}


if __name__ == "__main__":
    from tabmodel.tuning import reject_password_in_arguments

    reject_password_in_arguments(sys.argv[1:])
    IncomeFlow()
