"""The stand-in honours an endpoint's size: UpdateEndpointWeightsAndCapacities changes the number of
model servers (what Application Auto Scaling calls; the scaling service itself does not run locally),
and a serverless variant serves as SageMaker Serverless Inference does: a model server started by the
first request after idle, at most MaxConcurrency requests at once, a 4 MB body. Tiny models (code only)."""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from standin.sagemaker.endpoints import model_server_processes
from tests.airflow_side.conftest import CONTAINER_PYTHON, sagemaker_client, wait_endpoint
from tests.airflow_side.test_standin_rollout import HEALTHY, ask, serve, tiny_model

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")

# The healthy model, a second and a half per request: requests overlap.
SLOW = (
    HEALTHY
    + b"""
import time

def predict_fn(data, model):
    time.sleep(1.5)
    return model
"""
)


@pytest.fixture
def clients(standin):
    sm = sagemaker_client(standin)
    # No retries: a throttled request is seen as SageMaker answered it.
    runtime = boto3.client(
        "sagemaker-runtime",
        endpoint_url=standin["endpoint"],
        region_name="us-east-1",
        config=Config(retries={"total_max_attempts": 1}),
    )
    return sm, runtime


def wait_updated(sm, name: str) -> dict:
    deadline = time.time() + 120
    while (endpoint := sm.describe_endpoint(EndpointName=name))["EndpointStatus"] == "Updating":
        assert time.time() < deadline, "the endpoint stayed Updating"
        time.sleep(0.3)
    return endpoint


def test_the_instance_count_follows_update_endpoint_weights_and_capacities(clients, s3, bucket):
    sm, runtime = clients
    tiny_model(sm, s3, bucket, "one")
    serve(sm, "sized", "one")
    assert len({ask(runtime, "sized")["instance"] for _ in range(4)}) == 1

    desired = [{"VariantName": "AllTraffic", "DesiredInstanceCount": 2}]
    sm.update_endpoint_weights_and_capacities(EndpointName="sized", DesiredWeightsAndCapacities=desired)
    assert sm.describe_endpoint(EndpointName="sized")["EndpointStatus"] == "Updating"
    with pytest.raises(ClientError, match="in-progress"):  # one change at a time, as SageMaker
        sm.update_endpoint_weights_and_capacities(EndpointName="sized", DesiredWeightsAndCapacities=desired)
    variant = wait_updated(sm, "sized")["ProductionVariants"][0]
    assert (variant["CurrentInstanceCount"], variant["DesiredInstanceCount"]) == (2, 2)
    assert len({ask(runtime, "sized")["instance"] for _ in range(4)}) == 2  # round robin over both

    desired = [{"VariantName": "AllTraffic", "DesiredInstanceCount": 1}]
    sm.update_endpoint_weights_and_capacities(EndpointName="sized", DesiredWeightsAndCapacities=desired)
    variant = wait_updated(sm, "sized")["ProductionVariants"][0]
    assert (variant["CurrentInstanceCount"], variant["DesiredInstanceCount"]) == (1, 1)
    assert len({ask(runtime, "sized")["instance"] for _ in range(4)}) == 1
    with pytest.raises(ClientError, match="not present"):
        sm.update_endpoint_weights_and_capacities(
            EndpointName="sized", DesiredWeightsAndCapacities=[{"VariantName": "Other", "DesiredInstanceCount": 2}]
        )


def serverless_config(sm, name: str, max_concurrency: int) -> None:
    sm.delete_endpoint_config(EndpointConfigName=name)
    sm.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": name,
                "ServerlessConfig": {"MemorySizeInMB": 2048, "MaxConcurrency": max_concurrency},
            }
        ],
    )


@pytest.mark.standin_args("--serverless-idle-s", "2")
def test_a_serverless_endpoint_scales_to_zero_starts_on_a_request_and_throttles_past_its_concurrency(
    clients, standin, s3, bucket
):
    sm, runtime = clients
    tiny_model(sm, s3, bucket, "lean", code=SLOW)
    serverless_config(sm, "lean", max_concurrency=1)
    sm.create_endpoint(EndpointName="lean", EndpointConfigName="lean")
    endpoint = wait_endpoint(sm, "lean", timeout=120)
    variant = endpoint["ProductionVariants"][0]
    assert endpoint["EndpointStatus"] == "InService" and "CurrentInstanceCount" not in variant
    assert variant["CurrentServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 1}

    # Idle: no model server runs.
    deadline = time.time() + 30
    while model_server_processes(standin["state"]) and time.time() < deadline:
        time.sleep(0.2)
    assert not model_server_processes(standin["state"]), "the idle serverless endpoint kept its model server"

    # Two requests at once on a concurrency of one: one is answered (after a cold start), one throttled.
    answers: list[dict] = []
    threads = [threading.Thread(target=lambda: answers.append(ask(runtime, "lean"))) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)  # the first is in flight (starting its model server) when the second comes
    for thread in threads:
        thread.join()
    assert [a for a in answers if "error" in a] == [{"error": "ThrottlingException", "status": None}]
    assert [a["version"] for a in answers if "error" not in a] == ["lean"]
    assert model_server_processes(standin["state"]), "the request started a model server"

    with pytest.raises(ClientError) as refused:  # the serverless body limit, 4 MB
        runtime.invoke_endpoint(EndpointName="lean", Body=b"x" * (4 * 1024 * 1024 + 1), ContentType="image/jpeg")
    assert refused.value.response["Error"]["Code"] == "ValidationError"
    assert "oversize body" in refused.value.response["Error"]["Message"]

    # An update of an endpoint that scaled to zero: the new model serves once it is up.
    tiny_model(sm, s3, bucket, "lean2")
    serverless_config(sm, "lean2", max_concurrency=2)
    while model_server_processes(standin["state"]) and time.time() < deadline + 30:
        time.sleep(0.2)
    sm.update_endpoint(EndpointName="lean", EndpointConfigName="lean2")
    assert wait_updated(sm, "lean")["ProductionVariants"][0]["CurrentServerlessConfig"]["MaxConcurrency"] == 2
    assert ask(runtime, "lean")["version"] == "lean2"
