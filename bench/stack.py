"""The local stack the serving benchmarks (api_latency, batch_vs_api, serving_speed) start: a moto
server and the stand-in on loopback, a model.tar.gz served at an endpoint, and the API function in
front of it. Airflow-side environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3

from bin_counter.api_function import ensure_function
from standin.iam import service_role
from standin.launch import LOCAL_STACK_PARAMETERS, start_moto, start_standin

NO_FORK_SERVER = ("--no-fork-server",)

ROOT = Path(__file__).resolve().parents[1]

CONTAINER_PYTHON = ROOT / ".venv-container" / "bin" / "python"
API_KEY = "bench-key"
ROLE = "arn:aws:iam::000000000000:role/bench"
# The local stack's names: the stand-in's gateway calls its function (standin.launch).
ENDPOINT = LOCAL_STACK_PARAMETERS["EndpointName"]
FUNCTION = LOCAL_STACK_PARAMETERS["FunctionName"]


def serve_endpoint(
    sm, name: str, model_data_url: str, role: str, environment: dict | None = None, timeout_s: float = 300
) -> float:
    """A model, its endpoint config and endpoint `name` (ml.m5.large, one instance) for `model_data_url`;
    the seconds from CreateEndpoint to InService. SystemExit when it does not come up."""
    sm.create_model(
        ModelName=name,
        ExecutionRoleArn=role,
        PrimaryContainer={
            "Image": "local/pytorch-inference:cpu",
            "ModelDataUrl": model_data_url,
            "Environment": environment or {},
        },
    )
    sm.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": name, "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}
        ],
    )
    started = time.perf_counter()
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    while (status := sm.describe_endpoint(EndpointName=name)["EndpointStatus"]) == "Creating":
        if time.perf_counter() - started > timeout_s:
            break
        time.sleep(0.1)
    if status != "InService":
        raise SystemExit(f"the endpoint {name} did not come up: {status}")
    return round(time.perf_counter() - started, 1)


@dataclass
class Stack:
    url: str  # the stand-in: SageMaker, SageMaker Runtime, Lambda and the gateway (POST {url}/count)
    s3: object  # an S3 client of the moto server; the model lies in the bucket `bench`
    state: Path  # the stand-in's state folder (its endpoint's processes name it)
    ready_s: float  # CreateEndpoint to InService


@contextlib.contextmanager
def api_stack(model: Path, state_prefix: str, environment: dict | None = None) -> Iterator[Stack]:
    """A moto server and the stand-in on loopback, `model` served at the endpoint ENDPOINT (its
    container's `environment` set) with the API function FUNCTION in front of it, not yet invoked.
    Everything is stopped and the state folder removed on the way out."""
    # Loopback servers only: any credentials do, and the stand-in (and its Lambda) inherit them.
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ[name] = value
    state = Path(tempfile.mkdtemp(prefix=state_prefix))
    moto, moto_url = start_moto()
    service_role(
        boto3.client("iam", endpoint_url=moto_url),
        ROLE.rsplit("/", 1)[1],
        "sagemaker.amazonaws.com",
        "lambda.amazonaws.com",
    )
    # A fresh interpreter per model server, as on SageMaker: the memory rows count each process's own
    # pages, which a fork server's children would share with it (standin/forkserver.py).
    standin, url = start_standin(state, moto_url, CONTAINER_PYTHON, api_key=API_KEY, extra_args=NO_FORK_SERVER)
    try:
        s3 = boto3.client("s3", endpoint_url=moto_url)
        s3.create_bucket(Bucket="bench")
        s3.upload_file(str(model), "bench", "model/model.tar.gz")
        sm = boto3.client("sagemaker", endpoint_url=url)
        ready_s = serve_endpoint(sm, ENDPOINT, "s3://bench/model/model.tar.gz", ROLE, environment)
        ensure_function(boto3.client("lambda", endpoint_url=url), FUNCTION, ENDPOINT, ROLE)
        yield Stack(url, s3, state, ready_s)
    finally:
        for process in (standin, moto):
            process.terminate()
            process.wait(timeout=20)
        shutil.rmtree(state, ignore_errors=True)
