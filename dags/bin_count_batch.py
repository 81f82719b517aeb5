"""bin_count_batch: count every photo under an S3 prefix with SageMaker Batch Transform and report
the bins whose count disagrees with the inventory records."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from bin_counter.alerts import failure_alert
from bin_counter.assets import BIN_COUNT_REPORT
from bin_counter.sagemaker_operators import ResumableTransformOperator
from bin_counter.stack import name_param, run_params

# As in bin_count_retrain: 30 s suits AWS's API limits; the local stack sets a few seconds.
POLL_S = int(os.environ.get("BIN_COUNTER_SAGEMAKER_POLL_S", "30"))
AWS_CONN_ID = "aws_default"
# A nightly audit: a cron expression (e.g. "0 2 * * *") in the scheduler's environment; unset, runs by hand only.
SCHEDULE = os.environ.get("BIN_COUNTER_BATCH_SCHEDULE") or None

DOC = """
### Bin count, batch

Counts every photo under an S3 prefix (a cycle count of thousands of bins) with a SageMaker Batch
Transform job running the same model and `inference.py` the endpoint serves, and joins the answers
with the counts the inventory records expect into one report. Runs by hand with the Params below, or
nightly when the scheduler's environment sets `BIN_COUNTER_BATCH_SCHEDULE` (a cron expression).

1. **model**: the SageMaker model to count with: the `model` Param, else the one the endpoint
   `endpoint_name` serves now (from its endpoint configuration).
2. **photos**: lists the input prefix, reads each photo's expected count (`expected`: ABID's
   `metadata/<id>.json` beside `bin-images/`, the dataset layout's `<count>/` folders, or a CSV /
   JSON lines file of `key,expected`), and writes the job's manifest and the plan under the output
   prefix. A photo bigger than `max_payload_mb` is not sent (SageMaker would fail the whole job on
   it): it is listed in the report as `too_large`.
3. **count**: the transform job, one photo per request. The model answers a photo it cannot count (not
   an image, cut short, corrupt) with its reason instead of an error, so one bad photo never fails
   the job. A retried task attaches to the job its earlier try started.
4. **report**: `report.jsonl` (key, count, confidence, expected, verdict, model version; or the
   error code and message) and `summary.json` beside it; the summary in the task log and in the
   `bin_count_report` asset event. Verdicts are the API's: *match*, *mismatch* or *uncertain* from
   the model's probability of the expected count, with the API function's thresholds.

Output prefix (`output_uri`, default `s3://<bucket>/batch-counts/<run>/`): `input/manifest.json`,
`input/photos.json`, `transform/<photo key>.out`, `report.jsonl`, `summary.json`. A re-run of a run
writes the same report to the same place.

**Alerts**: a task that fails for good publishes to the SNS topic in the Airflow Variable
`bin_counter_alerts_topic`, as the other DAGs do.

**When a task fails**
- *model*: the `model` Param names a model SageMaker does not know, or (without it) the endpoint does
  not exist yet: run `bin_count_retrain` first.
- *photos*: nothing under the input prefix, an `expected` file that cannot be read, or every photo
  above `max_payload_mb`.
- *transform_config*: the account's quota "<type> for transform job usage" is below `instance_count`
  (the message links the page that raises it).
- *count*: the job failed as a whole (its FailureReason is in the log): a model that does not load, an
  instance type without quota, a role that may not read the input or write the output.
- *report*: the outputs could not be read; clear the task to retry: it only reads and writes S3.
"""


@dag(
    dag_id="bin_count_batch",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    doc_md=DOC,
    tags=["bin-counter", "batch", "inference"],
    default_args={
        "owner": "bin-counter",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(minutes=30),
        "on_failure_callback": failure_alert(),
    },
    params={
        "bucket": name_param("bucket", "Our S3 bucket: the default output prefix and, without input_uri, the dataset"),
        "input_uri": Param(
            None,
            type=["null", "string"],
            pattern="^s3://",
            description="The photos to count: every object under this s3:// prefix, or the photos a "
            "dataset's .manifest lists. Empty: the test photos of the newest dataset",
        ),
        "expected": Param(
            "auto",
            type="string",
            description="Each photo's expected count: 'abid_metadata' (metadata/<id>.json beside "
            "bin-images/), 'dataset_folders' (<count>/<photo>), an s3:// URI of a CSV "
            "(key,expected) or JSON lines file, 'none', or 'auto' (ABID metadata for a "
            "dataset's manifest or a bin-images/ prefix, a copied dataset's folders, else "
            "none)",
        ),
        "output_uri": Param(
            None,
            type=["null", "string"],
            pattern="^s3://",
            description="Where the outputs and the report go. Empty: s3://<bucket>/batch-counts/<run>/",
        ),
        "model": Param(
            None,
            type=["null", "string"],
            description="The SageMaker model to count with. Empty: the one endpoint_name serves now",
        ),
        "endpoint_name": name_param("endpoint_name", "The endpoint whose model counts when no model is given"),
        "instance_type": Param(
            "ml.m5.xlarge", type="string", description="Transform instance type (CPU: the model's image is the CPU one)"
        ),
        "instance_count": Param(
            1,
            type="integer",
            minimum=1,
            maximum=20,
            description="Transform instances; the photos are shared out between them",
        ),
        "max_concurrent_transforms": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=100,
            description="Photos in flight per instance. Empty: one per model worker, i.e. the instance "
            "type's vCPUs from its size name (TorchServe starts one worker per vCPU), at most "
            "100 / max_payload_mb (SageMaker's limit); 1 for a size without a vCPU count",
        ),
        "max_payload_mb": Param(
            6,
            type="integer",
            minimum=1,
            # 6: TorchServe in the model's image takes at most 6,553,500 bytes per request (its default
            # max_request_size, which the image leaves as it is) and answers 413 to more, failing the job.
            maximum=6,
            description="Largest photo sent, in MB of 10^6 bytes (at most 6: the model server in the "
            "image takes no more); bigger photos are reported as too_large",
        ),
    },
)
def bin_count_batch():
    @task(execution_timeout=timedelta(minutes=2))
    def model() -> dict:
        """The model to count with, and where it comes from."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from bin_counter.batch import batch_model

        params = run_params(get_current_context())
        found = batch_model(SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, params["model"], params["endpoint_name"])
        print(f"counting with model {found['model']} ({found['model_data_url']}), from {found['source']}")
        return found

    @task(execution_timeout=timedelta(minutes=30))
    def photos() -> dict:
        """The photos and their expected counts; the job's manifest written under the output prefix."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter import batch
        from bin_counter.dataset import resolve_dataset

        context = get_current_context()
        params = run_params(context)
        s3 = S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
        input_uri = params["input_uri"]
        if not input_uri:
            data = resolve_dataset(s3, params["bucket"], None, None)
            input_uri = data["channels"]["test"]
            print(f"no input_uri: counting the test photos of dataset {data['version']}")
        output_uri = params["output_uri"] or batch.run_output_uri(
            params["bucket"], context["dag"].dag_id, context["run_id"]
        )
        expected = batch.expected_source(params["expected"], not params["input_uri"], input_uri)
        plan = batch.prepare(s3, input_uri, output_uri, expected, params["max_payload_mb"])
        print(
            f"{plan['photos']} objects under {input_uri}: {plan['sent']} sent to the model, {plan['refused']} "
            f"too large to send; expected counts for {plan['with_expected']} ({expected}); "
            f"outputs under {plan['output_uri']}"
        )
        return plan

    @task(execution_timeout=timedelta(minutes=1))
    def transform_config(found: dict, plan: dict) -> dict:
        """The transform job's request, once the account's quota for its instances is checked."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        from bin_counter.account import check_quotas, sagemaker_quota_needs
        from bin_counter.batch import REFUSALS_ENVIRONMENT
        from bin_counter.sagemaker_config import resource_tags, run_job_names, transform_job_config

        context = get_current_context()
        params = run_params(context)
        quotas = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="service-quotas")
        needs = sagemaker_quota_needs(
            transform_instance_type=params["instance_type"], transform_instances=params["instance_count"]
        )
        check_quotas(quotas.get_conn(), quotas.conn_region_name, needs)
        name = run_job_names(context["dag"].dag_id, context["run_id"])["transform_job"]
        return transform_job_config(
            name,
            found["model"],
            plan["manifest_uri"],
            plan["transform_output_uri"],
            params["instance_type"],
            params["instance_count"],
            params["max_concurrent_transforms"],
            params["max_payload_mb"],
            environment=REFUSALS_ENVIRONMENT,
            tags=resource_tags({"bin-counter:dag-run": context["run_id"], "bin-counter:input": plan["input_uri"]}),
        )

    found, plan = model(), photos()
    count = ResumableTransformOperator(
        task_id="count",
        config=transform_config(found, plan),
        aws_conn_id=AWS_CONN_ID,
        check_interval=POLL_S,
        check_if_model_exists=False,
        execution_timeout=timedelta(hours=12),
        doc_md="The transform job (SageMaker console: Inference > Batch transform jobs). A failed job's "
        "FailureReason is in this task's log.",
    )

    @task(outlets=[BIN_COUNT_REPORT], execution_timeout=timedelta(minutes=30))
    def report(counted: dict, plan: dict, found: dict) -> dict:
        """report.jsonl and summary.json; the summary in the log and the asset event."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter.batch import summary_lines, write_report

        summary = write_report(S3Hook(aws_conn_id=AWS_CONN_ID).get_conn(), plan, counted["Transform"], found)
        for line in summary_lines(summary):
            print(line)
        event = {k: v for k, v in summary.items() if k != "failures"}
        get_current_context()["outlet_events"][BIN_COUNT_REPORT].extra = event
        return event

    report(count.output, plan, found)


bin_count_batch()
