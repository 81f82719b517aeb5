"""bin_count_deploy's drills, run whole with dag.test() against the local stack: the Model Registry on
moto, the stand-in's endpoints (blue/green rollouts, metrics, alarms) and Lambda, the real inference code.

The versions deployed are the published model, repacked under other model versions; the bad ones carry
an inference.py that wraps the real one and breaks one thing: a malformed count (it passes its health
check), or a 500 on every request."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import boto3
import pytest
from botocore.exceptions import ClientError

from bin_counter import registry, scaling
from tests.airflow_side.conftest import ENDPOINT, FUNCTION, QUICK_DEPLOY, upload_dataset
from tests.conftest import REPO, make_bin_image

PUBLISHED_ARCHIVE = REPO / "models" / "bin-counter.tar.gz"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312"
FAST = QUICK_DEPLOY
# The real handlers, one thing broken (module `inference_real` is the model's own inference.py).
MALFORMED = """from inference_real import *  # noqa: F401,F403
import inference_real


def output_fn(prediction, accept):
    for row in prediction["predictions"]:
        row["count"] = "many"  # drill: well-formed JSON, a count no client can use
    return inference_real.output_fn(prediction, accept)
"""
FAILING = """from inference_real import *  # noqa: F401,F403


def predict_fn(input_object, model):
    raise RuntimeError("drill: this model fails every request")
"""

pytestmark = pytest.mark.skipif(not PUBLISHED_ARCHIVE.is_file(), reason="needs models/bin-counter.tar.gz")


def variant_archive(model_version: str, inference: str | None = None) -> bytes:
    """The published model.tar.gz with another model version in its card and, optionally, `inference`
    as code/inference.py in front of the real one."""
    out = io.BytesIO()
    with tarfile.open(PUBLISHED_ARCHIVE) as source, tarfile.open(fileobj=out, mode="w:gz") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            name = member.name.lstrip("./")
            if name == "model_card.json":
                card = json.loads(data)
                card["model_version"] = model_version
                data = json.dumps(card).encode()
            if name == "code/inference.py" and inference is not None:
                add(target, "code/inference_real.py", data)
                data = inference.encode()
            if data is None:
                target.addfile(member)
            else:
                add(target, member.name, data)
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def register(
    sm, s3, bucket: str, model_version: str, inference: str | None = None, status: str = registry.APPROVED
) -> dict:
    """A version of the endpoint's group (Approved, unless `status` says else), as bin_count_retrain
    registers one."""
    key = f"models/drills/{model_version}/model.tar.gz"
    s3.put_object(Bucket=bucket, Key=key, Body=variant_archive(model_version, inference))
    s3.put_object(Bucket=bucket, Key=f"{key}.evaluation.json", Body=b"{}")
    group = registry.group_name(ENDPOINT)
    registry.ensure_group(sm, group, "drills")
    request = registry.version_request(
        group,
        IMAGE,
        f"s3://{bucket}/{key}",
        f"s3://{bucket}/{key}.evaluation.json",
        {"model-version": model_version, "dataset-version": "v-test", "training-job": f"drill-{model_version}"},
        f"drill {model_version}",
    )
    arn = sm.create_model_package(**request)["ModelPackageArn"]
    if status != registry.PENDING:
        registry.set_status(sm, arn, status, "drill")
    described = sm.describe_model_package(ModelPackageName=arn)
    return {"arn": arn, "version": described["ModelPackageVersion"], "model_version": model_version}


def clients(stack: dict):
    sm = boto3.client("sagemaker", endpoint_url=stack["endpoint"], region_name="us-east-1")
    runtime = boto3.client("sagemaker-runtime", endpoint_url=stack["endpoint"], region_name="us-east-1")
    return sm, runtime


def answered_by(runtime) -> str:
    body = runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=make_bin_image(2, 1), ContentType="image/jpeg")
    return json.loads(body["Body"].read())["model_version"]


def serving_config(sm) -> str:
    return sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]


def status_of(sm, arn: str) -> str:
    return sm.describe_model_package(ModelPackageName=arn)["ModelApprovalStatus"]


def task_states(run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def test_smoke_check_undoes_a_bad_deployment_and_an_earlier_version_rolls_back_in_one_trigger(
    deploy_dag, s3, bucket, local_stack_connection, alerts, capfd, moto_endpoint
):
    stack = local_stack_connection
    sm, runtime = clients(stack)
    upload_dataset(s3, bucket, "v-test", {"train": 1, "validation": 1, "test": 1})
    good = register(sm, s3, bucket, "drill-good")
    register(sm, s3, bucket, "drill-better")

    # A first deployment creates the endpoint, by version number as on-call would type it.
    first = deploy_dag.test(run_conf={**FAST, "bucket": bucket, "model_package": str(good["version"])})
    log = capfd.readouterr().out
    assert first.state == "success", log[-3000:]
    assert "nothing serves yet: this is the first deployment" in log and "smoke check passed" in log
    assert answered_by(runtime) == "drill-good"

    # The newest approved version (no Param, no event) replaces it, all at once (one instance takes no
    # canary; the canary drill deploys two). (The Param is named empty: dag.test() keeps an earlier
    # run's conf in the DAG object's Params.)
    second = deploy_dag.test(run_conf={**FAST, "bucket": bucket, "model_package": None})
    log = capfd.readouterr().out
    assert second.state == "success", log[-3000:]
    assert answered_by(runtime) == "drill-better", log[-3000:]
    serving_before = serving_config(sm)
    endpoint = sm.describe_endpoint(EndpointName=ENDPOINT)
    assert endpoint["LastDeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == (
        "ALL_AT_ONCE"
    )
    # The endpoint autoscales between instance_count (min_instances empty) and max_instances' default.
    autoscaling = boto3.client("application-autoscaling", endpoint_url=moto_endpoint, region_name="us-east-1")
    target = scaling.registered(autoscaling, ENDPOINT, "AllTraffic")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (FAST["instance_count"], 4)

    # (a) A model that passes its health check but answers malformed counts: the smoke check fails,
    #     the endpoint goes back to what served, the version is Rejected, and the alert says so.
    malformed = register(sm, s3, bucket, "drill-malformed", MALFORMED)
    bad = deploy_dag.test(run_conf={**FAST, "bucket": bucket, "model_package": malformed["arn"]})
    log = capfd.readouterr().out
    states = task_states(bad)
    assert bad.state == "failed" and states["confirm_deployment"] == "success", states
    assert states["smoke_check"] == "failed"
    assert serving_config(sm) == serving_before and answered_by(runtime) == "drill-better"
    assert status_of(sm, malformed["arn"]) == registry.REJECTED
    why = sm.describe_model_package(ModelPackageName=malformed["arn"])["ApprovalDescription"]
    assert "failed its smoke check" in why
    [alert] = alerts()
    assert alert["Subject"] == "bin-counter FAILED: bin_count_deploy.smoke_check"
    assert "The deployment was undone" in alert["Message"] and "is now Rejected" in alert["Message"]
    # A rejected version is refused outright.
    again = deploy_dag.test(run_conf={**FAST, "bucket": bucket, "model_package": str(malformed["version"])})
    log = capfd.readouterr().out
    assert again.state == "failed" and "is Rejected, not Approved" in log
    alerts()

    # (d) On-call rolls back to the first version in one trigger, saying why.
    rollback = deploy_dag.test(
        run_conf={**FAST, "bucket": bucket, "model_package": str(good["version"]), "reason": "drill: roll back"}
    )
    log = capfd.readouterr().out
    assert rollback.state == "success", log[-3000:]
    assert "why: drill: roll back" in log
    assert answered_by(runtime) == "drill-good"
    config = sm.describe_endpoint_config(EndpointConfigName=serving_config(sm))
    model = config["ProductionVariants"][0]["ModelName"]
    assert model.endswith(f"-v{good['version']}")  # the version's own model, made by its first deployment
    assert alerts() == []


def test_a_first_deployment_that_fails_its_smoke_check_says_plainly_what_serves(
    deploy_dag, s3, bucket, local_stack_connection, alerts, capfd
):
    sm, _ = clients(local_stack_connection)
    upload_dataset(s3, bucket, "v-test", {"train": 1, "validation": 1, "test": 1})
    malformed = register(sm, s3, bucket, "drill-first-malformed", MALFORMED)
    run = deploy_dag.test(run_conf={**FAST, "bucket": bucket, "model_package": malformed["arn"]})
    capfd.readouterr()
    assert run.state == "failed"
    assert status_of(sm, malformed["arn"]) == registry.REJECTED
    [alert] = alerts()
    assert "SERVES A MODEL THAT FAILED ITS SMOKE CHECK" in alert["Message"]


class Clients(threading.Thread):
    """API clients sending photos without pause: how many answers were errors, and from when."""

    def __init__(self, runtime) -> None:
        super().__init__(daemon=True)
        self.runtime, self.stopping = runtime, threading.Event()
        self.answers: list[tuple[float, bool]] = []  # (time, ok)

    def run(self) -> None:
        body = make_bin_image(1, 3)
        while not self.stopping.is_set():
            try:
                self.runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=body, ContentType="image/jpeg")
                self.answers.append((time.time(), True))
            except ClientError as exc:  # the model's own error; anything else is not the model's answer
                if exc.response["Error"]["Code"] == "ModelError":
                    self.answers.append((time.time(), False))
            time.sleep(0.05)  # a steady client, leaving the two cores to the servers

    def stop(self) -> list[tuple[float, bool]]:
        self.stopping.set()
        self.join(timeout=60)
        return self.answers


def test_a_canary_that_fails_is_rolled_back_on_its_alarm_and_clients_see_at_most_its_share(
    deploy_dag, s3, bucket, local_stack_connection, moto_endpoint, alerts, capfd
):
    """(b) Two instances; the new model answers 500: the 5xx alarm fires during the canary's bake,
    SageMaker-style rollback, the run fails with the reason, the version is Rejected, and the clients
    sending photos all along saw errors on at most the canary's share of their requests."""
    stack = local_stack_connection
    sm, runtime = clients(stack)
    upload_dataset(s3, bucket, "v-test", {"train": 1, "validation": 1, "test": 1})
    good = register(sm, s3, bucket, "drill-canary-good")
    failing = register(sm, s3, bucket, "drill-canary-5xx", FAILING)
    two = {**FAST, "bucket": bucket, "instance_count": 2, "canary_percent": 50, "bake_minutes": 0.5}
    two["rollout"] = "canary"  # QUICK_DEPLOY's one instance deploys all at once; two take a canary
    first = deploy_dag.test(run_conf={**two, "model_package": good["arn"]})
    log = capfd.readouterr().out
    assert first.state == "success", log[-3000:]
    before = serving_config(sm)

    traffic = Clients(runtime)
    traffic.start()
    run = deploy_dag.test(run_conf={**two, "model_package": failing["arn"]})
    answers = traffic.stop()
    log = capfd.readouterr().out
    states = task_states(run)
    assert run.state == "failed" and states["deploy"] == "success" and states["confirm_deployment"] == "failed", states
    assert states["smoke_check"] == "upstream_failed"
    assert serving_config(sm) == before and answered_by(runtime) == "drill-canary-good"
    assert f"{ENDPOINT}-invocation-5xx-errors" in log  # the reason names the alarm
    assert status_of(sm, failing["arn"]) == registry.REJECTED
    alarm = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1").describe_alarms(
        AlarmNames=[f"{ENDPOINT}-invocation-5xx-errors"]
    )["MetricAlarms"][0]
    assert alarm["StateValue"] == "ALARM"
    errors = sum(not ok for _, ok in answers)
    assert errors > 0, "no client request reached the canary"
    # Errors only while the canary served, and on at most its share of the requests made meanwhile.
    first_error = min(t for t, ok in answers if not ok)
    last_error = max(t for t, ok in answers if not ok)
    during = [ok for t, ok in answers if first_error <= t <= last_error]
    assert errors / len(during) <= 0.5 + 2 / len(during), (errors, len(during))
    [alert] = alerts()
    assert "confirm_deployment" in alert["Subject"] and "Rejected" in alert["Message"]


def test_a_serverless_endpoint_refuses_a_canary_before_anything_and_serves_without_autoscaling(
    deploy_dag, s3, bucket, local_stack_connection, moto_endpoint, alerts, capfd
):
    """serving = serverless: a canary is refused by `requests` before anything exists, saying why; all at
    once deploys a serverless variant (no instances, no autoscaling), the API function learns the kind
    (its smaller body limit), and the smoke check's photos are answered after the cold start."""
    stack = local_stack_connection
    sm, runtime = clients(stack)
    upload_dataset(s3, bucket, "v-test", {"train": 1, "validation": 1, "test": 1})
    lean = register(sm, s3, bucket, "drill-serverless")
    serverless = {**FAST, "bucket": bucket, "model_package": lean["arn"], "serving": "serverless", "capture_percent": 0}

    refused = deploy_dag.test(run_conf={**serverless, "rollout": "canary"})
    log = capfd.readouterr().out
    assert refused.state == "failed" and task_states(refused)["requests"] == "failed"
    assert "serving serverless takes rollout all_at_once only" in log
    with pytest.raises(ClientError):
        sm.describe_endpoint(EndpointName=ENDPOINT)  # nothing was created
    [alert] = alerts()
    assert "requests" in alert["Subject"]

    served = deploy_dag.test(run_conf={**serverless, "rollout": "all_at_once"})
    log = capfd.readouterr().out
    assert served.state == "success", log[-3000:]
    assert "smoke check passed" in log and "no autoscaling (serverless" in log
    variant = sm.describe_endpoint(EndpointName=ENDPOINT)["ProductionVariants"][0]
    assert variant["CurrentServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 5}
    assert "CurrentInstanceCount" not in variant
    autoscaling = boto3.client("application-autoscaling", endpoint_url=moto_endpoint, region_name="us-east-1")
    assert scaling.registered(autoscaling, ENDPOINT, "AllTraffic") is None
    function = boto3.client("lambda", endpoint_url=stack["endpoint"], region_name="us-east-1")
    variables = function.get_function_configuration(FunctionName=FUNCTION)["Environment"]["Variables"]
    assert variables["ENDPOINT_KIND"] == "serverless"
    assert answered_by(runtime) == "drill-serverless"


def test_a_review_nobody_answers_rejects_the_version_and_says_why(local_stack_connection, s3, bucket):
    """The scheduler's sweep answers a review that timed out with its default, Reject, and no
    respondent (airflow.models.hitl: `responded_by_user` None for the timeout default)."""
    from bin_counter.approval import ModelReviewOperator

    sm, _ = clients(local_stack_connection)
    pending = register(sm, s3, bucket, "drill-unanswered", status=registry.PENDING)
    assert status_of(sm, pending["arn"]) == registry.PENDING
    review = ModelReviewOperator(task_id="review", subject="deploy?", registered=pending)
    assert review.defaults == ["Reject"]  # what the sweep answers when the time is up
    reason = "no answer within 24 h: rejected (the review's default)"
    assert review.record_answer("Reject", None, 24) == (registry.REJECTED, reason)
    described = sm.describe_model_package(ModelPackageName=pending["arn"])
    assert described["ModelApprovalStatus"] == registry.REJECTED
    assert described["ApprovalDescription"] == reason
    # The version's metadata survives the update (moto replaces what an update leaves out).
    assert described["CustomerMetadataProperties"]["model-version"] == "drill-unanswered"
