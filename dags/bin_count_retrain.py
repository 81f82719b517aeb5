"""bin_count_retrain: tune, retrain with the best hyperparameters, gate, register in the Model Registry, approve."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from bin_counter.alerts import failure_alert
from bin_counter.approval import ModelReviewOperator
from bin_counter.assets import BIN_COUNT_DATASET, BIN_COUNT_MODEL
from bin_counter.sagemaker_operators import ResumableTrainingOperator, ResumableTuningOperator
from bin_counter.stack import name_param, run_params, stack_name

# How often the operators ask SageMaker for a job's status: 30 s suits AWS's API limits; the local
# stack sets a few seconds.
POLL_S = int(os.environ.get("BIN_COUNTER_SAGEMAKER_POLL_S", "30"))
AWS_CONN_ID = "aws_default"

DOC = """
### Bin count retraining

Trains a new bin item counter on a dataset made by `bin_count_data_prep` and serves it, if it is not
worse than the model serving now. Runs when `bin_count_dataset` gets a new version, or by hand with
the Params below.

1. **dataset**: the version to train on (the `dataset_version` Param, else the asset event that
   triggered the run, else the newest in the bucket) and its train/validation/test prefixes.
2. **settings**, **package_code**, **package_weights**, **serving_model**: the SageMaker role and
   images (Airflow Variable `bin_counter_sagemaker`), `sagemaker_code/` uploaded as `sourcedir.tar.gz`,
   the backbone's ImageNet weights file uploaded once (every job's `weights` channel, so no job
   downloads them), and the model the endpoint serves now (the *champion*), if any.
3. **tune**: a SageMaker hyperparameter tuning job over epochs, batch size and learning rate,
   objective a validation metric of `train.py`, early stopping on. A failing trial does not fail it.
4. **best_trial**: the best trial and its hyperparameters (task log and XCom).
5. **retrain**: one training job with those hyperparameters on train + validation, scoring the new
   model *and the champion* on the held-out test images (same job, same images, same code).
6. **gate**: registers the new model only if it is not worse than the champion by more than
   `deploy_margin` on `gate_metric`, on all test photos and, when the test set holds at least
   `live_gate_min_photos` live photos (data prep's `live_source`), on those alone. Otherwise the
   run stops here: the tasks after it are *skipped*, not failed, the log says by how much, and
   on-call staff get an alert.
7. **register_version**: a new version of the endpoint's model package group (`<endpoint>-models`) in
   the SageMaker Model Registry: the inference image and model artifact, the content types the endpoint
   accepts, the evaluation report (both models on the same test photos: accuracy, RMSE, MAE, within
   one, per-count accuracy, confusion matrix) as its ModelMetrics, the dataset, training job and run.
8. **approval_route**, **auto_approve** / **review**: with `approval` auto the gate's yes approves
   the version; with manual the run waits on the Required Actions page (Browse > Required Actions),
   which shows the comparison table and what the gate thinks. Approve: Approved. Reject, or no answer
   within `approval_timeout_hours`: Rejected with the reason, and an alert.
9. **announce**: the approved version as a `bin_count_model` asset event. **bin_count_deploy** runs
   on it and rolls the version out (canary, alarms, smoke check, undo); this DAG never touches the
   endpoint.

**Alerts**: a task that fails for good, and a model the gate or a reviewer holds back, publish to the SNS topic in
the Airflow Variable `bin_counter_alerts_topic` (DAG, task, run, log URL, reason); without it the
task log says alerts are off.

SageMaker job names derive from the run: a retried task attaches to the job its earlier try started
instead of starting another. What differs between AWS and a laptop is only the `aws_default`
connection (endpoint URLs per service); see docs/standin/README.md.

**When a task fails**
- *dataset*: no dataset yet (run `bin_count_data_prep`), or a `dataset_version` that does not exist.
- *settings* (or any task, for the names): the `bin_counter_sagemaker` Variable is missing or lacks
  `role_arn` or `lambda_role_arn`, or the `bucket` or `endpoint_name` that an empty Param leaves to it
  (the DAG has no default names); or the bucket does not exist, is someone else's, or is in another
  region than the connection; or AWS has no PyTorch image for the region and instance type; or a
  SageMaker quota ("<type> for training job usage") is below what the run needs at once (the message
  links the page that raises it). The message says what to set: the values are infra/pipeline.yaml's
  stack outputs.
- *package_weights*: the backbone's ImageNet weights file found on the worker is not what its name says
  (its sha256 does not start with the hash in the name): replace it. Not found at all, the task fails
  for `efficientnet_lite0` (no download exists: every trial would fail after its paid start-up) and
  warns for the others, whose jobs then download from download.pytorch.org (impossible without
  internet access); set `BIN_COUNTER_IMAGENET_WEIGHTS` on the workers to a folder holding the file
  (docs/dags/README.md, "Retraining DAG").
- *tune*: every trial failed. The log names the tuning job; each trial's FailureReason says why
  (often a hyperparameter `train.py` refuses, or an instance type the account has no quota for).
- *retrain*: the log shows the job's own output and its FailureReason. A retry attaches to a job still
  running; a failed job is retried under a new name.
- *tune*, *retrain* killed (timed out, marked failed, worker shut down): the task stops its SageMaker
  job, so nothing bills on; a retry starts a new one. Their timeout is the jobs' own time limit
  (`training_max_hours`, times the trials' waves for *tune*) plus a margin.
- *register_version*: the Model Registry refused the version (its message says why; often a
  missing `sagemaker:CreateModelPackage` grant) or the training job's model.tar.gz has no model card.
- *review* waits: that is the manual approval; answer it on the Required Actions page.
"""

# The trigger form's sections, in the order an operator reads them.
DATA, TUNING, TRAINING, DEPLOYMENT = "Data", "Tuning", "Training", "Registration and approval"
ARCHITECTURES = ["mobilenet_v2", "efficientnet_lite0", "resnet18", "resnet34", "resnet50"]


@dag(
    dag_id="bin_count_retrain",
    schedule=[BIN_COUNT_DATASET],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_macros={"stack_name": stack_name},
    doc_md=DOC,
    tags=["bin-counter", "training", "deployment"],
    default_args={
        "owner": "bin-counter",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(minutes=10),
        "on_failure_callback": failure_alert(),
    },
    params={
        # The trigger form shows the Params in these sections, in this order.
        "bucket": name_param(
            "bucket",
            "Our S3 bucket: datasets, code, models (in the connection's region)",
            from_event=True,
            section=DATA,
        ),
        # Nullable: the trigger form marks a plain string Param required and refuses it empty.
        "dataset_version": Param(
            None,
            type=["null", "string"],
            description="Dataset to train on (datasets/<version>/). Empty: the one whose "
            "asset event triggered the run, else the newest",
            section=DATA,
        ),
        "max_count": Param(
            5, type="integer", minimum=1, description="Top count class: the model answers 0..max_count", section=DATA
        ),
        "arch": Param(
            "mobilenet_v2", enum=ARCHITECTURES, description="Backbone (torchvision, ImageNet weights)", section=TUNING
        ),
        "mode": Param(
            "finetune",
            enum=["finetune", "partial", "head"],
            description="finetune: train every layer; partial: freeze the first half of the backbone; "
            "head: only a new last layer (the seed's recipe)",
            section=TUNING,
        ),
        "epochs_min": Param(4, type="integer", minimum=1, description="Tuning: fewest epochs", section=TUNING),
        "epochs_max": Param(8, type="integer", minimum=1, description="Tuning: most epochs", section=TUNING),
        "batch_sizes": Param(
            [16, 32],
            type="array",
            items={"type": "integer", "minimum": 1},
            description="Tuning: batch sizes to choose from",
            section=TUNING,
        ),
        "lr_min": Param(
            3e-4, type="number", exclusiveMinimum=0, description="Tuning: lowest learning rate", section=TUNING
        ),
        "lr_max": Param(
            3e-3,
            type="number",
            exclusiveMinimum=0,
            description="Tuning: highest learning rate (searched on a log scale)",
            section=TUNING,
        ),
        "objective": Param(
            "validation:accuracy",
            enum=["validation:accuracy", "validation:rmse", "validation:loss"],
            description="Tuning objective, as train.py logs it on the validation images",
            section=TUNING,
        ),
        "strategy": Param(
            "Bayesian", enum=["Bayesian", "Random"], description="Tuning search strategy", section=TUNING
        ),
        "max_jobs": Param(
            4, type="integer", minimum=1, maximum=100, description="Tuning: trials in all", section=TUNING
        ),
        "max_parallel_jobs": Param(
            2,
            type="integer",
            minimum=1,
            maximum=20,
            description="Tuning: trials at once (each is one instance)",
            section=TUNING,
        ),
        "extra_hyperparameters": Param(
            {},
            type="object",
            description='More train.py flags for every job, e.g. {"image-size": 160, "label-smoothing": 0.1}',
            section=TRAINING,
        ),
        "training_instance_type": Param(
            "ml.g4dn.xlarge",
            type="string",
            description="Instance for tuning trials and the final training job",
            section=TRAINING,
        ),
        "training_instance_count": Param(
            1,
            type="integer",
            minimum=1,
            maximum=16,
            description="Instances per training job; above 1 needs "
            "distributed_training (each instance then trains on its share)",
            section=TRAINING,
        ),
        "training_volume_gb": Param(
            30,
            type="integer",
            minimum=1,
            maximum=16384,
            description="Storage per training instance: the channels are downloaded onto it "
            "(the whole public dataset: about 30 GB of photos)",
            section=TRAINING,
        ),
        "training_max_hours": Param(
            4.0,
            type="number",
            exclusiveMinimum=0,
            maximum=120,
            description="Each training job is stopped after this long (MaxRuntimeInSeconds)",
            section=TRAINING,
        ),
        "distributed_training": Param(
            False,
            type="boolean",
            description="Train data-parallel under SageMaker's torch_distributed (torchrun): "
            "one process per GPU of the training instance, gradients averaged; "
            "batch sizes are per process. Trials and the final job alike",
            section=TRAINING,
        ),
        "processes_per_instance": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=64,
            description="With distributed_training: processes per training instance. "
            "Empty: one per GPU (one on a CPU instance)",
            section=TRAINING,
        ),
        "gate_metric": Param(
            "accuracy",
            enum=["accuracy", "rmse"],
            description="Test metric the new model must not be worse on than the serving one",
            section=DEPLOYMENT,
        ),
        "deploy_margin": Param(
            0.0,
            type="number",
            minimum=0,
            description="How much worse (in gate_metric units) the new model may be and still replace the serving one",
            section=DEPLOYMENT,
        ),
        "live_gate_min_photos": Param(
            30,
            type="integer",
            minimum=1,
            description="With at least this many live photos (captured requests, data prep's live_source) "
            "in the test set, a new model worse on them by more than deploy_margin is held back too",
            section=DEPLOYMENT,
        ),
        "deploy": Param(
            True,
            type="boolean",
            description="Off: train and evaluate only; nothing is registered or deployed",
            section=DEPLOYMENT,
        ),
        "approval": Param(
            "auto",
            enum=["auto", "manual"],
            description="auto: the gate's yes approves the registered version and bin_count_deploy rolls it "
            "out; manual: the run waits for a person on the Required Actions page, who sees the "
            "comparison with the serving model",
            section=DEPLOYMENT,
        ),
        "approval_timeout_hours": Param(
            24.0,
            type="number",
            exclusiveMinimum=0,
            maximum=720,
            description="manual approval: no answer within this long rejects the version",
            section=DEPLOYMENT,
        ),
        "endpoint_name": name_param(
            "endpoint_name",
            "The SageMaker endpoint whose model the new one must beat (its registry group is <endpoint>-models)",
            section=DEPLOYMENT,
        ),
        "initial_model": Param(
            "published",
            type="string",
            description="Before any model serves: the champion the new model must beat, "
            "'published' (the repository's models/bin-counter.tar.gz), a "
            "model.tar.gz path or s3:// URI, or 'none'. The better of the "
            "two is registered.",
            section=DEPLOYMENT,
        ),
    },
)
def bin_count_retrain():
    @task(execution_timeout=timedelta(minutes=2))
    def dataset() -> dict:
        """The dataset version and its channels."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter.dataset import resolve_dataset
        from bin_counter.stack import dataset_event_extra

        context = get_current_context()
        params = run_params(context)
        return resolve_dataset(
            S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(),
            params["bucket"],
            params["dataset_version"],
            dataset_event_extra(context),
        )

    @task(retries=0, execution_timeout=timedelta(minutes=1))
    def settings() -> dict:
        """Roles from the bin_counter_sagemaker Variable, AWS's images for the region and the instance
        types (GPU images on GPU instances), the bucket checked (it exists, is ours, and is in the
        connection's region) and the training quotas."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter.account import check_bucket, check_quotas, sagemaker_quota_needs, sagemaker_settings
        from bin_counter.stack import stack_variable

        region = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="sagemaker").conn_region_name
        params = run_params(get_current_context())
        # The registered version carries the CPU inference image: the serving code uses the CPU only.
        account = sagemaker_settings(stack_variable(), region, params["training_instance_type"])
        bucket = params["bucket"]
        check_bucket(S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(), bucket, account["region"])
        # Quotas before money: the trials that run at once (bin_count_deploy checks the endpoint's).
        needs = sagemaker_quota_needs(
            params["training_instance_type"],
            min(params["max_jobs"], params["max_parallel_jobs"]) * params["training_instance_count"],
        )
        check_quotas(AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="service-quotas").get_conn(), region, needs)
        print(
            f"bucket {bucket} in {account['region']}, endpoint {params['endpoint_name']}; SageMaker role "
            f"{account['role_arn']}; images {account['training_image']} (training), "
            f"{account['inference_image']} (registered for serving)"
        )
        return account

    @task(execution_timeout=timedelta(minutes=5))
    def package_code() -> str:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter.retrain import upload_code

        return upload_code(S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(), run_params(get_current_context())["bucket"])

    @task(execution_timeout=timedelta(minutes=5))
    def package_weights() -> str | None:
        """The backbone's ImageNet weights file, stored once per content hash: the jobs' `weights` channel."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter.retrain import weights_channel

        return weights_channel(S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(), run_params(get_current_context()))

    @task(execution_timeout=timedelta(minutes=5))
    def serving_model() -> dict | None:
        """The champion: what the endpoint serves now; before the first deployment, the initial model."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.endpoint import serving_model as find
        from bin_counter.gate import initial_champion

        params = run_params(get_current_context())
        found = find(SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, params["endpoint_name"])
        if found:
            print(f"serving now: {found}")
            return found
        initial = initial_champion(
            S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(), params["bucket"], params["initial_model"]
        )
        # A Failed or OutOfService endpoint serves nothing either (its reason is logged above); the
        # deploy task replaces a Failed one.
        print(
            f"no endpoint yet, or none that serves: the new model competes with the initial model {initial}"
            if initial
            else "no endpoint yet, or none that serves: the new model will be the first"
        )
        return initial

    @task(execution_timeout=timedelta(minutes=1))
    def tuning_config(data: dict, account: dict, code_uri: str, weights_uri: str | None) -> dict:
        from bin_counter import retrain

        context = get_current_context()
        return retrain.tuning_request(
            run_params(context), data, account, code_uri, context["dag"].dag_id, context["run_id"], weights_uri
        )

    data, account, code_uri, champion = dataset(), settings(), package_code(), serving_model()
    weights_uri = package_weights()
    tune = ResumableTuningOperator(
        task_id="tune",
        config=tuning_config(data, account, code_uri, weights_uri),
        aws_conn_id=AWS_CONN_ID,
        check_interval=POLL_S,
        # When the task runs, the trials' own limit (training_max_hours) times the waves they run in
        # (max_jobs / max_parallel_jobs), with margins, replaces this (sagemaker_operators).
        execution_timeout=timedelta(hours=12),
        doc_md="The tuning job. Its trials are listed in the SageMaker console (or ListTrainingJobsFor"
        "HyperParameterTuningJob); a failed trial's FailureReason says why it failed.",
    )

    @task(execution_timeout=timedelta(minutes=2))
    def best_trial(tuned: dict) -> dict:
        import json

        from bin_counter.sagemaker_config import best_trial as pick

        best = pick(tuned["Tuning"])
        print(
            f"best trial {best['training_job']}: {best['objective']['name']} = {best['objective']['value']}, "
            f"hyperparameters {json.dumps(best['hyperparameters'])}"
        )
        return best

    @task(execution_timeout=timedelta(minutes=1))
    def retrain_config(
        data: dict, account: dict, code_uri: str, weights_uri: str | None, best: dict, champion: dict | None
    ) -> dict:
        from bin_counter import retrain

        context = get_current_context()
        return retrain.final_training_request(
            run_params(context),
            data,
            account,
            code_uri,
            best,
            champion,
            context["dag"].dag_id,
            context["run_id"],
            weights_uri,
        )

    retrain = ResumableTrainingOperator(
        task_id="retrain",
        config=retrain_config(data, account, code_uri, weights_uri, best_trial(tune.output), champion),
        aws_conn_id=AWS_CONN_ID,
        print_log=True,
        check_interval=POLL_S,
        retries=1,
        # When the task runs, the job's own limit (training_max_hours) with margins replaces this.
        execution_timeout=timedelta(hours=6),
        doc_md="The final training job; its log (train.py's output) is in this task's log.",
    )

    @task.short_circuit(retries=0, execution_timeout=timedelta(minutes=1))
    def gate(trained: dict, champion: dict | None, data: dict) -> dict | None:
        """Champion/challenger on the same test images; nothing to deploy skips the deployment, it
        does not fail. Returns what to deploy: the new model, or before anything serves, possibly
        the published one."""
        from bin_counter.gate import choose_deployment, final_metrics

        params = get_current_context()["params"]
        job = trained["Training"]
        metrics = final_metrics(job)
        print(
            f"training job {job['TrainingJobName']} on dataset {data['version']}: "
            + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.split(":")[0] in ("test", "champion"))
        )
        choice = choose_deployment(
            metrics,
            champion,
            job["TrainingJobName"],
            params["gate_metric"],
            params["deploy_margin"],
            params["deploy"],
            params["live_gate_min_photos"],
        )
        if choice["held_back"]:
            from bin_counter.alerts import gated_alert

            gated_alert(f"{job['TrainingJobName']}: {choice['reason']}", AWS_CONN_ID)(get_current_context())
        what = {"new": "DEPLOYING: ", "published": "DEPLOYING THE PUBLISHED MODEL: ", None: "NOT DEPLOYING: "}
        print(what[choice["deploy"]] + choice["reason"])
        return choice if choice["deploy"] else None

    @task(execution_timeout=timedelta(minutes=10))
    def register_version(trained: dict, data: dict, account: dict, decision: dict, champion: dict | None) -> dict:
        """The chosen model as a new version of the endpoint's model package group, with its evaluation
        report (both models on the same test photos) as ModelMetrics; PendingManualApproval until approved."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.retrain import register_candidate

        context = get_current_context()
        registered = register_candidate(
            SageMakerHook(aws_conn_id=AWS_CONN_ID).conn,
            S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(),
            run_params(context),
            trained["Training"],
            data,
            account,
            decision,
            champion,
            context["run_id"],
        )
        print(f"registered {registered['arn']} (version {registered['version']}, model {registered['model_version']})")
        print(registered["review"])
        return registered

    @task.branch(retries=0, execution_timeout=timedelta(minutes=1))
    def approval_route() -> str:
        """`auto`: the gate's decision is the approval; `manual`: a person decides on the review page."""
        return "review" if get_current_context()["params"]["approval"] == "manual" else "auto_approve"

    @task(execution_timeout=timedelta(minutes=2))
    def auto_approve(registered: dict) -> None:
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter import registry

        reason = f"approved by the gate (approval=auto): {registered['reason']}"
        registry.set_status(SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, registered["arn"], registry.APPROVED, reason)
        print(f"version {registered['version']}: Approved ({reason})")

    decision = gate(retrain.output, champion, data)
    registered = register_version(retrain.output, data, account, decision, champion)
    route = approval_route()
    registered >> route
    review = ModelReviewOperator(
        task_id="review",
        registered=registered,
        subject="Deploy model package version {{ ti.xcom_pull(task_ids='register_version')['version'] }} "
        "({{ ti.xcom_pull(task_ids='register_version')['model_version'] }})?",
        body="{{ ti.xcom_pull(task_ids='register_version')['review'] }}",
        aws_conn_id=AWS_CONN_ID,
        retries=0,
        # The wait is the run's approval_timeout_hours (set when the task runs); this bounds the task's
        # own work before and after it.
        response_timeout=timedelta(hours=24),
        execution_timeout=timedelta(minutes=5),
        doc_md="Waits for a person (Required Actions page) when the run's `approval` Param is manual. Approve: "
        "the version becomes Approved and bin_count_deploy rolls it out. Reject, or no answer within "
        "`approval_timeout_hours`: Rejected, an alert, nothing deployed.",
    )

    @task(
        outlets=[BIN_COUNT_MODEL],
        trigger_rule="none_failed_min_one_success",
        execution_timeout=timedelta(minutes=1),
    )
    def announce(registered: dict, *, outlet_events=None) -> dict:
        """The approved version as a `bin_count_model` asset event: bin_count_deploy rolls it out."""
        params = run_params(get_current_context())
        extra = {k: registered[k] for k in ("arn", "group", "version", "model_version")}
        # Where it is to be deployed: the deploy run takes the same bucket and endpoint as this run.
        extra.update(bucket=params["bucket"], endpoint_name=params["endpoint_name"])
        outlet_events[BIN_COUNT_MODEL].extra = extra
        print(f"announced for deployment: {extra}")
        return extra

    route >> [auto_approve(registered), review] >> announce(registered)


bin_count_retrain()
