"""bin_count_retrain: tune, retrain with the best hyperparameters, gate, deploy, smoke-check."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerEndpointConfigOperator,
    SageMakerModelOperator,
)
from airflow.sdk import Param, dag, get_current_context, task

from bin_counter.alerts import failure_alert
from bin_counter.assets import BIN_COUNT_DATASET
from bin_counter.lambda_operators import DigestLambdaInvokeFunctionOperator
from bin_counter.sagemaker_operators import (
    ReplacingEndpointOperator,
    ResumableTrainingOperator,
    ResumableTuningOperator,
)
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
6. **gate**: deploys only if the new model is not worse than the champion by more than
   `deploy_margin` on `gate_metric`. Otherwise the run stops here: the deployment tasks are
   *skipped*, not failed, and the log says by how much.
7. **register_model**, **endpoint_config**, **deploy**: a SageMaker model named after the training
   job and tagged with it, the dataset version and the test metrics; an endpoint configuration; the
   endpoint created the first time, updated afterwards (SageMaker keeps the old model serving until
   the new one is healthy); **confirm_deployment** checks the endpoint really switched, since a
   rolled-back update looks "InService" to the deploy task.
8. **api_function**, **smoke_event**, **invoke_api**, **smoke_check**: the Lambda function in front of the
   endpoint (the API stack's; created here only where the stack says no API stack owns it) is pointed
   at it; real test images go through it; the run fails if the answers
   are malformed or do not come from the new model.

**Alerts**: a task that fails for good, and a model the gate holds back, publish to the SNS topic in
the Airflow Variable `bin_counter_alerts_topic` (DAG, task, run, log URL, reason); without it the
task log says alerts are off.

SageMaker job names derive from the run: a retried task attaches to the job its earlier try started
instead of starting another. What differs between AWS and a laptop is only the `aws_default`
connection (endpoint URLs per service); see docs/standin/README.md.

**When a task fails**
- *dataset*: no dataset yet (run `bin_count_data_prep`), or a `dataset_version` that does not exist.
- *settings* (or any task, for the names): the `bin_counter_sagemaker` Variable is missing or lacks
  `role_arn` or `lambda_role_arn`, or the `bucket`, `endpoint_name` or `function_name` that an empty
  Param leaves to it (the DAG has no default names); or the bucket does not exist, is someone else's,
  or is in another region than the connection; or AWS has no PyTorch image for the region and
  instance type; or the endpoint instance type is a GPU one (the serving code uses the CPU only); or
  a SageMaker quota ("<type> for training job usage", "... for endpoint usage") is below what the run
  needs at once (the message links the page that raises it); or the API stack's function is missing
  (deploy lambda/template.yaml first). The message says what to set: the values are
  infra/pipeline.yaml's stack outputs.
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
- *deploy*: the endpoint did not become InService; its FailureReason is in the log. A failed creation
  leaves the endpoint Failed: it serves nothing (the next run's champion is the initial model) and
  SageMaker allows only deleting it, so the task's next try, or the next run's, deletes it and
  creates it again. Fix the cause first (often a model that failed its health check, or no quota
  for the endpoint's instance type), or every try fails the same way.
- *tune*, *retrain* killed (timed out, marked failed, worker shut down): the task stops its SageMaker
  job, so nothing bills on; a retry starts a new one. Their timeout is the jobs' own time limit
  (`training_max_hours`, times the trials' waves for *tune*) plus a margin.
- *confirm_deployment*: the endpoint update failed and SageMaker rolled it back: the old model keeps
  serving (the API is unaffected) and the log quotes the endpoint's FailureReason, often a model that
  failed its health check or an instance type without quota. Fix the cause, then clear *deploy*.
- *smoke_check*: the API answered with an error, a malformed answer, or a model version other than
  the one just deployed: check the Lambda function's log and the endpoint's status before trusting it.
"""

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
        "bucket": name_param(
            "bucket", "Our S3 bucket: datasets, code, models (in the connection's region)", from_event=True
        ),
        # Nullable: the trigger form marks a plain string Param required and refuses it empty.
        "dataset_version": Param(
            None,
            type=["null", "string"],
            description="Dataset to train on (datasets/<version>/). Empty: the one whose "
            "asset event triggered the run, else the newest",
        ),
        "arch": Param("mobilenet_v2", enum=ARCHITECTURES, description="Backbone (torchvision, ImageNet weights)"),
        "mode": Param(
            "finetune",
            enum=["finetune", "partial", "head"],
            description="finetune: train every layer; partial: freeze the first half of the backbone; "
            "head: only a new last layer (the seed's recipe)",
        ),
        "max_count": Param(5, type="integer", minimum=1, description="Top count class: the model answers 0..max_count"),
        "epochs_min": Param(4, type="integer", minimum=1, description="Tuning: fewest epochs"),
        "epochs_max": Param(8, type="integer", minimum=1, description="Tuning: most epochs"),
        "batch_sizes": Param(
            [16, 32],
            type="array",
            items={"type": "integer", "minimum": 1},
            description="Tuning: batch sizes to choose from",
        ),
        "lr_min": Param(3e-4, type="number", exclusiveMinimum=0, description="Tuning: lowest learning rate"),
        "lr_max": Param(
            3e-3,
            type="number",
            exclusiveMinimum=0,
            description="Tuning: highest learning rate (searched on a log scale)",
        ),
        "objective": Param(
            "validation:accuracy",
            enum=["validation:accuracy", "validation:rmse", "validation:loss"],
            description="Tuning objective, as train.py logs it on the validation images",
        ),
        "strategy": Param("Bayesian", enum=["Bayesian", "Random"], description="Tuning search strategy"),
        "max_jobs": Param(4, type="integer", minimum=1, maximum=100, description="Tuning: trials in all"),
        "max_parallel_jobs": Param(
            2, type="integer", minimum=1, maximum=20, description="Tuning: trials at once (each is one instance)"
        ),
        "extra_hyperparameters": Param(
            {},
            type="object",
            description='More train.py flags for every job, e.g. {"image-size": 160, "label-smoothing": 0.1}',
        ),
        "training_instance_type": Param(
            "ml.g4dn.xlarge", type="string", description="Instance for tuning trials and the final training job"
        ),
        "training_instance_count": Param(
            1,
            type="integer",
            minimum=1,
            maximum=16,
            description="Instances per training job; above 1 needs "
            "distributed_training (each instance then trains on its share)",
        ),
        "training_volume_gb": Param(
            30,
            type="integer",
            minimum=1,
            maximum=16384,
            description="Storage per training instance: the channels are downloaded onto it "
            "(the whole public dataset: about 30 GB of photos)",
        ),
        "training_max_hours": Param(
            4.0,
            type="number",
            exclusiveMinimum=0,
            maximum=120,
            description="Each training job is stopped after this long (MaxRuntimeInSeconds)",
        ),
        "distributed_training": Param(
            False,
            type="boolean",
            description="Train data-parallel under SageMaker's torch_distributed (torchrun): "
            "one process per GPU of the training instance, gradients averaged; "
            "batch sizes are per process. Trials and the final job alike",
        ),
        "processes_per_instance": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=64,
            description="With distributed_training: processes per training instance. "
            "Empty: one per GPU (one on a CPU instance)",
        ),
        "endpoint_instance_type": Param("ml.m5.large", type="string", description="Instance serving the endpoint"),
        "serving_workers": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=64,
            description="Model workers per endpoint instance (SAGEMAKER_MODEL_SERVER_WORKERS). "
            "Empty: TorchServe's one per vCPU, each on one core (the most answers "
            "per second); 1: one worker on every core (the lowest latency at one "
            "client, one worker's memory). BENCHMARKS.md, 'Serving fast'",
        ),
        "gate_metric": Param(
            "accuracy",
            enum=["accuracy", "rmse"],
            description="Test metric the new model must not be worse on than the serving one",
        ),
        "deploy_margin": Param(
            0.0,
            type="number",
            minimum=0,
            description="How much worse (in gate_metric units) the new model may be and still replace the serving one",
        ),
        "deploy": Param(True, type="boolean", description="Off: train and evaluate only; never touch the endpoint"),
        "endpoint_name": name_param("endpoint_name", "The SageMaker endpoint the API calls"),
        "initial_model": Param(
            "published",
            type="string",
            description="Before any model serves: the champion the new model must beat, "
            "'published' (the repository's models/bin-counter.tar.gz), a "
            "model.tar.gz path or s3:// URI, or 'none'. The better of the "
            "two is deployed.",
        ),
        "function_name": name_param("function_name", "The Lambda function in front of the endpoint (the API stack's)"),
        "smoke_images": Param(
            6, type="integer", minimum=1, maximum=8, description="Test images sent through the API after deploying"
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
        types (GPU images on GPU instances), and the bucket checked: it exists, is ours, and is in the
        connection's region."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.providers.amazon.aws.hooks.lambda_function import LambdaHook
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.account import check_bucket, check_quotas, sagemaker_quota_needs, sagemaker_settings
        from bin_counter.api_function import check_function_deployed
        from bin_counter.endpoint import describe_endpoint
        from bin_counter.stack import dags_create_the_function, stack_variable

        region = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="sagemaker").conn_region_name
        params, variable = run_params(get_current_context()), stack_variable()
        account = sagemaker_settings(
            variable,
            region,
            params["training_instance_type"],
            params["endpoint_instance_type"],
        )
        bucket = params["bucket"]
        check_bucket(S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(), bucket, account["region"])
        # Quotas before money: the trials at once, and an endpoint update's two fleets (one fleet for
        # the first deployment).
        serving = describe_endpoint(SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, params["endpoint_name"])
        needs = sagemaker_quota_needs(
            params["training_instance_type"],
            min(params["max_jobs"], params["max_parallel_jobs"]) * params["training_instance_count"],
            params["endpoint_instance_type"] if params["deploy"] else None,
            1,
            endpoint_update=bool(serving and serving["EndpointStatus"] == "InService"),
        )
        check_quotas(AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="service-quotas").get_conn(), region, needs)
        account["create_function"] = dags_create_the_function(variable)
        if params["deploy"] and not account["create_function"]:
            check_function_deployed(LambdaHook(aws_conn_id=AWS_CONN_ID).conn, params["function_name"])
        print(
            f"bucket {bucket} in {account['region']}, endpoint {params['endpoint_name']}, API function "
            f"{params['function_name']}; SageMaker role {account['role_arn']}, "
            f"API function role {account['lambda_role_arn']}; images {account['training_image']} (training), "
            f"{account['inference_image']} (endpoint)"
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
            metrics, champion, job["TrainingJobName"], params["gate_metric"], params["deploy_margin"], params["deploy"]
        )
        if choice["held_back"]:
            from bin_counter.alerts import gated_alert

            gated_alert(f"{job['TrainingJobName']}: {choice['reason']}", AWS_CONN_ID)(get_current_context())
        what = {"new": "DEPLOYING: ", "published": "DEPLOYING THE PUBLISHED MODEL: ", None: "NOT DEPLOYING: "}
        print(what[choice["deploy"]] + choice["reason"])
        return choice if choice["deploy"] else None

    @task(multiple_outputs=True, execution_timeout=timedelta(minutes=1))
    def deployment_configs(trained: dict, data: dict, account: dict, decision: dict, champion: dict | None) -> dict:
        from bin_counter import retrain

        return retrain.deployment_requests(
            run_params(get_current_context()), trained["Training"], data, account, decision, champion
        )

    decision = gate(retrain.output, champion, data)
    configs = deployment_configs(retrain.output, data, account, decision, champion)
    register = SageMakerModelOperator(
        task_id="register_model",
        config=configs["model"],
        aws_conn_id=AWS_CONN_ID,
        retries=0,
        doc_md="A SageMaker model named after the training job, tagged with its dataset version and test "
        "metrics. Already exists? The run was re-run after this step: clear from *deploy*.",
    )
    endpoint_config = SageMakerEndpointConfigOperator(
        task_id="endpoint_config", config=configs["endpoint_config"], aws_conn_id=AWS_CONN_ID, retries=0
    )
    deploy = ReplacingEndpointOperator(
        task_id="deploy",
        config=configs["endpoint"],
        operation="create",
        aws_conn_id=AWS_CONN_ID,
        wait_for_completion=True,
        check_interval=POLL_S,
        max_ingestion_time=3600,
        execution_timeout=timedelta(hours=1),
        doc_md="Creates the endpoint the first time and updates it afterwards. An endpoint that SageMaker "
        "left Failed (a failed creation) allows nothing but deleting it: it is deleted and created again.",
    )

    @task(retries=0, execution_timeout=timedelta(minutes=2))
    def confirm_deployment(deployed: dict, configs: dict) -> dict:
        """The endpoint serves the new configuration: a failed update is rolled back to InService on the
        old one, which the deploy task's waiter takes for success."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.endpoint import confirm_deployment as confirm

        wanted = configs["endpoint"]
        state = confirm(
            SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, wanted["EndpointName"], wanted["EndpointConfigName"]
        )
        print(f"endpoint {state['endpoint']} serves {state['endpoint_config']}")
        return state

    @task(execution_timeout=timedelta(minutes=5))
    def api_function(deployed: dict, account: dict) -> str:
        """The Lambda function in front of the endpoint: created, or pointed at it with the current code."""
        from airflow.providers.amazon.aws.hooks.lambda_function import LambdaHook

        from bin_counter.api_function import ensure_function

        params = run_params(get_current_context())
        return ensure_function(
            LambdaHook(aws_conn_id=AWS_CONN_ID).conn,
            params["function_name"],
            params["endpoint_name"],
            account["lambda_role_arn"],
            create_missing=account["create_function"],
        )

    @task(multiple_outputs=True, execution_timeout=timedelta(minutes=5))
    def smoke_event(data: dict) -> dict:
        """A few real test images, as the event API Gateway sends for a JSON request."""
        import json

        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter import dataset
        from bin_counter.api_function import api_event, smoke_images

        params = run_params(get_current_context())
        s3 = S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
        images = smoke_images(s3, dataset.photos(s3, params["bucket"], data, "test"), params["smoke_images"])
        sent = [{k: i[k] for k in ("key", "count")} for i in images]
        return {"payload": json.dumps(api_event(images)), "images": sent}

    confirmed = confirm_deployment(deploy.output, configs)
    event = smoke_event(data)
    confirmed >> event
    invoke = DigestLambdaInvokeFunctionOperator(
        task_id="invoke_api",
        function_name="{{ stack_name(params, 'function_name') }}",
        payload=event["payload"],
        aws_conn_id=AWS_CONN_ID,
        execution_timeout=timedelta(minutes=5),
    )

    @task(retries=0, execution_timeout=timedelta(minutes=1))
    def smoke_check(answer: str, sent: dict, decision: dict) -> dict:
        import json

        from bin_counter.api_function import SmokeCheckFailed, check_answers

        params = get_current_context()["params"]
        summary = check_answers(answer, sent["images"], params["max_count"] + 1)
        for row in summary["images"]:
            print(
                f"image {row['key']}: true count {row['true']}, API says {row['predicted']} "
                f"(confidence {row['confidence']})"
            )
        expected = decision["model_version"]
        if summary["model_version"] != expected:
            raise SmokeCheckFailed(
                f"the API answered with model {summary['model_version']}, not {expected}: "
                "the endpoint did not switch to the new model"
            )
        print(f"smoke check passed: {json.dumps({k: summary[k] for k in ('model_version', 'correct')})}")
        return summary

    register >> endpoint_config >> deploy
    function = api_function(confirmed, account)
    [function, event] >> invoke
    smoke_check(invoke.output, event, decision)


bin_count_retrain()
