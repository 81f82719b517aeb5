"""bin_count_batch run whole with dag.test() against the local stack: moto for S3, the stand-in's
transform jobs serving the published model through AWS's inference toolkit and the model's own
inference.py, on generated photos in ABID's layout with a corrupt photo and a file that is no photo."""

from __future__ import annotations

import json

import pendulum
import pytest

from bin_counter import batch
from bin_counter.sagemaker_config import run_job_names, transform_job_config
from bin_counter.sagemaker_operators import ResumableTransformOperator
from tests.airflow_side.conftest import CONTAINER_PYTHON, ENDPOINT, dag_without_retries, sagemaker_client, wait_endpoint
from tests.airflow_side.machines import assert_ran_apart
from tests.conftest import REPO, make_bin_image

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")

MODEL = "bin-counter-published-batch"
PHOTOS = "audits/night/bin-images/"
GOOD = {"00001": 0, "00002": 1, "00003": 2, "00004": 3}  # key -> the count the records expect


@pytest.fixture
def dag(airflow_db, monkeypatch, pipeline_stack):
    monkeypatch.setenv("BIN_COUNTER_SAGEMAKER_POLL_S", "1")  # read when the DAG file is parsed
    # The stack's Variable: the DAG finds the endpoint (and, unless a test names one, the bucket) there.
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER", pipeline_stack.outputs["SageMakerVariable"])
    return dag_without_retries("bin_count_batch")


@pytest.fixture
def serving(local_stack_connection, s3, bucket, pipeline_stack):
    """The published model registered as the retraining DAG registers one, served by the endpoint."""
    s3.put_object(
        Bucket=bucket, Key="models/published/model.tar.gz", Body=(REPO / "models" / "bin-counter.tar.gz").read_bytes()
    )
    role = json.loads(pipeline_stack.outputs["SageMakerVariable"])["role_arn"]
    sm = sagemaker_client(local_stack_connection)
    sm.create_model(
        ModelName=MODEL,
        ExecutionRoleArn=role,
        PrimaryContainer={
            "Image": "local/pytorch-inference:cpu",
            "ModelDataUrl": f"s3://{bucket}/models/published/model.tar.gz",
            "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
        },
    )
    sm.create_endpoint_config(
        EndpointConfigName=MODEL,
        ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": MODEL, "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}
        ],
    )
    sm.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName=MODEL)
    assert wait_endpoint(sm, ENDPOINT)["EndpointStatus"] == "InService"
    return sm


def upload_audit(s3, bucket: str) -> None:
    """Photos in ABID's layout (bin-images/ and metadata/), one cut short, one that is text."""
    for n, (key, quantity) in enumerate(GOOD.items()):
        s3.put_object(Bucket=bucket, Key=f"{PHOTOS}{key}.jpg", Body=make_bin_image(quantity, 50 + n, size=(224, 224)))
        s3.put_object(
            Bucket=bucket,
            Key=f"audits/night/metadata/{key}.json",
            Body=json.dumps({"EXPECTED_QUANTITY": quantity}).encode(),
        )
    photo = make_bin_image(1, 60, size=(224, 224))
    s3.put_object(Bucket=bucket, Key=f"{PHOTOS}00005.jpg", Body=photo[: len(photo) // 2])
    s3.put_object(Bucket=bucket, Key=f"{PHOTOS}notes.txt", Body=b"bin 00006 was empty, photo retaken tomorrow")


def run_on(day: int) -> dict:
    date = pendulum.datetime(2026, 2, day, tz="UTC")
    return {"run_after": date, "logical_date": date}


def report_of(s3, bucket: str, summary: dict) -> list[dict]:
    key = summary["report"].removeprefix(f"s3://{bucket}/")
    return [json.loads(line) for line in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]


def test_a_night_audit_counts_every_photo_and_lists_the_bad_ones_and_a_retry_never_counts_twice(
    dag, s3, bucket, serving, capfd, separate_machines
):
    upload_audit(s3, bucket)
    conf = {"bucket": bucket, "input_uri": f"s3://{bucket}/{PHOTOS}"}
    run = dag.test(**run_on(1), run_conf=conf)
    log = capfd.readouterr().out
    assert run.state == "success", log[-3000:]
    output = batch.run_output_uri(bucket, "bin_count_batch", run.run_id).removeprefix(f"s3://{bucket}/")
    summary = json.loads(s3.get_object(Bucket=bucket, Key=output + "summary.json")["Body"].read())
    assert (summary["photos"], summary["counted"], summary["failed"]) == (6, 4, 2)
    assert summary["model"] == MODEL  # the endpoint's, found from its configuration
    assert summary["failures_by_reason"] == {"not_an_image": 1, "truncated_image": 1}
    assert sum(summary["verdicts"].values()) == 4 and summary["expected_source"] == "abid_metadata"

    rows = {r["key"].rsplit("/", 1)[1]: r for r in report_of(s3, bucket, summary)}
    assert sorted(rows) == ["00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg", "00005.jpg", "notes.txt"]
    for key, quantity in GOOD.items():
        row = rows[f"{key}.jpg"]
        assert row["expected"] == quantity and row["verdict"] in ("match", "mismatch", "uncertain")
        assert 0 <= row["count"] <= 5 and 0 < row["confidence"] <= 1
        assert row["model_version"] == summary["model_versions"][0]
    assert rows["00005.jpg"]["error"] == "truncated_image" and "cut short" in rows["00005.jpg"]["message"]
    assert rows["notes.txt"]["error"] == "not_an_image" and rows["notes.txt"]["verdict"] == "failed"

    # The job as SageMaker describes it: completed, one photo per record, the answers as <key>.out.
    name = run_job_names("bin_count_batch", run.run_id)["transform_job"]
    job = serving.describe_transform_job(TransformJobName=name)
    assert job["TransformJobStatus"] == "Completed"
    assert job["Environment"] == {"BIN_COUNTER_REFUSALS": "answer"}
    outputs = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="batch-counts/")["Contents"]}
    assert {k for k in outputs if k.endswith(".out")} == {f"{output}transform/{k}.out" for k in rows}
    assert "6 photos under" in log and "not counted, by reason: not_an_image 1, truncated_image 1" in log
    assert "00005.jpg: truncated_image" in log

    # A re-run of the same run: the count task attaches to the finished job (nothing counted twice)
    # and the report is written again, the same.
    first_report = report_of(s3, bucket, summary)
    again = dag.test(**run_on(1), run_conf=conf)
    log = capfd.readouterr().out
    assert again.state == "success", log[-3000:]
    assert f"Transform job {name} was started by an earlier try and is Completed: attaching to it." in log
    assert [j["TransformJobName"] for j in serving.list_transform_jobs()["TransformJobSummaries"]] == [name]
    assert report_of(s3, bucket, summary) == first_report
    # Each task ran on a machine of its own (as on the CeleryExecutor): the manifest, the plan and the
    # outputs went through S3.
    assert_ran_apart(separate_machines, run, again)

    # A retried count task whose first try started the job and died while it ran: it attaches to the
    # running job (the same stand-in and model: a fresh one costs a model worker's start).
    plan = batch.prepare(s3, f"s3://{bucket}/{PHOTOS}", f"s3://{bucket}/batch-counts/retry/", "none", 6)

    def config() -> dict:
        return transform_job_config(
            "bin-counter-retry-batch",
            MODEL,
            plan["manifest_uri"],
            plan["transform_output_uri"],
            "ml.m5.xlarge",
            environment=batch.REFUSALS_ENVIRONMENT,
        )

    first = ResumableTransformOperator(task_id="count", config=config(), check_interval=1)
    first.hook.create_transform_job(first.config, wait_for_completion=False)
    assert (
        serving.describe_transform_job(TransformJobName="bin-counter-retry-batch")["TransformJobStatus"] == "InProgress"
    )
    result = ResumableTransformOperator(task_id="count", config=config(), check_interval=1).execute(context={})
    assert result["Transform"]["TransformJobName"] == "bin-counter-retry-batch"
    assert result["Transform"]["TransformJobStatus"] == "Completed"
    assert result["Model"]["ModelName"] == MODEL
    assert sorted(j["TransformJobName"] for j in serving.list_transform_jobs()["TransformJobSummaries"]) == sorted(
        [name, "bin-counter-retry-batch"]
    )


def test_a_model_that_does_not_exist_fails_the_run_at_once_saying_what_to_set(
    dag, s3, bucket, local_stack_connection, capfd
):
    upload_audit(s3, bucket)
    run = dag.test(
        **run_on(3),
        run_conf={"bucket": bucket, "input_uri": f"s3://{bucket}/{PHOTOS}", "model": "bin-counter-no-such-model"},
    )
    log = capfd.readouterr().out
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed"
    assert states["model"] == "failed" and states["count"] == "upstream_failed"
    assert "the SageMaker model bin-counter-no-such-model does not exist" in log
    assert "Set the model Param" in log
    # And with no model Param and no endpoint: run bin_count_retrain first.
    # (model given as None: dag.test keeps the previous run's conf in the DAG object's Params)
    run = dag.test(**run_on(4), run_conf={"bucket": bucket, "input_uri": f"s3://{bucket}/{PHOTOS}", "model": None})
    captured = capfd.readouterr()
    assert run.state == "failed"
    said = captured.out + captured.err
    assert f"the endpoint {ENDPOINT} does not exist or serves nothing" in said, captured.out[-3000:]
