"""Latency and throughput of the public API (local gateway -> Lambda -> endpoint) against the
endpoint alone, same model, same photos, same run.

  PYTHONPATH=plugins .venv/bin/python -m bench.api_latency --model models/bin-counter-mobilenet_v2.tar.gz \\
      --images ../shared/abid/bin-images --limit 20 --seconds 30

Starts a moto server and the stand-in on loopback, serves the model.tar.gz at an endpoint, creates
the API function in front of it, then runs bin_counter.api_load's closed-loop clients against
InvokeEndpoint (boto3) and against POST /count (HTTP), with 1 client and with --clients clients.
Prints one JSON line per phase and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from bench.serving_speed import serve_endpoint
from bin_counter.api_client import images_in
from bin_counter.api_function import ensure_function
from bin_counter.api_load import NO_ANSWER, gateway_sender, run_load
from standin.iam import service_role
from standin.launch import start_moto, start_standin

ROOT = Path(__file__).resolve().parents[1]

CONTAINER_PYTHON = ROOT / ".venv-container" / "bin" / "python"
API_KEY = "bench-key"
ROLE = "arn:aws:iam::000000000000:role/bench"


def endpoint_sender(runtime, endpoint: str, images: list[Path]):
    bodies = [p.read_bytes() for p in images]

    def send(number: int) -> int:
        try:
            answer = runtime.invoke_endpoint(
                EndpointName=endpoint, ContentType="image/jpeg", Body=bodies[number % len(bodies)]
            )
            json.loads(answer["Body"].read())
            return 200
        except ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"]
        except Exception:
            return NO_ANSWER

    return send


def serve(endpoint_url: str, s3, model: Path, name: str) -> None:
    s3.create_bucket(Bucket="bench")
    s3.upload_file(str(model), "bench", "model/model.tar.gz")
    serve_endpoint(boto3.client("sagemaker", endpoint_url=endpoint_url), name, "s3://bench/model/model.tar.gz", ROLE)


@contextlib.contextmanager
def api_stack(model: Path, state_prefix: str) -> Iterator[tuple[str, object]]:
    """A moto server and the stand-in on loopback, `model` served at the endpoint `bin-counter` with
    the API function in front of it; yields the stand-in's URL and an S3 client (bucket `bench`)."""
    # Loopback servers only: any credentials do, and the stand-in (and its Lambda) inherit them.
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ[name] = value
    moto, moto_url = start_moto()
    service_role(
        boto3.client("iam", endpoint_url=moto_url),
        ROLE.rsplit("/", 1)[1],
        "sagemaker.amazonaws.com",
        "lambda.amazonaws.com",
    )
    standin, url = start_standin(
        Path(tempfile.mkdtemp(prefix=state_prefix)), moto_url, CONTAINER_PYTHON, api_key=API_KEY
    )
    try:
        s3 = boto3.client("s3", endpoint_url=moto_url)
        serve(url, s3, model, "bin-counter")
        ensure_function(boto3.client("lambda", endpoint_url=url), "bin-counter-api", "bin-counter", ROLE)
        yield url, s3
    finally:
        for process in (standin, moto):
            process.terminate()
            process.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model.tar.gz as train.py writes it")
    parser.add_argument(
        "--images", default=str(ROOT.parent / "shared" / "abid" / "bin-images"), help="a folder of bin photos"
    )
    parser.add_argument("--limit", type=int, default=20, help="photos taken from --images, sent in turn")
    parser.add_argument("--seconds", type=float, default=30, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the second phase of each path")
    args = parser.parse_args()
    images = images_in([args.images])[: args.limit]
    if not images:
        raise SystemExit(f"no images in {args.images}")

    with api_stack(Path(args.model), "bench-api-") as (url, _):
        runtime = boto3.client(
            "sagemaker-runtime",
            endpoint_url=url,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}, max_pool_connections=args.clients * 2),
        )
        paths = {
            "endpoint alone (InvokeEndpoint)": endpoint_sender(runtime, "bin-counter", images),
            "gateway -> Lambda -> endpoint (POST /count)": gateway_sender(f"{url}/count", API_KEY, images),
        }
        for send in paths.values():  # warm both paths: the model's first requests, Lambda's cold starts
            run_load(send, args.clients, 3)
        rows = []
        for clients in (1, args.clients):
            for name, send in paths.items():
                summary = run_load(send, clients, args.seconds).summary()
                print(json.dumps({"path": name, **summary}), flush=True)
                rows.append((name, summary))
        print("| path | clients | requests | failed | answers/s | p50 ms | p99 ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, s in rows:
            print(
                f"| {name} | {s['clients']} | {s['sent']} | {s['failed']} | {s['ok_per_s']} | {s['p50_ms']} "
                f"| {s['p99_ms']} |"
            )


if __name__ == "__main__":
    main()
