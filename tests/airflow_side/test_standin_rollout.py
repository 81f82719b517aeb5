"""Blue/green endpoint updates on the stand-in, as SageMaker runs an UpdateEndpoint with a
`DeploymentConfig`: the new fleet beside the old, a canary's share of requests, the baking periods with
the rollback alarms evaluated against the metrics the endpoint publishes to CloudWatch (moto), and the
rollback. Also several instances per endpoint, round robin. The models are tiny (code/inference.py only:
no weights to load) so that each test's endpoint starts in a second or two."""

from __future__ import annotations

import io
import json
import tarfile
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from standin.cloudwatch.metrics import MetricPublisher
from standin.launch import free_port
from standin.sagemaker import rollout
from standin.sagemaker.exceptions import ValidationException
from tests.airflow_side.conftest import CONTAINER_PYTHON, deployed_model, sagemaker_client, wait_endpoint

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")

# A model that answers which instance (its model folder) and which version served the request.
HEALTHY = b"""import json, os

def model_fn(model_dir):
    return {"instance": os.path.basename(model_dir), "version": open(os.path.join(model_dir, "version")).read()}

def input_fn(body, content_type):
    return body

def predict_fn(data, model):
    return model

def output_fn(prediction, accept):
    return json.dumps(prediction)
"""
# The same model with a bug in its serving code: it loads, answers /ping, and fails every request (500).
FAILING = (
    HEALTHY
    + b"""
def predict_fn(data, model):
    raise RuntimeError("CUDA error: device-side assert triggered")
"""
)
ONE_WORKER = {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}  # one worker per instance: half the start-ups


def model_archive(version: str, code: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in (("version", version.encode()), ("code/inference.py", code)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


def tiny_model(sm, s3, bucket: str, name: str, code: bytes = HEALTHY, instances: int = 1) -> str:
    """A model and endpoint config `name` of a tiny model.tar.gz (version `name`), `instances` instances."""
    s3.put_object(Bucket=bucket, Key=f"{name}/model.tar.gz", Body=model_archive(name, code))
    deployed_model(sm, name, artifact=f"s3://{bucket}/{name}/model.tar.gz", environment=ONE_WORKER)
    if instances != 1:
        sm.delete_endpoint_config(EndpointConfigName=name)
        sm.create_endpoint_config(
            EndpointConfigName=name,
            ProductionVariants=[
                {
                    "VariantName": "AllTraffic",
                    "ModelName": name,
                    "InstanceType": "ml.m5.large",
                    "InitialInstanceCount": instances,
                }
            ],
        )
    return name


def ask(runtime, endpoint: str) -> dict:
    """The model's answer, or {"error": status} for a ModelError."""
    try:
        answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=b"{}", ContentType="application/json")
    except ClientError as exc:
        return {"error": exc.response["Error"]["Code"], "status": exc.response.get("OriginalStatusCode")}
    return json.loads(answer["Body"].read())


@pytest.fixture
def clients(standin, moto_endpoint, s3, bucket):
    sm = sagemaker_client(standin)
    runtime = boto3.client("sagemaker-runtime", endpoint_url=standin["endpoint"], region_name="us-east-1")
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    return sm, runtime, cloudwatch


def serve(sm, endpoint: str, config: str) -> None:
    sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=config)
    assert wait_endpoint(sm, endpoint, timeout=120)["EndpointStatus"] == "InService"


def error_alarm(cloudwatch, endpoint: str) -> str:
    """The deploy DAG's 5xx alarm, as the shared interface defines it."""
    name = f"{endpoint}-invocation-5xx-errors"
    cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace="AWS/SageMaker",
        MetricName="Invocation5XXErrors",
        Dimensions=[{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": "AllTraffic"}],
        Statistic="Sum",
        Period=60,
        EvaluationPeriods=1,
        DatapointsToAlarm=1,
        Threshold=1,
        ComparisonOperator="GreaterThanOrEqualToThreshold",
        TreatMissingData="notBreaching",
    )
    return name


def blue_green(kind: str, bake: int, alarms: list[str], **routing) -> dict:
    config: dict = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": kind, "WaitIntervalInSeconds": bake, **routing},
            "TerminationWaitInSeconds": 0,
            "MaximumExecutionTimeoutInSeconds": 600,
        }
    }
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    return config


CANARY_HALF = {"CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 50}}


def traffic_during(sm, runtime, endpoint: str, timeout: float = 90) -> tuple[list[dict], list[str]]:
    """Requests sent one after another while the update runs: the answers, and the statuses seen."""
    answers, statuses = [], []
    deadline = time.time() + timeout
    while time.time() < deadline:
        described = sm.describe_endpoint(EndpointName=endpoint)
        statuses.append(described["EndpointStatus"])
        if described["EndpointStatus"] != "Updating":
            break
        answers.append(ask(runtime, endpoint))
        time.sleep(0.05)
    return answers, statuses


def metric_sum(cloudwatch, endpoint: str, metric: str, unit: str | None = None) -> float:
    now = time.time()
    found = cloudwatch.get_metric_statistics(
        Namespace="AWS/SageMaker",
        MetricName=metric,
        Dimensions=[{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": "AllTraffic"}],
        StartTime=now - 600,
        EndTime=now + 60,
        Period=60,
        Statistics=["Sum", "SampleCount"],
        **({"Unit": unit} if unit else {}),
    )["Datapoints"]
    return sum(d["Sum"] for d in found)


def test_instances_take_requests_round_robin_and_publish_sagemakers_metrics(clients, s3, bucket):
    sm, runtime, cloudwatch = clients
    tiny_model(sm, s3, bucket, "pair", instances=2)
    serve(sm, "rr", "pair")
    variant = sm.describe_endpoint(EndpointName="rr")["ProductionVariants"][0]
    assert (variant["CurrentInstanceCount"], variant["DesiredInstanceCount"]) == (2, 2)

    served = [ask(runtime, "rr")["instance"] for _ in range(6)]
    assert len(set(served)) == 2
    assert served[0::2] == [served[0]] * 3 and served[1::2] == [served[1]] * 3  # strictly alternating

    deadline = time.time() + 10
    while metric_sum(cloudwatch, "rr", "Invocations") < 6 and time.time() < deadline:
        time.sleep(0.5)
    assert metric_sum(cloudwatch, "rr", "Invocations", "None") == 6
    assert metric_sum(cloudwatch, "rr", "InvocationsPerInstance") == pytest.approx(3.0)  # 1/2 per request
    assert metric_sum(cloudwatch, "rr", "Invocation5XXErrors") == 0
    assert metric_sum(cloudwatch, "rr", "Invocation4XXErrors") == 0
    assert metric_sum(cloudwatch, "rr", "ModelLatency", "Microseconds") > 0
    assert metric_sum(cloudwatch, "rr", "OverheadLatency", "Microseconds") >= 0
    listed = cloudwatch.list_metrics(Namespace="AWS/SageMaker", Dimensions=[{"Name": "EndpointName", "Value": "rr"}])
    names = {m["MetricName"] for m in listed["Metrics"]}
    assert {"Invocations", "Invocation4XXErrors", "Invocation5XXErrors", "ModelLatency", "OverheadLatency"} <= names
    assert all({d["Name"] for d in m["Dimensions"]} == {"EndpointName", "VariantName"} for m in listed["Metrics"])


def test_a_canary_whose_model_fails_rolls_back_on_its_alarm(clients, s3, bucket):
    sm, runtime, cloudwatch = clients
    tiny_model(sm, s3, bucket, "blue")
    tiny_model(sm, s3, bucket, "bad", code=FAILING, instances=2)  # a canary is a whole instance of two
    serve(sm, "canary-bad", "blue")
    alarm = error_alarm(cloudwatch, "canary-bad")

    sm.update_endpoint(
        EndpointName="canary-bad",
        EndpointConfigName="bad",
        DeploymentConfig=blue_green("CANARY", 8, [alarm], **CANARY_HALF),
    )
    answers, statuses = traffic_during(sm, runtime, "canary-bad")
    endpoint = sm.describe_endpoint(EndpointName="canary-bad")

    assert statuses[0] == "Updating" and statuses[-1] == "InService"
    assert endpoint["EndpointConfigName"] == "blue"  # rolled back: the old configuration serves
    assert alarm in endpoint["FailureReason"] and "rolled back" in endpoint["FailureReason"]
    assert endpoint["LastDeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == "CANARY"
    assert "PendingDeploymentSummary" not in endpoint
    described = cloudwatch.describe_alarms(AlarmNames=[alarm])["MetricAlarms"][0]
    assert described["StateValue"] == "ALARM"
    assert described["StateReason"].startswith("Threshold Crossed: 1 out of the last 1 datapoints [")

    errors = [a for a in answers if "error" in a]
    assert errors and all(e == {"error": "ModelError", "status": 500} for e in errors)
    # The weighted round robin sends every other request to the canary: at most half of them failed.
    assert len(errors) <= (len(answers) + 1) // 2
    assert all(ask(runtime, "canary-bad")["version"] == "blue" for _ in range(4))  # all back on blue


def test_a_healthy_canary_completes_and_the_new_config_serves(clients, s3, bucket):
    sm, runtime, cloudwatch = clients
    tiny_model(sm, s3, bucket, "v1")
    tiny_model(sm, s3, bucket, "v2", instances=2)
    serve(sm, "canary-good", "v1")
    alarm = error_alarm(cloudwatch, "canary-good")

    with pytest.raises(ClientError, match="50%"):  # a canary above half the fleet is refused at the request
        sm.update_endpoint(
            EndpointName="canary-good",
            EndpointConfigName="v2",
            DeploymentConfig=blue_green("CANARY", 2, [alarm], CanarySize={"Type": "CAPACITY_PERCENT", "Value": 60}),
        )
    sm.update_endpoint(
        EndpointName="canary-good",
        EndpointConfigName="v2",
        DeploymentConfig=blue_green("CANARY", 2, [alarm], **CANARY_HALF),
    )
    answers, statuses = traffic_during(sm, runtime, "canary-good")
    endpoint = sm.describe_endpoint(EndpointName="canary-good")
    assert statuses[-1] == "InService" and endpoint["EndpointConfigName"] == "v2"
    assert "FailureReason" not in endpoint
    assert not [a for a in answers if "error" in a]
    assert {a["version"] for a in answers} <= {"v1", "v2"}
    assert cloudwatch.describe_alarms(AlarmNames=[alarm])["MetricAlarms"][0]["StateValue"] == "OK"
    assert ask(runtime, "canary-good")["version"] == "v2"


def test_an_all_at_once_update_without_alarms_completes(clients, s3, bucket):
    sm, runtime, _ = clients
    tiny_model(sm, s3, bucket, "old")
    tiny_model(sm, s3, bucket, "new")
    serve(sm, "at-once", "old")
    sm.update_endpoint(
        EndpointName="at-once", EndpointConfigName="new", DeploymentConfig=blue_green("ALL_AT_ONCE", 1, [])
    )
    _, statuses = traffic_during(sm, runtime, "at-once")
    endpoint = sm.describe_endpoint(EndpointName="at-once")
    assert statuses[-1] == "InService" and endpoint["EndpointConfigName"] == "new"
    assert endpoint["LastDeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == (
        "ALL_AT_ONCE"
    )
    assert ask(runtime, "at-once")["version"] == "new"


def test_the_traffic_steps_of_each_routing_type():
    linear = {
        "TrafficRoutingConfiguration": {
            "Type": "LINEAR",
            "WaitIntervalInSeconds": 3,
            "LinearStepSize": {"Type": "INSTANCE_COUNT", "Value": 3},
        }
    }
    assert rollout.steps(linear, 10) == [(0.3, 3), (0.6, 3), (0.9, 3), (1.0, 3)]
    canary = {"TrafficRoutingConfiguration": {"Type": "CANARY", "WaitIntervalInSeconds": 5, **CANARY_HALF}}
    assert rollout.steps(canary, 2) == [(0.5, 5), (1.0, 5)]
    assert rollout.steps(canary, 5) == [(0.4, 5), (1.0, 5)]  # 50% of five instances is two whole ones
    # A canary turns on whole instances: half of one instance is none, and SageMaker's bound is half the fleet.
    with pytest.raises(ValidationException, match="no whole instance"):
        rollout.check(blue_green("CANARY", 1, [], **CANARY_HALF), 1)
    with pytest.raises(ValidationException, match="50%"):
        rollout.check(blue_green("CANARY", 1, [], CanarySize={"Type": "INSTANCE_COUNT", "Value": 2}), 3)
    linear_quarter = {"LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25}}
    with pytest.raises(ValidationException, match="no whole instance"):
        rollout.check(blue_green("LINEAR", 1, [], **linear_quarter), 2)
    rollout.check(blue_green("LINEAR", 1, [], **linear_quarter), 4)
    assert rollout.steps({"TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}}, 4) == [
        (1.0, 0)
    ]
    with pytest.raises(ValidationException, match="10-50%"):
        rollout.check(blue_green("LINEAR", 1, [], LinearStepSize={"Type": "INSTANCE_COUNT", "Value": 3}), 4)
    with pytest.raises(ValidationException, match="larger than the total waiting time"):
        config = blue_green("ALL_AT_ONCE", 700, [])
        rollout.check(config, 1)


def test_an_unreachable_cloudwatch_never_fails_an_invocation():
    unreachable = boto3.client(
        "cloudwatch",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    publisher = MetricPublisher(lambda: unreachable, interval=3600)
    publisher.record("e", "AllTraffic", 500, 0.01, 0.001, 1)
    publisher.flush()  # logs a warning, raises nothing
    assert publisher.failing and not publisher.pending
    publisher.stop()
