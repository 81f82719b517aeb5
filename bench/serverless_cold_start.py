"""Serverless cold start: the first request after idle on a serverless endpoint, against a request on an
instance endpoint serving the same model, in one run on the local stack.

  PYTHONPATH=.:plugins .venv/bin/python -m bench.serverless_cold_start [--repeat 5] [--idle-s 3]

bench.stack's moto server and the stand-in (a fresh interpreter per model server, as a SageMaker
container starts: no fork server), the published model at two endpoints: `bench-instances` (one
ml.m5.large instance, always on) and `bench-serverless` (ServerlessConfig 2048 MB, MaxConcurrency 5).
Each round waits until the serverless endpoint has scaled to zero (the stand-in's --serverless-idle-s),
then times InvokeEndpoint on one photo: the serverless endpoint's first request (its model server
starts: the cold start), its second (warm), and the instance endpoint's. Prints one JSON line per round
and a Markdown table of the medians. On AWS a cold start also provisions compute and pulls the image,
which no local figure includes: read this as the model server's share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = "00010.jpg"  # an original-size photo, as bench.serving_speed sends
SERVERLESS = {"MemorySizeInMB": 2048, "MaxConcurrency": 5}


def serve_serverless(sm, name: str, model_data_url: str, role: str) -> None:
    sm.create_model(
        ModelName=name,
        ExecutionRoleArn=role,
        PrimaryContainer={
            "Image": "local/pytorch-inference:cpu",
            "ModelDataUrl": model_data_url,
            "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
        },
    )
    variant = {"VariantName": "AllTraffic", "ModelName": name, "ServerlessConfig": SERVERLESS}
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[variant])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    while (status := sm.describe_endpoint(EndpointName=name)["EndpointStatus"]) == "Creating":
        time.sleep(0.1)
    if status != "InService":
        raise SystemExit(f"the serverless endpoint did not come up: {status}")


def scaled_to_zero(state: Path, name: str, timeout_s: float) -> None:
    from standin.sagemaker.endpoints import model_server_processes

    deadline = time.monotonic() + timeout_s
    while model_server_processes(state / "endpoint-workers" / name):
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not scale to zero within {timeout_s:.0f} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "bin-counter.tar.gz"), help="the model archive")
    parser.add_argument("--photo", default=str(ROOT.parent / "shared" / "abid" / "bin-images" / PHOTO))
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the table gives medians")
    parser.add_argument("--idle-s", type=float, default=3.0, help="the stand-in's --serverless-idle-s")
    args = parser.parse_args()

    import boto3

    from bench.stack import CONTAINER_PYTHON, NO_FORK_SERVER, ROLE, serve_endpoint
    from standin.iam import service_role
    from standin.launch import start_moto, start_standin

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ[name] = value
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    body = Path(args.photo).read_bytes()
    state = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    moto, moto_url = start_moto()
    service_role(boto3.client("iam", endpoint_url=moto_url), ROLE.rsplit("/", 1)[1], "sagemaker.amazonaws.com")
    idle = ("--serverless-idle-s", str(args.idle_s))
    standin, url = start_standin(state, moto_url, CONTAINER_PYTHON, extra_args=(*NO_FORK_SERVER, *idle))
    rounds = []
    try:
        s3 = boto3.client("s3", endpoint_url=moto_url)
        s3.create_bucket(Bucket="bench")
        s3.upload_file(args.model, "bench", "model/model.tar.gz")
        sm = boto3.client("sagemaker", endpoint_url=url)
        environment = {"SAGEMAKER_PROGRAM": "inference.py"}
        serve_endpoint(sm, "bench-instances", "s3://bench/model/model.tar.gz", ROLE, environment)
        serve_serverless(sm, "bench-serverless", "s3://bench/model/model.tar.gz", ROLE)
        runtime = boto3.client("sagemaker-runtime", endpoint_url=url)

        def invoke_ms(endpoint: str) -> float:
            started = time.perf_counter()
            runtime.invoke_endpoint(EndpointName=endpoint, ContentType="image/jpeg", Body=body)["Body"].read()
            return round((time.perf_counter() - started) * 1000, 1)

        invoke_ms("bench-instances")  # its connections warm, as a serving endpoint's are
        for _ in range(args.repeat):
            scaled_to_zero(state, "bench-serverless", args.idle_s * 10 + 30)
            found = {
                "serverless_cold_ms": invoke_ms("bench-serverless"),
                "serverless_warm_ms": invoke_ms("bench-serverless"),
                "instance_ms": invoke_ms("bench-instances"),
            }
            print(json.dumps(found), flush=True)
            rounds.append(found)
    finally:
        for process in (standin, moto):
            process.terminate()
            process.wait(timeout=20)
        shutil.rmtree(state, ignore_errors=True)
    medians = {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]}
    print(json.dumps({"medians": medians, "rounds": len(rounds)}))
    print("| InvokeEndpoint, one photo, median ms | value |\n| --- | --- |")
    print(f"| serverless, first request after idle (cold start) | {medians['serverless_cold_ms']} |")
    print(f"| serverless, the next request (warm) | {medians['serverless_warm_ms']} |")
    print(f"| instance endpoint, always on | {medians['instance_ms']} |")


if __name__ == "__main__":
    main()
