"""The stand-in's costs: overhead per training job, an endpoint's resident memory (every process), and
InvokeEndpoint latency against calling inference.py's handlers in-process, side by side.

  PYTHONPATH=plugins .venv/bin/python -m bench.standin_overhead --abid ../shared/abid [--requests 200] \
      [--container-python <another container env>/bin/python]

Starts a moto server and the stand-in on loopback; trains a small real model (60 bin photos,
96 px, 1 epoch) through CreateTrainingJob, deploys it, then times one-image requests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import boto3

from bench.measure import descendants, memory_mb
from bench.stack import NO_FORK_SERVER, serve_endpoint
from bin_counter.abid import read_local_records
from bin_counter.sagemaker_config import training_job_config
from standin.iam import service_role
from standin.launch import start_moto, start_standin
from standin.sagemaker.endpoints import model_server_processes

ROOT = Path(__file__).resolve().parents[1]

CONTAINER_PYTHON = ROOT / ".venv-container" / "bin" / "python"
IN_PROCESS = """
import json, sys, time, statistics
sys.path.insert(0, sys.argv[1] + "/code")
import inference
model = inference.model_fn(sys.argv[1])
image = open(sys.argv[2], "rb").read()
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    inference.output_fn(inference.predict_fn(inference.input_fn(image, "image/jpeg"), model), "application/json")
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "per_s": round(len(times) / sum(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"), help="local ABID mirror")
    parser.add_argument("--requests", type=int, default=200, help="one-image requests per side")
    parser.add_argument(
        "--container-python",
        type=Path,
        default=CONTAINER_PYTHON,
        help="the container side's Python, for jobs and the endpoint (default: .venv-container's)",
    )
    args = parser.parse_args()
    container_python = args.container_python
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    moto, moto_endpoint = start_moto()
    service_role(
        boto3.client("iam", endpoint_url=moto_endpoint, region_name="us-east-1"), "local", "sagemaker.amazonaws.com"
    )
    state = ROOT / "build" / "bench-standin"
    subprocess.run(["rm", "-rf", str(state)], check=True)
    standin, endpoint = start_standin(state, moto_endpoint, container_python, extra_args=NO_FORK_SERVER)
    try:
        s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in [*(ROOT / "sagemaker_code").glob("*.py"), ROOT / "sagemaker_code" / "api_contract.json"]:
                tar.add(path, arcname=path.name)
        s3.put_object(Bucket="bench", Key="code/sourcedir.tar.gz", Body=buf.getvalue())
        records = [r for r in read_local_records(args.abid) if r.count <= 5 and "01000" <= r.key < "01200"]
        for i, record in enumerate(records[:80]):
            channel = "validation" if i % 4 == 0 else "train"
            body = (Path(args.abid) / "bin-images" / f"{record.key}.jpg").read_bytes()
            s3.put_object(Bucket="bench", Key=f"data/{channel}/{record.count}/{record.key}.jpg", Body=body)
        sm = boto3.client("sagemaker", endpoint_url=endpoint, region_name="us-east-1")
        config = training_job_config(
            job_name="bench-job",
            image_uri="local",
            role_arn="arn:aws:iam::000000000000:role/local",
            source_s3_uri="s3://bench/code/sourcedir.tar.gz",
            channels={"train": "s3://bench/data/train/", "validation": "s3://bench/data/validation/"},
            output_s3_uri="s3://bench/models/",
            region="us-east-1",
            hyperparameters={"epochs": 1, "image-size": 96, "workers": 2},
        )
        started = time.perf_counter()
        sm.create_training_job(**config)
        peak = {"processes": 0, "rss_mb": 0, "pss_mb": 0}  # the job's processes (the stand-in's children)
        while (job := sm.describe_training_job(TrainingJobName="bench-job"))["TrainingJobStatus"] == "InProgress":
            with contextlib.suppress(OSError, StopIteration):  # a process ended while it was read
                now = memory_mb(descendants(standin.pid))
                peak = max(peak, now, key=lambda m: m["pss_mb"])
            time.sleep(0.1)
        wall = time.perf_counter() - started
        steps = {t["Status"]: t for t in job["SecondaryStatusTransitions"]}
        script = (steps["Uploading"]["StartTime"] - steps["Training"]["StartTime"]).total_seconds()
        results = {
            "job_status": job["TrainingJobStatus"],
            "job_wall_s": round(wall, 1),
            "container_s": round(script, 1),
            "overhead_s": round(wall - script, 1),
            "job_memory_peak": peak,
        }

        results["endpoint_ready_s"] = serve_endpoint(
            sm, "e", job["ModelArtifacts"]["S3ModelArtifacts"], "arn:aws:iam::000000000000:role/local"
        )

        image_path = Path(args.abid) / "bin-images" / "00010.jpg"  # an original photo, decoded at full size
        image = image_path.read_bytes()
        runtime = boto3.client("sagemaker-runtime", endpoint_url=endpoint, region_name="us-east-1")
        times = []
        for _ in range(args.requests):
            t = time.perf_counter()
            runtime.invoke_endpoint(EndpointName="e", ContentType="image/jpeg", Body=image)["Body"].read()
            times.append(time.perf_counter() - t)
        results["invoke_endpoint"] = percentiles(times)

        # Every process of the endpoint: the model server's front end and its workers.
        results["endpoint_memory"] = memory_mb(model_server_processes(state))

        model_dir = next((state / "endpoint-workers" / "e").glob("e-*[0-9]"))
        proc = subprocess.run(
            [str(container_python), "-c", IN_PROCESS, str(model_dir), str(image_path), str(args.requests)],
            capture_output=True,
            text=True,
            check=True,
        )
        results["in_process_handlers"] = percentiles(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results))
    finally:
        standin.terminate()
        standin.wait(timeout=10)
        moto.terminate()


if __name__ == "__main__":
    main()
