"""bin_count_deploy: roll an approved model package version out to the endpoint, safely; the on-call's
rollback button."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from bin_counter.alerts import failure_alert
from bin_counter.assets import BIN_COUNT_MODEL
from bin_counter.lambda_operators import DigestLambdaInvokeFunctionOperator
from bin_counter.sagemaker_operators import RolloutEndpointOperator
from bin_counter.stack import name_param, run_params, stack_name

POLL_S = int(os.environ.get("BIN_COUNTER_SAGEMAKER_POLL_S", "30"))
AWS_CONN_ID = "aws_default"
WHAT, HOW, GUARDRAILS = "What to deploy, and why", "Rollout", "Guardrails and smoke check"
CAPTURE = "Data capture"
SIZE = "Size and cost"

DOC = """
### Bin count deployment

Puts one **approved** version of the endpoint's model package group (`<endpoint>-models` in the
SageMaker Model Registry) on the endpoint. It runs by itself when `bin_count_retrain` announces an
approved version (the `bin_count_model` asset), and by hand to **roll back**: trigger it with the
earlier version's number in `model_package` and say why in `reason`. It is the only way anything
reaches the endpoint.

1. **version**: the version to deploy (the `model_package` Param, else the asset event's, else the
   newest Approved one) and what it is (image, artifact, model version, dataset). A version that is
   not Approved is refused.
2. **settings**, **serving_before**: roles and images, the endpoint instance type (a CPU one) and its
   quota (an update runs two fleets at once), the API function; and the configuration serving now,
   the one to come back to.
3. **requests**, **model_and_config**, **alarms**: the SageMaker model of the version (one per version,
   reused by a rollback to it), an endpoint configuration with `instance_count` instances (and
   SageMaker's data capture of `capture_percent` of the requests, README "Data capture"), and the
   endpoint's two CloudWatch alarms: `<endpoint>-invocation-5xx-errors` (model errors in a minute)
   and `<endpoint>-model-latency` (average model latency in a minute).
4. **deploy**: the endpoint is created the first time; afterwards it is updated blue/green: the new
   fleet starts beside the old one, takes `canary_percent` of the traffic (or `linear_step_percent`
   more at each step, or everything at once) for `bake_minutes` while SageMaker watches the alarms,
   then everything. An alarm in ALARM during a bake makes SageMaker roll back: the old fleet takes
   all the traffic again.
5. **confirm_deployment**: the endpoint serves the new configuration. A rollback (alarm, failed
   health check) fails the run here with SageMaker's FailureReason, and the version is marked
   Rejected.
   **pause_autoscaling** (before deploy) and **autoscaling** (after): an update that changes the
   instance type or goes serverless first deregisters the variant's autoscaling (SageMaker refuses it
   otherwise); once the new configuration serves and has passed its smoke check (step 6),
   Application Auto Scaling keeps the instance count between `min_instances` and `max_instances` on
   invocations per instance (none for `serving` serverless: it scales by itself, up to
   `serverless_max_concurrency`). If such an update fails or is undone, the endpoint serves the old
   configuration without autoscaling: trigger this DAG with the serving version to register it again.
6. **api_function**, **smoke_event**, **invoke_api**, **smoke_check**: the Lambda function is pointed
   at the endpoint and real test photos go through the API. A malformed answer, an error, or an
   answer from another model fails the check, and the check **undoes the deployment**: the endpoint
   goes back to the configuration that served before, the version is marked Rejected, and the alert
   says so. On a first deployment there is nothing to go back to: the alert says plainly that the
   endpoint serves a model that failed its check.

**Rolling back by hand**: Trigger DAG w/ config, `model_package` = the version number that served
well (the registry lists them: SageMaker console > Model registry, or `aws sagemaker
list-model-packages --model-package-group-name <endpoint>-models`), `reason` = why. It deploys with
the same guardrails.

**Why two instances or more** (`instance_count`): SageMaker spreads an endpoint's instances over
Availability Zones, so one zone's outage or one instance's replacement leaves the other serving; a
canary turns on whole instances, at most half the fleet (one instance takes no canary: the run is
refused before anything is created; deploy it with `rollout` all_at_once); and a
second instance doubles the answers per second. One instance suits a test endpoint only.

**When a task fails**
- *version*: no Approved version yet (run `bin_count_retrain`), a version number the group does not
  have (the message lists the versions), or a version that is Rejected or PendingManualApproval.
- *settings*: the endpoint instance type is a GPU one, its quota is short, or the API function is
  missing (see bin_count_retrain's notes for the Variable).
- *deploy*: the endpoint did not become InService. A failed creation leaves it Failed; the next try
  deletes it and creates it again.
- *confirm_deployment*: SageMaker rolled the update back; the old model serves (the API is
  unaffected). The message quotes the FailureReason: an alarm (the alarm's name says which) or a
  model that failed its health check. The version is Rejected.
- *smoke_check*: the new model answered wrongly; the endpoint was put back on the configuration that
  served before (the message says which, and which version is Rejected).
"""


@dag(
    dag_id="bin_count_deploy",
    schedule=[BIN_COUNT_MODEL],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_macros={"stack_name": stack_name},
    doc_md=DOC,
    tags=["bin-counter", "deployment"],
    default_args={
        "owner": "bin-counter",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(minutes=10),
        "on_failure_callback": failure_alert(),
    },
    params={
        "model_package": Param(
            None,
            type=["null", "string"],
            description="The model package version to deploy: its number (e.g. 3) or ARN. To roll back, "
            "the number of the version that served well. Empty: the version the triggering "
            "event announced, else the newest Approved one",
            section=WHAT,
        ),
        "reason": Param(
            None,
            type=["null", "string"],
            description="Why (kept as a tag on the endpoint configuration and in the log), e.g. "
            '"roll back: v7 answers 0 for full bins"',
            section=WHAT,
        ),
        "endpoint_name": name_param(
            "endpoint_name", "The SageMaker endpoint the API calls", from_event="model", section=WHAT
        ),
        "bucket": name_param(
            "bucket", "Our S3 bucket (test photos for the smoke check)", from_event="model", section=WHAT
        ),
        "function_name": name_param(
            "function_name", "The Lambda function in front of the endpoint (the API stack's)", section=WHAT
        ),
        "rollout": Param(
            "canary",
            enum=["canary", "linear", "all_at_once"],
            description="canary: canary_percent of the traffic to the new model for bake_minutes, then all; "
            "linear: linear_step_percent more at each step, each baked; all_at_once: all, then one bake. "
            "Each bake watches the alarms; an alarm rolls back",
            section=HOW,
        ),
        "canary_percent": Param(
            50, type="integer", minimum=1, maximum=50, description="canary: share of capacity", section=HOW
        ),
        "linear_step_percent": Param(
            25, type="integer", minimum=10, maximum=50, description="linear: share added at each step", section=HOW
        ),
        "bake_minutes": Param(
            10.0,
            type="number",
            minimum=0,
            maximum=60,
            description="How long each step runs under the alarms' watch before the next",
            section=HOW,
        ),
        "termination_wait_minutes": Param(
            5.0,
            type="number",
            minimum=0,
            maximum=60,
            description="How long the old fleet is kept after the switch (a manual rollback within it is quick)",
            section=HOW,
        ),
        "endpoint_instance_type": Param(
            "ml.m5.large", type="string", description="Instance serving the endpoint (CPU)", section=HOW
        ),
        "instance_count": Param(
            2,
            type="integer",
            minimum=1,
            maximum=10,
            description="Instances behind the endpoint; two or more in production (see the DAG's notes)",
            section=HOW,
        ),
        "serving_workers": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=64,
            description="Model workers per instance (SAGEMAKER_MODEL_SERVER_WORKERS). Empty: TorchServe's "
            "one per vCPU; 1: one worker on every core. BENCHMARKS.md, 'Serving fast'",
            section=HOW,
        ),
        "serving": Param(
            "instances",
            enum=["instances", "serverless"],
            description="instances: instance_count always-on instances of endpoint_instance_type, autoscaled between "
            "min_instances and max_instances. serverless: SageMaker Serverless Inference, billed per request and "
            "scaled to zero when idle, with a cold start after idle; all_at_once rollouts only, no data capture, "
            "a 4 MB body limit (README, 'Cost')",
            section=SIZE,
        ),
        "min_instances": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=10,
            description="Autoscaling: fewest instances. Empty: instance_count",
            section=SIZE,
        ),
        "max_instances": Param(
            4,
            type=["null", "integer"],
            minimum=1,
            maximum=10,
            description="Autoscaling: most instances (the account's endpoint instance quota must hold them). "
            "Empty: no autoscaling, instance_count always",
            section=SIZE,
        ),
        "target_invocations_per_instance": Param(
            900,
            type="number",
            exclusiveMinimum=0,
            description="Autoscaling: invocations per instance per minute to keep near "
            "(SageMakerVariantInvocationsPerInstance). AWS's rule: peak answers/s of one instance x 0.5 x 60; "
            "about 30/s on ml.m5.large (BENCHMARKS.md, 'Serving fast') gives 900",
            section=SIZE,
        ),
        "scale_out_cooldown_s": Param(
            60, type="integer", minimum=0, description="Autoscaling: seconds between scale-outs", section=SIZE
        ),
        "scale_in_cooldown_s": Param(
            300, type="integer", minimum=0, description="Autoscaling: seconds between scale-ins", section=SIZE
        ),
        "serverless_memory_mb": Param(
            2048,
            enum=[1024, 2048, 3072, 4096, 5120, 6144],
            description="serverless: memory (MB); SageMaker gives vCPUs in proportion",
            section=SIZE,
        ),
        "serverless_max_concurrency": Param(
            5,
            type="integer",
            minimum=1,
            maximum=200,
            description="serverless: requests served at once; more are throttled (ThrottlingException, the API's 503)",
            section=SIZE,
        ),
        "max_5xx_per_minute": Param(
            1,
            type="integer",
            minimum=1,
            description="Alarm: model errors (5xx) in a minute that roll a deployment back",
            section=GUARDRAILS,
        ),
        "max_model_latency_ms": Param(
            2000,
            type="number",
            exclusiveMinimum=0,
            description="Alarm: average model latency in a minute (ms) that rolls a deployment back",
            section=GUARDRAILS,
        ),
        "smoke_images": Param(
            6,
            type="integer",
            minimum=1,
            maximum=8,
            description="Test photos sent through the API after deploying",
            section=GUARDRAILS,
        ),
        "capture_percent": Param(
            20,
            type="integer",
            minimum=0,
            maximum=100,
            description="Share of requests (%) the endpoint records, photo and answer, in s3://<bucket>/captures "
            "for bin_count_monitor and the next dataset (README, 'Data capture'); 0 turns capture off. 20 is "
            "the SageMaker SDK's default: a few hundred photos a day at a few thousand requests; raise it "
            "when traffic is low",
            section=CAPTURE,
        ),
    },
)
def bin_count_deploy():
    @task(retries=0, execution_timeout=timedelta(minutes=2))
    def version() -> dict:
        """The Approved version to deploy, and what it is."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter import registry
        from bin_counter.stack import asset_event_extra

        context = get_current_context()
        params = run_params(context)
        sm = SageMakerHook(aws_conn_id=AWS_CONN_ID).conn
        group = registry.group_name(params["endpoint_name"])
        event = asset_event_extra(context, BIN_COUNT_MODEL) or {}
        spec = params["model_package"] or event.get("arn")
        arn = registry.version_arn(sm, group, spec) if spec else registry.newest_approved(sm, group)
        if arn is None:
            raise registry.RegistryError(
                f"model package group {group} has no Approved version: run bin_count_retrain (or approve a version)"
            )
        chosen = registry.deployable(sm, arn)
        print(
            f"deploying version {chosen['version']} of {group}: model {chosen['model_version']}, trained by "
            f"{chosen['training_job']} on dataset {chosen['dataset_version']}; why: "
            f"{params['reason'] or ('announced by ' + event['arn'] if event else 'newest approved')}"
        )
        return chosen

    @task(retries=0, execution_timeout=timedelta(minutes=1))
    def settings() -> dict:
        """Roles and images, the endpoint's instance type and quota, the API function."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.providers.amazon.aws.hooks.lambda_function import LambdaHook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.account import check_quotas, sagemaker_quota_needs, sagemaker_settings
        from bin_counter.api_function import check_function_deployed
        from bin_counter.endpoint import describe_endpoint
        from bin_counter.stack import dags_create_the_function, stack_variable

        region = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="sagemaker").conn_region_name
        params, variable = run_params(get_current_context()), stack_variable()
        account = sagemaker_settings(variable, region, endpoint_instance_type=params["endpoint_instance_type"])
        serving = describe_endpoint(SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, params["endpoint_name"])
        needs = sagemaker_quota_needs(
            endpoint_instance_type=params["endpoint_instance_type"],
            # A serverless endpoint runs on no instances of the account's quota.
            endpoint_instances=0 if params.get("serving") == "serverless" else params["instance_count"],
            endpoint_update=bool(serving and serving["EndpointStatus"] == "InService"),
        )
        check_quotas(AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="service-quotas").get_conn(), region, needs)
        account["create_function"] = dags_create_the_function(variable)
        if not account["create_function"]:
            check_function_deployed(LambdaHook(aws_conn_id=AWS_CONN_ID).conn, params["function_name"])
        print(
            f"endpoint {params['endpoint_name']} ({params['instance_count']} x {params['endpoint_instance_type']}), "
            f"API function {params['function_name']}, SageMaker role {account['role_arn']}"
        )
        return account

    @task(execution_timeout=timedelta(minutes=2))
    def serving_before() -> dict | None:
        """What the endpoint serves now: the configuration a failed smoke check comes back to."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.endpoint import serving_model

        found = serving_model(
            SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, run_params(get_current_context())["endpoint_name"]
        )
        print(f"serving now: {found}" if found else "nothing serves yet: this is the first deployment")
        return found

    @task(execution_timeout=timedelta(minutes=1))
    def requests(chosen: dict, account: dict) -> dict:
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.endpoint import describe_endpoint
        from bin_counter.rollout import deployment_requests
        from bin_counter.sagemaker_config import run_digest

        context = get_current_context()
        params = run_params(context)
        exists = describe_endpoint(SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, params["endpoint_name"]) is not None
        return deployment_requests(
            chosen,
            params,
            account["role_arn"],
            run_digest(context["dag"].dag_id, context["run_id"]),
            endpoint_exists=exists,
            reason=params["reason"],
        )

    @task(execution_timeout=timedelta(minutes=2))
    def model_and_config(built: dict) -> str:
        """The version's SageMaker model (reused when it exists: a rollback to it) and the run's
        endpoint configuration (kept when a retried task finds it)."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.rollout import ensure_model_and_config

        return ensure_model_and_config(SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, built)

    @task(execution_timeout=timedelta(minutes=2))
    def alarms(built: dict) -> list[str]:
        """The endpoint's alarms, created or updated (PutMetricAlarm replaces an alarm of that name)."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        cloudwatch = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="cloudwatch").get_conn()
        for alarm in built["alarms"]:
            cloudwatch.put_metric_alarm(**alarm)
            print(f"alarm {alarm['AlarmName']}: {alarm['AlarmDescription']}")
        return [a["AlarmName"] for a in built["alarms"]]

    @task(execution_timeout=timedelta(minutes=2))
    def pause_autoscaling(built: dict) -> str | None:
        """Deregister the endpoint's autoscaling when the update changes what it scales (AWS refuses an
        update that changes a scaled variant's instance type; a serverless one has no instance count).
        A new model on the same instances keeps it (endpoint-scaling-update.html)."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.endpoint import describe_endpoint
        from bin_counter.rollout import VARIANT
        from bin_counter.scaling import deregister, update_needs_deregistering

        sm = SageMakerHook(aws_conn_id=AWS_CONN_ID).conn
        endpoint = built["endpoint"]["EndpointName"]
        serving = describe_endpoint(sm, endpoint)
        if not serving or not serving.get("EndpointConfigName"):
            return None
        old = sm.describe_endpoint_config(EndpointConfigName=serving["EndpointConfigName"])["ProductionVariants"][0]
        why = update_needs_deregistering(old, built["endpoint_config"]["ProductionVariants"][0])
        autoscaling = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="application-autoscaling").get_conn()
        if why and deregister(autoscaling, endpoint, VARIANT):
            print(f"autoscaling deregistered before the update: {why}")
            return why
        return None

    @task(execution_timeout=timedelta(minutes=2))
    def autoscaling(checked: dict, built: dict) -> str:
        """Target-tracking autoscaling of the instance count (Application Auto Scaling), once the
        endpoint serves the new configuration and it passed its smoke check; none for a serverless
        endpoint or max_instances empty."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        from bin_counter.rollout import VARIANT
        from bin_counter.scaling import apply, deregister

        autoscaling = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="application-autoscaling").get_conn()
        if built.get("scaling") is None:
            gone = deregister(autoscaling, built["endpoint"]["EndpointName"], VARIANT)
            said = "no autoscaling (serverless, or max_instances empty)" + (
                "; deregistered the old one" if gone else ""
            )
        else:
            said = apply(autoscaling, built["scaling"])
        print(said)
        return said

    chosen, account, before = version(), settings(), serving_before()
    built = requests(chosen, account)
    deploy = RolloutEndpointOperator(
        task_id="deploy",
        config=built,
        operation="create",
        aws_conn_id=AWS_CONN_ID,
        wait_for_completion=True,
        check_interval=POLL_S,
        max_ingestion_time=3600,
        execution_timeout=timedelta(hours=9),
        doc_md="Creates the endpoint the first time; afterwards updates it blue/green with the run's rollout "
        "and its alarms. A Failed endpoint is deleted and created again.",
    )
    # What served before is read before the endpoint changes: a failed smoke check goes back to it.
    [model_and_config(built), alarms(built), before, pause_autoscaling(built)] >> deploy

    @task(retries=0, execution_timeout=timedelta(minutes=5))
    def confirm_deployment(deployed: dict, built: dict, chosen: dict) -> dict:
        """The endpoint serves the new configuration; after a rollback, the version is Rejected."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter import registry
        from bin_counter.endpoint import DeploymentFailed
        from bin_counter.endpoint import confirm_deployment as confirm

        sm = SageMakerHook(aws_conn_id=AWS_CONN_ID).conn
        wanted = built["endpoint"]
        try:
            state = confirm(sm, wanted["EndpointName"], wanted["EndpointConfigName"])
        except DeploymentFailed as exc:
            registry.set_status(sm, chosen["arn"], registry.REJECTED, f"deployment rolled back: {exc}")
            raise DeploymentFailed(
                f"{exc}. Model package version {chosen['version']} is now Rejected; the endpoint keeps what "
                "served before."
            ) from exc
        print(f"endpoint {state['endpoint']} serves {state['endpoint_config']} (version {chosen['version']})")
        return state

    @task(execution_timeout=timedelta(minutes=5))
    def api_function(confirmed: dict, account: dict) -> str:
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
            endpoint_kind=params.get("serving") or "instances",
        )

    @task(multiple_outputs=True, execution_timeout=timedelta(minutes=5))
    def smoke_event(chosen: dict) -> dict:
        """A few real test photos of the version's dataset, as the event API Gateway sends for a JSON request."""
        import json

        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter import dataset
        from bin_counter.api_function import api_event, smoke_images

        params = run_params(get_current_context())
        s3 = S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
        data = dataset.resolve_dataset(s3, params["bucket"], chosen["dataset_version"], None)
        images = smoke_images(s3, dataset.photos(s3, params["bucket"], data, "test"), params["smoke_images"])
        sent = [{k: i[k] for k in ("key", "count")} for i in images]
        return {"payload": json.dumps(api_event(images)), "images": sent}

    confirmed = confirm_deployment(deploy.output, built, chosen)
    event = smoke_event(chosen)
    confirmed >> event
    invoke = DigestLambdaInvokeFunctionOperator(
        task_id="invoke_api",
        function_name="{{ stack_name(params, 'function_name') }}",
        payload=event["payload"],
        aws_conn_id=AWS_CONN_ID,
        execution_timeout=timedelta(minutes=5),
    )

    @task(retries=0, execution_timeout=timedelta(hours=1))
    def smoke_check(answer: str, sent: dict, chosen: dict, before: dict | None) -> dict:
        """The API answers well-formed counts from the new model; else the deployment is undone."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.api_function import SmokeCheckFailed, check_answers
        from bin_counter.rollout import undo_deployment

        params = run_params(get_current_context())
        try:
            summary = check_answers(answer, sent["images"], None)
            for row in summary["images"]:
                print(
                    f"image {row['key']}: true count {row['true']}, API says {row['predicted']} "
                    f"(confidence {row['confidence']})"
                )
            if summary["model_version"] != chosen["model_version"]:
                raise SmokeCheckFailed(
                    f"the API answered with model {summary['model_version']}, not {chosen['model_version']}"
                )
        except SmokeCheckFailed as exc:
            undone = undo_deployment(
                SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, params["endpoint_name"], chosen, before, str(exc), POLL_S
            )
            raise SmokeCheckFailed(f"smoke check failed: {exc}. {undone}") from exc
        print(
            f"smoke check passed: version {chosen['version']}, model {summary['model_version']}, {summary['correct']}"
        )
        return summary

    function = api_function(confirmed, account)
    [function, event] >> invoke
    # Autoscaling only once the smoke check has passed: an undo then meets no registration made for
    # the configuration it leaves (AWS refuses an update that changes a scaled variant's instance type).
    autoscaling(smoke_check(invoke.output, event, chosen, before), built)


bin_count_deploy()
