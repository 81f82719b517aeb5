"""bin_count_teardown: stop paying for the endpoint when asked, and delete what runs leave behind."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from bin_counter.alerts import failure_alert
from bin_counter.stack import name_param, run_params

# How often to ask SageMaker whether the endpoint is gone: 30 s suits AWS's API limits; the local
# stack sets a few seconds.
POLL_S = int(os.environ.get("BIN_COUNTER_SAGEMAKER_POLL_S", "30"))
AWS_CONN_ID = "aws_default"
# Models kept whatever their age: after a teardown nothing serves, and without this the next weekly
# run would delete the model an operator needs to redeploy.
KEEP_LATEST_MODELS = 2

DOC = """
### Bin count teardown and clean-up

Keeps the bill down. Runs weekly and only cleans up; set `delete_endpoint` by hand to stop paying for
the endpoint too. `dry_run` lists everything it would delete and deletes nothing.

1. **endpoint**: with `delete_endpoint` on, deletes the SageMaker endpoint `endpoint_name` (the
   instance billed by the hour) and waits until it is gone, then the endpoint configuration it
   served (unless another endpoint serves it too), and the endpoint's alarms (rollback and live
   quality); its autoscaling (Application Auto Scaling's scalable target and policy) is deregistered
   first. The model stays: it costs nothing, and an operator redeploys by triggering `bin_count_deploy` (any approved
   version of the Model Registry). The registry keeps every version. The Lambda function stays too;
   until an endpoint serves again the API answers with errors. With `delete_endpoint` off, it only
   says what the endpoint serves.
2. **expired_models**: the project's SageMaker models (`bin-counter-...`) older than
   `retention_days` that no endpoint serves, and their endpoint configurations, are deleted. Kept
   always: what any endpoint serves, the model the endpoint served when step 1 deleted it, and the
   newest two models, so there is always one to redeploy.
3. **expired_objects**: in the bucket, objects under `models/tuning/` (tuning trials' model
   artifacts) and `checkpoints/` older than `retention_days` are deleted, 1000 per request.
   Never touched: `datasets/`, `code/`, `models/published/` and the final training jobs' artifacts
   under `models/<job>/`, which registered models point at.

Each task prints every name or key it deleted (or would delete) and a one-line summary. Everything
here is idempotent: a retry, or a second run, deletes what is left and finds nothing else.

**When a task fails**
- *endpoint*: SageMaker refused the deletion (the log quotes its error: often a missing
  `sagemaker:DeleteEndpoint` or `sagemaker:DeleteEndpointConfig` permission), or the endpoint did not
  disappear within 15 minutes: check its status in the console. A retry starts again from what is left.
- *expired_models*: the log lists each model or configuration SageMaker refused to delete, with its
  error code; the others were deleted. Usually a missing permission (`sagemaker:DeleteModel`).
- *expired_objects*: the log lists each key S3 refused to delete with its error code (often
  `AccessDenied`: the role lacks `s3:DeleteObject` on the prefix); the others were deleted.
  On a versioned bucket the deleted objects' old versions remain; an S3 lifecycle rule expires them.
"""


def _print_names(verb: str, kind: str, names: list[str]) -> None:
    for name in names:
        print(f"{verb} {kind} {name}")


@dag(
    dag_id="bin_count_teardown",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=DOC,
    tags=["bin-counter", "costs"],
    default_args={
        "owner": "bin-counter",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(minutes=10),
        "on_failure_callback": failure_alert(),
    },
    params={
        "bucket": name_param("bucket", "Our S3 bucket: expired trial artifacts and checkpoints are deleted from it"),
        "endpoint_name": name_param("endpoint_name", "The SageMaker endpoint the API calls"),
        "delete_endpoint": Param(
            False,
            type="boolean",
            description="On: delete the endpoint and its configuration to stop paying for it "
            "(the model is kept). Off (scheduled runs): only clean up",
        ),
        "retention_days": Param(
            14,
            type="integer",
            minimum=1,
            description="Models, trial artifacts and checkpoints older than this many days are deleted",
        ),
        "dry_run": Param(False, type="boolean", description="On: list what would be deleted, delete nothing"),
    },
)
def bin_count_teardown():
    @task(execution_timeout=timedelta(minutes=20))
    def endpoint() -> dict:
        """Delete the endpoint when asked; otherwise say what it serves. Returns the models it served,
        which the next task keeps."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.cleanup import delete_endpoint, delete_endpoint_alarms
        from bin_counter.endpoint import serving_model
        from bin_counter.rollout import VARIANT
        from bin_counter.scaling import deregister

        params = run_params(get_current_context())
        sm = SageMakerHook(aws_conn_id=AWS_CONN_ID).conn
        if not params["delete_endpoint"]:
            found = serving_model(sm, params["endpoint_name"])
            print(
                f"endpoint {params['endpoint_name']} serves {found['model']} ({found['status']}); not deleting it "
                "(delete_endpoint is off)"
                if found
                else f"endpoint {params['endpoint_name']}: none, or one that serves nothing (Failed or OutOfService, "
                "logged above; delete_endpoint deletes it); delete_endpoint is off"
            )
            return {"deleted": False, "models_kept": [found["model"]] if found else []}
        # Its autoscaling first: AWS deregisters a deleted endpoint's variant only for a caller allowed
        # to (endpoint-delete-with-scaling.html); saying so here keeps nothing registered by surprise.
        autoscaling = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="application-autoscaling").get_conn()
        if params["dry_run"]:
            print("would deregister the endpoint's autoscaling, if it has any")
        elif deregister(autoscaling, params["endpoint_name"], VARIANT):
            print("deregistered the endpoint's autoscaling")
        report = delete_endpoint(sm, params["endpoint_name"], params["dry_run"], poll_s=POLL_S)
        print(report["summary"])  # names the endpoint, its configuration and the model(s) kept
        cloudwatch = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="cloudwatch").get_conn()
        alarms = delete_endpoint_alarms(cloudwatch, params["endpoint_name"], params["dry_run"])
        verb = "would delete" if params["dry_run"] else "deleted"
        print(f"{verb} the endpoint's alarms: {', '.join(alarms)}" if alarms else "the endpoint had no alarms")
        return {k: report[k] for k in ("deleted", "models_kept")}

    @task
    def expired_models(endpoint_report: dict) -> dict:
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter import cleanup

        params = run_params(get_current_context())
        sm = SageMakerHook(aws_conn_id=AWS_CONN_ID).conn
        kept = cleanup.serving_models(sm) | set(endpoint_report["models_kept"])
        older_than = cleanup.retention_cutoff(params["retention_days"])
        expired = cleanup.expired_models(sm, kept, older_than, keep_latest=KEEP_LATEST_MODELS)
        result = cleanup.delete_models(sm, expired, params["dry_run"])
        verb = "would delete" if params["dry_run"] else "deleted"
        _print_names(verb, "endpoint config", result["endpoint_configs"])
        _print_names(verb, "model", result["models"])
        for error in result["errors"]:
            print(f"could not delete {error['kind']} {error['name']}: {error['code']}: {error['message']}")
        print(
            f"{verb} {len(result['models'])} model(s) and {len(result['endpoint_configs'])} endpoint "
            f"configuration(s) created before {older_than.isoformat()}; kept whatever their age: "
            f"{', '.join(sorted(kept)) or 'nothing serving'}, and the newest {KEEP_LATEST_MODELS} model(s); "
            f"{len(result['errors'])} error(s)"
        )
        if result["errors"]:
            raise RuntimeError(f"{len(result['errors'])} deletion(s) failed (listed above); the rest were deleted")
        return {k: len(result[k]) for k in ("models", "endpoint_configs")}

    @task(execution_timeout=timedelta(minutes=30))
    def expired_objects() -> dict:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter import cleanup

        params = run_params(get_current_context())
        s3 = S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
        older_than = cleanup.retention_cutoff(params["retention_days"])
        found = cleanup.expired_objects(s3, params["bucket"], older_than)
        result = cleanup.delete_objects(s3, params["bucket"], [o["key"] for o in found], params["dry_run"])
        verb = "would delete" if params["dry_run"] else "deleted"
        for key in result["deleted"]:
            print(f"{verb} s3://{params['bucket']}/{key}")
        failed = {e["key"] for e in result["errors"]}
        for error in result["errors"]:
            print(f"could not delete s3://{params['bucket']}/{error['key']}: {error['code']}: {error['message']}")
        size = sum(o["size"] for o in found if o["key"] not in failed)
        print(
            f"{verb} {len(result['deleted'])} object(s), {size / 1e6:.1f} MB, under "
            f"{', '.join(cleanup.EXPIRING_PREFIXES)} last written before {older_than.isoformat()}; "
            f"{len(result['errors'])} error(s)"
        )
        if result["errors"]:
            raise RuntimeError(f"{len(result['errors'])} object(s) could not be deleted (listed above)")
        return {"objects": len(result["deleted"]), "bytes": size}

    expired_models(endpoint())
    expired_objects()


bin_count_teardown()
