"""bin_count_retrain run whole with dag.test() against the local stack: moto for S3, the stand-in for
SageMaker and Lambda, the real train.py, inference.py and Lambda handler, on small generated images."""

from __future__ import annotations

import json

import boto3
import pendulum
import pytest

from bin_counter.sagemaker_config import run_job_names
from scripts import local_stack
from tests.airflow_side.conftest import BASE_CONF, ENDPOINT, dag_without_retries, upload_dataset
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


# The model of the run on 2026-01-15 fails its health check on the endpoint (a failure drill).
UNHEALTHY_MODEL = run_job_names("bin_count_retrain", "manual__2026-01-15T00:00:00+00:00")["model"]


@pytest.mark.standin_args("--unhealthy-models", f"^{UNHEALTHY_MODEL}$")
def test_first_run_deploys_then_a_worse_model_is_gated_and_a_better_one_replaces_it(
    dag, s3, bucket, local_stack_connection, alerts, capfd
):
    stack = local_stack_connection
    upload_dataset(s3, bucket, "v-test", {"train": 10, "validation": 4, "test": 6})

    # 1. No endpoint yet: tune (one trial diverges and fails), retrain, deploy, smoke-check through Lambda.
    # On this date the tuner draws learning rates 2.7, 0.003 and 7.3 from 0.001..10: two trials diverge.
    first = dag.test(**run_on(12), run_conf={**BASE_CONF, "bucket": bucket, "lr_max": 10.0, "max_jobs": 3})
    log = capfd.readouterr().out
    assert first.state == "success", log[-3000:]
    assert first.run_id == "manual__2026-01-12T00:00:00+00:00"  # the form UNHEALTHY_MODEL's name relies on
    assert all(state == "success" for state in task_states(first).values()), task_states(first)
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
    first_model = serving(stack)
    assert first_model.endswith("-final")
    assert "no endpoint yet" in log and "DEPLOYING: no model is serving yet" in log
    assert "smoke check passed" in log
    described = sm.describe_model(ModelName=first_model)
    assert described["PrimaryContainer"]["Environment"]["SAGEMAKER_MODEL_SERVER_WORKERS"] == "1"  # serving_workers
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=described["ModelArn"])["Tags"]}
    assert tags["bin-counter:training-job"] == first_model and tags["bin-counter:dataset-version"] == "v-test"
    assert "bin-counter:test-accuracy" in tags
    first_accuracy = final_metrics(stack, first_model)["test:accuracy"]
    # Every job got the backbone's ImageNet weights as its `weights` channel, and the final job's log
    # says it loaded them from there (no hub cache, package or download needed in the job).
    [weights_key] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="weights/")["Contents"]]
    assert weights_key.endswith("/mobilenet_v2-b0353104.pth")
    for job in [t["TrainingJobName"] for t in trials] + [first_model]:
        channels = {
            c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
            for c in sm.describe_training_job(TrainingJobName=job)["InputDataConfig"]
        }
        assert channels["weights"] == f"s3://{bucket}/{weights_key}", job
    assert "ImageNet weights for mobilenet_v2: mobilenet_v2-b0353104.pth from the weights channel" in log

    # 2. A model that cannot have learned anything (one epoch, a learning rate near zero, head only):
    #    scored against the serving one on the same test images, gated; the endpoint keeps its model.
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
    assert states["gate"] == "success" and states["deploy"] == "skipped" and states["smoke_check"] == "skipped"
    worse_job = [line for line in log.splitlines() if "NOT DEPLOYING" in line]
    assert worse_job and "worse than the serving one" in worse_job[0]
    assert serving(stack) == first_model
    worse_metrics = final_metrics(
        stack,
        next(
            j["TrainingJobName"]
            for j in sm.list_training_jobs(NameContains="-final")["TrainingJobSummaries"]
            if j["TrainingJobName"] != first_model
        ),
    )
    assert worse_metrics["champion:accuracy"] == pytest.approx(first_accuracy)  # the same model, the same images
    assert worse_metrics["test:accuracy"] < worse_metrics["champion:accuracy"]
    # On-call staff hear of it: one alert, saying which model was held back and why.
    alert = alerts()
    assert len(alert) == 1 and alert[0]["Subject"] == "bin-counter: new model NOT deployed (bin_count_retrain)"
    assert "worse than the serving one" in alert[0]["Message"] and "-final:" in alert[0]["Message"]
    assert "Log:    http" in alert[0]["Message"] and "Run:    manual__2026-01-13" in alert[0]["Message"]

    # 3. More epochs: at least as good as the serving model, so it replaces it, and the API answers with it.
    better = dag.test(
        **run_on(14),
        run_conf={
            **BASE_CONF,
            "bucket": bucket,
            "epochs_min": 5,
            "epochs_max": 5,
            "lr_min": 0.002,
            "lr_max": 0.002,
            "max_jobs": 1,
        },
    )
    log = capfd.readouterr().out
    assert better.state == "success", log[-3000:]
    new_model = serving(stack)
    assert new_model not in (first_model,)
    better_metrics = final_metrics(stack, new_model)
    assert better_metrics["test:accuracy"] >= better_metrics["champion:accuracy"]
    assert "DEPLOYING: the new model is not worse" in log and "smoke check passed" in log
    answer = sm_runtime_count(stack)
    assert answer["model_version"] == new_model

    # 3b. The same recipe again, but its model fails the endpoint's health check: SageMaker rolls the
    #     update back, the deploy task's waiter sees InService, and confirm_deployment fails the run
    #     with the endpoint's reason. The old model keeps serving and on-call staff hear why.
    broken = dag.test(
        **run_on(15),
        run_conf={
            **BASE_CONF,
            "bucket": bucket,
            "epochs_min": 5,
            "epochs_max": 5,
            "lr_min": 0.002,
            "lr_max": 0.002,
            "max_jobs": 1,
        },
    )
    log = capfd.readouterr().out
    states = task_states(broken)
    assert broken.state == "failed"
    assert states["deploy"] == "success" and states["confirm_deployment"] == "failed", states
    assert states["smoke_check"] == "upstream_failed"
    assert f"did not switch to {UNHEALTHY_MODEL}: it still serves {new_model}" in log
    assert "did not pass the ping health check" in log
    assert serving(stack) == new_model and sm_runtime_count(stack)["model_version"] == new_model
    alert = alerts()
    assert len(alert) == 1 and "confirm_deployment" in alert[0]["Subject"]
    assert "did not pass the ping health check" in alert[0]["Message"]

    # 4. A fresh environment (no endpoint) with a published model better than what this run trains:
    #    the published model is deployed, and the API answers with it.
    sm.delete_endpoint(EndpointName=ENDPOINT)
    published = sm.describe_training_job(TrainingJobName=new_model)["ModelArtifacts"]["S3ModelArtifacts"]
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
            "initial_model": published,
        },
    )
    log = capfd.readouterr().out
    assert fresh.state == "success", log[-3000:]
    assert "DEPLOYING THE PUBLISHED MODEL: nothing serves yet" in log and "smoke check passed" in log
    assert serving(stack).endswith("-published")
    assert sm_runtime_count(stack)["model_version"] == new_model  # the published archive's own version
    assert alerts() == []  # deploying the better of two is no alert
    # Five runs, one copy of the weights: stored once by content.
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="weights/")["Contents"]] == [weights_key]


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
    assert states["deploy"] in ("upstream_failed", None)
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
