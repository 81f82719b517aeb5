"""bin_count_retrain run whole with dag.test() against the local stack: moto for S3 and the Model
Registry, the stand-in for SageMaker and Lambda, the real train.py, inference.py and Lambda handler, on
small generated images; and bin_count_deploy serving what the runs approved."""

from __future__ import annotations

import json
import threading
import time

import boto3
import pendulum
import pytest

from scripts import local_stack
from tests.airflow_side.conftest import BASE_CONF, ENDPOINT, QUICK_DEPLOY, dag_without_retries, upload_dataset
from tests.airflow_side.machines import assert_ran_apart
from tests.conftest import make_bin_image


@pytest.fixture
def dag(airflow_db, monkeypatch, pipeline_stack):
    # The Variable exactly as docs/infra/README.md tells a user to copy it from the stack's outputs.
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER", pipeline_stack.outputs["SageMakerVariable"])
    monkeypatch.setenv("BIN_COUNTER_SAGEMAKER_POLL_S", "1")  # read when the DAG file is parsed
    # Where the workers find the backbone's ImageNet weights, as the local stack sets it.
    monkeypatch.setenv("BIN_COUNTER_IMAGENET_WEIGHTS", local_stack.container_weights())
    return dag_without_retries("bin_count_retrain")


def run_on(day: int) -> dict:
    """A fixed run date: the run id, the job names derived from it and the tuner's draws (seeded by the
    tuning job's name) are the same every time."""
    date = pendulum.datetime(2026, 1, day, tz="UTC")
    return {"run_after": date, "logical_date": date}


def sagemaker(stack):
    return boto3.client("sagemaker", endpoint_url=stack["endpoint"], region_name="us-east-1")


def task_states(run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def serving(stack, endpoint: str = ENDPOINT) -> str:
    sm = sagemaker(stack)
    config = sm.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    return sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"][0]["ModelName"]


def final_metrics(stack, job: str) -> dict[str, float]:
    described = sagemaker(stack).describe_training_job(TrainingJobName=job)
    return {m["MetricName"]: m["Value"] for m in described["FinalMetricDataList"]}


def registered_by(sm, run) -> dict:
    """The registry version a retraining run registered (its metadata names the run)."""
    from bin_counter import registry

    for summary in registry.versions(sm, registry.group_name(ENDPOINT)):
        described = sm.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
        if described.get("CustomerMetadataProperties", {}).get("dag-run") == run.run_id:
            return described
    raise AssertionError(f"run {run.run_id} registered nothing")


class Reviewer(threading.Thread):
    """A person answering a run's review through Airflow's REST API (the same database, the API
    server's own app in this process), once the run waits for it; keeps the page it was shown."""

    def __init__(self, run_id: str, option: str) -> None:
        super().__init__(daemon=True)
        self.path = f"/api/v2/dags/bin_count_retrain/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails"
        self.option, self.shown, self.answered = option, None, None

    def run(self) -> None:
        from airflow.api_fastapi.app import create_app
        from fastapi.testclient import TestClient

        with TestClient(create_app("core")) as client:
            deadline = time.time() + 600
            while time.time() < deadline:
                asked = client.get(self.path)
                if asked.status_code == 200 and not asked.json().get("response_received"):
                    self.shown = asked.json()
                    self.answered = client.patch(self.path, json={"chosen_options": [self.option]})
                    return
                time.sleep(1)


@pytest.fixture
def rest_api(monkeypatch):
    """Airflow's REST API without a login (everyone an admin), for the reviewer thread."""
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")


def test_runs_register_approve_or_hold_back_and_bin_count_deploy_serves_what_was_approved(
    dag, deploy_dag, rest_api, s3, bucket, local_stack_connection, alerts, capfd, separate_machines
):
    from bin_counter import registry

    stack = local_stack_connection
    upload_dataset(s3, bucket, "v-test", {"train": 10, "validation": 4, "test": 6})

    # 1. No endpoint yet: tune (one trial diverges and fails), retrain, register, approved by the gate
    #    (approval auto), announced; bin_count_deploy then serves it and smoke-checks it through Lambda.
    # On this date the tuner draws learning rates 2.7, 0.003 and 7.3 from 0.001..10: two trials diverge.
    first = dag.test(**run_on(12), run_conf={**BASE_CONF, "bucket": bucket, "lr_max": 10.0, "max_jobs": 3})
    log = capfd.readouterr().out
    assert first.state == "success", log[-3000:]
    states = task_states(first)
    assert states["review"] == "skipped" and states["auto_approve"] == "success", states
    assert all(state == "success" for task, state in states.items() if task != "review"), states
    sm = sagemaker(stack)
    tuning_name = next(iter(sm.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]))[
        "HyperParameterTuningJobName"
    ]
    tuning = sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_name)
    assert tuning["HyperParameterTuningJobStatus"] == "Completed"
    assert tuning["TrainingJobStatusCounters"]["NonRetryableError"] >= 1, "this run drew no diverging trial"
    trials = sm.list_training_jobs_for_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_name)[
        "TrainingJobSummaries"
    ]
    failed = [
        sm.describe_training_job(TrainingJobName=t["TrainingJobName"])
        for t in trials
        if t["TrainingJobStatus"] == "Failed"
    ]
    assert failed and all("training diverged" in f["FailureReason"] for f in failed)
    assert "no endpoint yet" in log and "DEPLOYING: no model is serving yet" in log
    version = registered_by(sm, first)
    first_job = version["CustomerMetadataProperties"]["training-job"]
    assert first_job.endswith("-final") and version["ModelApprovalStatus"] == "Approved"
    assert version["ApprovalDescription"].startswith("approved by the gate (approval=auto)")
    assert version["CustomerMetadataProperties"]["dataset-version"] == "v-test"
    [container] = version["InferenceSpecification"]["Containers"]
    artifact = sm.describe_training_job(TrainingJobName=first_job)["ModelArtifacts"]["S3ModelArtifacts"]
    assert container["ModelDataUrl"] == artifact
    # The evaluation report the version's ModelMetrics point at: both models on the same test photos.
    report_uri = version["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    report_bucket, report_key = report_uri.removeprefix("s3://").split("/", 1)
    report = json.loads(s3.get_object(Bucket=report_bucket, Key=report_key)["Body"].read())
    first_accuracy = final_metrics(stack, first_job)["test:accuracy"]
    assert report["comparison"]["candidate"]["accuracy"] == pytest.approx(first_accuracy)
    assert report["comparison"]["serving"] is None and report["test_images"] == 18
    assert set(report["comparison"]["candidate"]["per_count_accuracy"]) == {"0", "1", "2"}
    # Nothing was deployed by the retraining run itself.
    with pytest.raises(Exception, match=r"Could not find endpoint|not found"):
        sm.describe_endpoint(EndpointName=ENDPOINT)
    # Every job got the backbone's ImageNet weights as its `weights` channel, and the final job's log
    # says it loaded them from there (no hub cache, package or download needed in the job).
    [weights_key] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="weights/")["Contents"]]
    assert weights_key.endswith("/mobilenet_v2-b0353104.pth")
    for job in [t["TrainingJobName"] for t in trials] + [first_job]:
        channels = {
            c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
            for c in sm.describe_training_job(TrainingJobName=job)["InputDataConfig"]
        }
        assert channels["weights"] == f"s3://{bucket}/{weights_key}", job
    assert "ImageNet weights for mobilenet_v2: mobilenet_v2-b0353104.pth from the weights channel" in log

    deployed = deploy_dag.test(
        run_conf={**QUICK_DEPLOY, "bucket": bucket, "model_package": str(version["ModelPackageVersion"])}
    )
    log = capfd.readouterr().out
    assert deployed.state == "success", log[-3000:]
    assert "smoke check passed" in log
    first_model = serving(stack)
    described = sm.describe_model(ModelName=first_model)
    assert described["PrimaryContainer"]["Environment"]["SAGEMAKER_MODEL_SERVER_WORKERS"] == "1"  # serving_workers
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=described["ModelArn"])["Tags"]}
    assert tags["bin-counter:training-job"] == first_job and tags["bin-counter:dataset-version"] == "v-test"
    assert tags["bin-counter:model-package"] == version["ModelPackageArn"]
    first_version = sm_runtime_count(stack)["model_version"]

    # 2. A model that cannot have learned anything (one epoch, a learning rate near zero, head only):
    #    scored against the serving one on the same test images, gated: nothing registered, an alert.
    worse = dag.test(
        **run_on(13),
        run_conf={
            **BASE_CONF,
            "bucket": bucket,
            "mode": "head",
            "epochs_min": 1,
            "epochs_max": 1,
            "lr_min": 1e-9,
            "lr_max": 1e-9,
            "max_jobs": 1,
        },
    )
    log = capfd.readouterr().out
    states = task_states(worse)
    assert worse.state == "success", log[-3000:]
    assert states["gate"] == "success" and states["register_version"] == "skipped", states
    assert states["announce"] == "skipped", states
    worse_job = [line for line in log.splitlines() if "NOT DEPLOYING" in line]
    assert worse_job and "worse than the serving one" in worse_job[0]
    with pytest.raises(AssertionError, match="registered nothing"):
        registered_by(sm, worse)
    worse_metrics = final_metrics(
        stack,
        next(
            j["TrainingJobName"]
            for j in sm.list_training_jobs(NameContains="-final")["TrainingJobSummaries"]
            if j["TrainingJobName"] != first_job
        ),
    )
    assert worse_metrics["champion:accuracy"] == pytest.approx(first_accuracy)  # the same model, the same images
    assert worse_metrics["test:accuracy"] < worse_metrics["champion:accuracy"]
    # On-call staff hear of it: one alert, saying which model was held back and why.
    alert = alerts()
    assert len(alert) == 1 and alert[0]["Subject"] == "bin-counter: new model NOT deployed (bin_count_retrain)"
    assert "worse than the serving one" in alert[0]["Message"] and "-final:" in alert[0]["Message"]
    assert "Log:    http" in alert[0]["Message"] and "Run:    manual__2026-01-13" in alert[0]["Message"]

    # 3. (c) Manual approval, rejected: the run waits on the review; a reviewer reads the comparison
    #    table and rejects through Airflow's REST API. The version is Rejected, on-call hears it, nothing
    #    is announced, and the endpoint keeps its model.
    # (The quick recipe of run 2, let through by a margin: what the reviewer rejects is the point.)
    reviewed = {
        **BASE_CONF,
        "bucket": bucket,
        "mode": "head",
        "epochs_min": 1,
        "epochs_max": 1,
        "lr_min": 1e-9,
        "lr_max": 1e-9,
        "max_jobs": 1,
        "deploy_margin": 1.0,
        "approval": "manual",
    }
    reviewer = Reviewer("manual__2026-01-14T00:00:00+00:00", "Reject")
    reviewer.start()
    rejected = dag.test(**run_on(14), run_conf=reviewed)
    reviewer.join(timeout=30)
    log = capfd.readouterr().out
    assert rejected.run_id == "manual__2026-01-14T00:00:00+00:00"
    assert reviewer.answered is not None and reviewer.answered.status_code == 200, log[-3000:]
    page = reviewer.shown["body"]
    assert "| metric | candidate | serving now | better |" in page and "**The gate says:**" in page
    assert reviewer.shown["subject"].startswith("Deploy model package version ")
    states = task_states(rejected)
    assert rejected.state == "success" and states["review"] == "success", states
    assert states["announce"] == "skipped", states
    version = registered_by(sm, rejected)
    assert version["ModelApprovalStatus"] == "Rejected", log[-4000:]
    assert "rejected by" in version["ApprovalDescription"]
    [alert] = alerts()
    assert alert["Subject"] == "bin-counter: new model NOT deployed (bin_count_retrain)"
    assert "A reviewer did not approve the new model" in alert["Message"]
    assert serving(stack) == first_model and sm_runtime_count(stack)["model_version"] == first_version

    # 4. (c) A fresh environment (no endpoint) with a published model better than what this run trains:
    #    the published model is registered, a reviewer approves it, bin_count_deploy serves it.
    sm.delete_endpoint(EndpointName=ENDPOINT)
    reviewer = Reviewer("manual__2026-01-16T00:00:00+00:00", "Approve")
    reviewer.start()
    fresh = dag.test(
        **run_on(16),
        run_conf={
            **BASE_CONF,
            "bucket": bucket,
            "mode": "head",
            "epochs_min": 1,
            "epochs_max": 1,
            "lr_min": 1e-9,
            "lr_max": 1e-9,
            "max_jobs": 1,
            "initial_model": artifact,
            "approval": "manual",
            "deploy_margin": 0.0,  # dag.test() keeps run 3's in the DAG's Params
        },
    )
    reviewer.join(timeout=30)
    log = capfd.readouterr().out
    assert fresh.state == "success", log[-3000:]
    assert reviewer.answered is not None and reviewer.answered.status_code == 200
    assert "DEPLOYING THE PUBLISHED MODEL: nothing serves yet" in log
    assert task_states(fresh)["announce"] == "success"
    version = registered_by(sm, fresh)
    assert version["ModelApprovalStatus"] == "Approved" and "approved by" in version["ApprovalDescription"]
    assert version["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == artifact
    assert version["CustomerMetadataProperties"]["model-version"] == first_version
    served = deploy_dag.test(run_conf={**QUICK_DEPLOY, "bucket": bucket, "model_package": version["ModelPackageArn"]})
    log = capfd.readouterr().out
    assert served.state == "success", log[-3000:]
    assert sm_runtime_count(stack)["model_version"] == first_version  # the published archive's own version
    assert alerts() == []  # deploying the better of two is no alert
    # Four runs, one copy of the weights: stored once by content.
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="weights/")["Contents"]] == [weights_key]
    assert registry.newest_approved(sm, registry.group_name(ENDPOINT)) == version["ModelPackageArn"]
    # Every task ran on a machine of its own (as on the CeleryExecutor): the code archive, the weights,
    # the initial model and the Lambda zip were built and uploaded in one task each, handed on as s3:// URIs.
    assert_ran_apart(separate_machines, first, deployed, worse, rejected, fresh, served)


def sm_runtime_count(stack) -> dict:
    runtime = boto3.client("sagemaker-runtime", endpoint_url=stack["endpoint"], region_name="us-east-1")
    body = runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=make_bin_image(2, 1), ContentType="image/jpeg")
    return json.loads(body["Body"].read())


def test_a_failing_final_training_job_fails_the_run_with_its_reason(
    dag, s3, bucket, local_stack_connection, alerts, capfd
):
    # The test images were cut short after the split: the trials (train + validation) succeed, the
    # final job, which reads the test images, fails; nothing is deployed.
    upload_dataset(s3, bucket, "v-corrupt", {"train": 6, "validation": 3, "test": 3}, corrupt_test=True)
    run = dag.test(**run_on(15), run_conf={**BASE_CONF, "bucket": bucket, "max_jobs": 1, "epochs_max": 2})
    log = capfd.readouterr().out
    states = task_states(run)
    assert run.state == "failed"
    assert states["tune"] == "success" and states["retrain"] == "failed"
    assert states["register_version"] in ("upstream_failed", None)
    # The job's FailureReason, in the task log: which image, and why.
    assert "Error training bin-counter-" in log and "Reason: AlgorithmError" in log
    assert "/test/" in log
    # The alert names the DAG, the task, the run and the log, and carries the job's reason.
    [alert] = alerts()
    assert alert["Subject"] == "bin-counter FAILED: bin_count_retrain.retrain"
    message = alert["Message"]
    assert "Task:   retrain (try 1)" in message and "Run:    manual__2026-01-15" in message
    assert "Log:    http" in message and "dag_id=bin_count_retrain" in message.replace("/dags/", "dag_id=")
    assert "AlgorithmError" in message
    with pytest.raises(Exception, match=r"Could not find endpoint|not found"):
        sagemaker(local_stack_connection).describe_endpoint(EndpointName=ENDPOINT)


def test_no_dataset_fails_clearly(dag, bucket, local_stack_connection, capfd, caplog):
    run = dag.test(run_conf={**BASE_CONF, "bucket": bucket})
    assert run.state == "failed"
    log = capfd.readouterr()
    assert "run bin_count_data_prep first" in log.out
    # No topic configured: the failure is still reported in the log, and says alerts are off.
    assert "alerts are off" in log.out + log.err + caplog.text
