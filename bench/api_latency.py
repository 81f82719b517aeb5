"""Latency and throughput of the public API (local gateway -> Lambda -> endpoint) against the
endpoint alone, same model, same photos, same run.

  PYTHONPATH=plugins .venv/bin/python -m bench.api_latency --model models/bin-counter.tar.gz \\
      --images ../shared/abid/bin-images --limit 20 --seconds 30

Starts a moto server and the stand-in on loopback, serves the model.tar.gz at an endpoint, creates
the API function in front of it, then runs bin_counter.api_load's closed-loop clients against
InvokeEndpoint (boto3) and against POST /count (HTTP), with 1 client and with --clients clients.
Prints one JSON line per phase and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from bench.stack import API_KEY, ENDPOINT, ROOT, api_stack
from bin_counter.api_client import images_in
from bin_counter.api_load import NO_ANSWER, gateway_sender, run_load


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

    with api_stack(Path(args.model), "bench-api-") as stack:
        runtime = boto3.client(
            "sagemaker-runtime",
            endpoint_url=stack.url,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}, max_pool_connections=args.clients * 2),
        )
        paths = {
            "endpoint alone (InvokeEndpoint)": endpoint_sender(runtime, ENDPOINT, images),
            "gateway -> Lambda -> endpoint (POST /count)": gateway_sender(f"{stack.url}/count", API_KEY, images),
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
