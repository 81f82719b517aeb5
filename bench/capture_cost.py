"""The cost of data capture on the API's latency: the same endpoint, model and photos through the
public API (local gateway -> Lambda -> endpoint), with capture off and with 100% of requests captured,
in turns (off, on, off, on, ...) within one run, so that drift of the machine shows as a difference
between rounds, not as capture's cost.

  PYTHONPATH=plugins .venv/bin/python -m bench.capture_cost --model models/bin-counter.tar.gz \\
      --images ../shared/abid/bin-images --limit 20 --seconds 20 --rounds 2

Starts the stack as bench/api_latency.py does; capture on is an endpoint configuration with
bin_counter.capture.data_capture_config(bucket, 100), switched to with UpdateEndpoint. Prints one
JSON line per phase, the capture files written, and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import boto3

from bench.stack import API_KEY, ENDPOINT, ROOT, api_stack
from bin_counter.api_client import images_in
from bin_counter.api_load import gateway_sender, run_load
from bin_counter.capture import CAPTURE_PREFIX, data_capture_config


def switch(sm, config_name: str, capture: dict | None) -> None:
    """Serve the endpoint's model under a new configuration `config_name` (with `capture`, or none)."""
    current = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    )
    extra = {"DataCaptureConfig": capture} if capture else {}
    sm.create_endpoint_config(EndpointConfigName=config_name, ProductionVariants=current["ProductionVariants"], **extra)
    sm.update_endpoint(EndpointName=ENDPOINT, EndpointConfigName=config_name)
    deadline = time.time() + 300
    while time.time() < deadline:
        described = sm.describe_endpoint(EndpointName=ENDPOINT)
        if described["EndpointStatus"] == "InService" and described["EndpointConfigName"] == config_name:
            return
        time.sleep(0.2)
    raise SystemExit(f"the endpoint did not switch to {config_name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model.tar.gz as train.py writes it")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "abid" / "bin-images"))
    parser.add_argument("--limit", type=int, default=20, help="photos taken from --images, sent in turn")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients")
    args = parser.parse_args()
    images = images_in([args.images])[: args.limit]
    if not images:
        raise SystemExit(f"no images in {args.images}")
    with api_stack(Path(args.model), "bench-capture-") as stack:
        sm = boto3.client("sagemaker", endpoint_url=stack.url)
        send = gateway_sender(f"{stack.url}/count", API_KEY, images)
        run_load(send, args.clients, 3)  # warm: the model's first requests, Lambda's cold start
        rows = []
        for number in range(args.rounds):
            for capture in (None, data_capture_config("bench", 100)):
                switch(sm, f"{ENDPOINT}-{number}-{'on' if capture else 'off'}", capture)
                run_load(send, args.clients, 2)  # the new fleet's first requests
                summary = run_load(send, args.clients, args.seconds).summary()
                phase = {"round": number + 1, "capture": "100%" if capture else "off", **summary}
                print(json.dumps(phase), flush=True)
                rows.append(phase)
        time.sleep(3)  # the capture writer's interval: the last files land
        files = stack.s3.list_objects_v2(Bucket="bench", Prefix=f"{CAPTURE_PREFIX}/").get("KeyCount", 0)
        print(json.dumps({"capture_files": files}))
        print("| round | capture | clients | requests | failed | answers/s | p50 ms | p99 ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['round']} | {r['capture']} | {r['clients']} | {r['sent']} | {r['failed']} | {r['ok_per_s']} "
                f"| {r['p50_ms']} | {r['p99_ms']} |"
            )


if __name__ == "__main__":
    main()
