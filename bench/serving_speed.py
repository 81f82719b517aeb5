"""Serving speed: the API's latency, throughput and memory with this checkout's serving code and
published model, for each number of model server workers, side by side in one run; with the
seed-style model's bare forward pass on the same threads for scale.

  PYTHONPATH=plugins .venv/bin/python -m bench.serving_speed --seconds 15 --runs 30 --repeat 3 [--workers 1 2]

One after the other, each in its own processes:
  1. the bare pass: an eager ResNet34, one view, fp32 (the seed's model), on 1 and 2 threads; the
     archive's handlers in-process on one photo, with each --workers setting (it sets the threads);
  2. per arm (one per --workers: SAGEMAKER_MODEL_SERVER_WORKERS): bench.stack's moto server and
     stand-in, the model at an endpoint, the API function in front; the endpoint's first ten answers,
     the model server directly, InvokeEndpoint and POST /count with 1 client, POST /count with
     --clients clients, the Lambda function's first (cold) answer, and the resident memory of every
     process of the endpoint.
The arms run --repeat times, interleaved, and the tables give each number's median: this machine's
speed drifts by a quarter between minutes. Prints one JSON line per arm's run and Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.measure import memory_mb, p50, timed

ROOT = Path(__file__).resolve().parents[1]
CONTAINER_PYTHON = ROOT / ".venv-container" / "bin" / "python"
PHOTO = "00010.jpg"  # an original-size photo (not one of the 224 px copies)
WORKERS = "SAGEMAKER_MODEL_SERVER_WORKERS"


# -- in the container-side environment -------------------------------------------------------------
def handler_main(args: argparse.Namespace) -> None:
    """p50 of the archive's handlers in-process on one photo; and the bare ResNet34 pass."""
    import torch

    data = Path(args.photo).read_bytes()
    result = {}
    if args.model_dir:
        sys.path.insert(0, f"{args.model_dir}/code")
        import inference

        model = inference.model_fn(args.model_dir)

        def answer():
            return inference.output_fn(
                inference.predict_fn(inference.input_fn(data, "image/jpeg"), model), "application/json"
            )

        result["handlers_p50_ms"] = p50(timed(answer, args.runs))
    else:
        import torchvision

        import preprocessing  # sagemaker_code/, on PYTHONPATH (main starts this process so)

        torch.set_num_threads(args.threads)
        net = torchvision.models.resnet34(num_classes=6).eval()
        image = preprocessing.normalize(preprocessing.decode(data, 224).unsqueeze(0).float() / 255)
        with torch.inference_mode():
            result["bare_p50_ms"] = p50(timed(lambda: net(image), args.runs))
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


# -- one arm, in the Airflow-side environment -------------------------------------------------------
def front_port(pids: list[int]) -> int:
    for pid in pids:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(w.endswith(b"model_frontend.py") for w in words):
            return int(words[words.index(b"--port") + 1])
    raise RuntimeError("no model server front end found")


def arm_main(args: argparse.Namespace) -> None:
    # The Airflow side's modules, imported here: the container side imports this module for `handler`.
    import urllib.request

    import boto3
    from botocore.config import Config

    from bench.stack import API_KEY, ENDPOINT, api_stack
    from bin_counter.api_load import gateway_sender, run_load
    from standin.sagemaker.endpoints import model_server_processes

    photos = [Path(p) for p in json.loads(args.photos)]
    body = Path(args.photo).read_bytes()
    environment = {"SAGEMAKER_PROGRAM": "inference.py", **({WORKERS: args.workers} if args.workers else {})}
    result: dict = {"arm": args.name}
    with api_stack(Path(args.model), "bench-serving-", environment) as stack:
        result["ready_s"] = stack.ready_s
        runtime = boto3.client(
            "sagemaker-runtime",
            endpoint_url=stack.url,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}, max_pool_connections=args.clients * 2),
        )

        def invoke_endpoint():
            runtime.invoke_endpoint(EndpointName=ENDPOINT, ContentType="image/jpeg", Body=body)["Body"].read()

        first_ten = timed(invoke_endpoint, 10, warm=0)
        result["first_ms"], result["tenth_ms"] = round(first_ten[0], 1), round(first_ten[9], 1)
        port = front_port(model_server_processes(stack.state))

        def direct():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, method="POST", headers={"Content-Type": "image/jpeg"}
            )
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - loopback
                answer.read()

        result["model_server_p50_ms"] = p50(timed(direct, args.runs))
        result["invoke_endpoint_p50_ms"] = p50(timed(invoke_endpoint, args.runs))
        send_one = gateway_sender(f"{stack.url}/count", API_KEY, [Path(args.photo)])
        result["lambda_cold_ms"] = round(timed(lambda: send_one(0), 1, warm=0)[0], 1)
        one = timed(lambda: send_one(0), args.runs)
        result["api_p50_ms"], result["api_p99_ms"] = p50(one), round(sorted(one)[int(len(one) * 0.99) - 1], 1)
        send = gateway_sender(f"{stack.url}/count", API_KEY, photos)
        run_load(send, args.clients, 3)  # every Lambda environment warm
        for clients in (1, args.clients):
            summary = run_load(send, clients, args.seconds).summary()
            kept = ("sent", "failed", "ok_per_s", "p50_ms", "p99_ms")
            result[f"api_{clients}_clients"] = {k: summary[k] for k in kept}
        result["memory"] = memory_mb(model_server_processes(stack.state))
    print(json.dumps(result))


# -- the run -----------------------------------------------------------------------------------------
def run_json(command: list[str], cwd: Path, env: dict | None = None) -> dict:
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extracted(archive: Path, into: Path) -> str:
    into.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(into)], check=True)
    return str(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "bin-counter.tar.gz"), help="the model archive")
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"), help="the ABID mirror")
    parser.add_argument("--workers", nargs="+", default=["1", "2"], help=f"{WORKERS} of each arm, one arm each")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per load phase")
    parser.add_argument("--clients", type=int, default=4, help="clients of the concurrent phase")
    parser.add_argument("--runs", type=int, default=40, help="requests per one-client p50")
    parser.add_argument("--limit", type=int, default=20, help="photos sent in turn by the load phases")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every arm, interleaved; the tables give medians")
    args = parser.parse_args()
    abid = Path(args.abid)
    photo = str(abid / "bin-images" / PHOTO)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        model_dir = extracted(Path(args.model), work / "model")
        module = ["-m", "bench.serving_speed"]  # from the repository root (run_json's cwd)
        report: dict = {}
        handler = [str(CONTAINER_PYTHON), *module, "handler", "--photo", photo, "--runs", str(args.runs)]
        report["bare_resnet34_p50_ms"] = bare = {
            threads: run_json(
                [*handler, "--threads", str(threads)], ROOT, {"PYTHONPATH": str(ROOT / "sagemaker_code")}
            )["bare_p50_ms"]
            for threads in (1, 2)
        }
        report["handlers_in_process"] = handlers = {
            arm_name(workers): run_json([*handler, "--model-dir", model_dir], ROOT, {WORKERS: workers})
            for workers in args.workers
        }
        print(json.dumps({"bare": bare, "handlers": handlers}), flush=True)

        from bin_counter.api_client import images_in  # Airflow side (see arm_main)

        photos = json.dumps([str(p) for p in images_in([str(abid / "bin-images")])[: args.limit]])
        runs: dict[str, list[dict]] = {arm_name(w): [] for w in args.workers}
        for _ in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every arm
            for workers in args.workers:
                command = [
                    sys.executable,
                    *module,
                    "arm",
                    "--name",
                    arm_name(workers),
                    "--model",
                    args.model,
                    "--photo",
                    photo,
                    "--photos",
                    photos,
                    "--workers",
                    workers,
                    "--seconds",
                    str(args.seconds),
                    "--clients",
                    str(args.clients),
                    "--runs",
                    str(args.runs),
                ]
                found = run_json(command, ROOT, {"PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}"})
                print(json.dumps(found), flush=True)
                runs[arm_name(workers)].append(found)
        report["arms"] = [median_of(found) for found in runs.values()]
        print_tables(report, args.clients)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def arm_name(workers: str) -> str:
    return f"{workers} worker(s)"


def median_of(found: list[dict]) -> dict:
    """One arm's repeats as one: each number their median; the throughput also as its range."""

    def merge(values: list):
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            return round(statistics.median(values), 2)
        return values[0]

    merged = merge(found)
    merged["throughputs"] = sorted(
        f[k]["ok_per_s"]
        for f in found
        for k in f
        if k.startswith("api_") and k.endswith("_clients") and k != "api_1_clients"
    )
    merged["repeats"] = len(found)
    return merged


def print_tables(report: dict, clients: int) -> None:
    print(f"\n| path | {' | '.join(a['arm'] for a in report['arms'])} |")
    print("| --- |" + " --- |" * len(report["arms"]))
    rows = [
        ("handlers in-process, p50 ms", lambda a: report["handlers_in_process"][a["arm"]]["handlers_p50_ms"]),
        ("model server /invocations, p50 ms", lambda a: a["model_server_p50_ms"]),
        ("InvokeEndpoint, p50 ms", lambda a: a["invoke_endpoint_p50_ms"]),
        ("API (POST /count), 1 client, p50 / p99 ms", lambda a: f"{a['api_p50_ms']} / {a['api_p99_ms']}"),
        (
            f"API, {clients} clients, answers/s (median; each run)",
            lambda a: f"{a[f'api_{clients}_clients']['ok_per_s']} ({', '.join(map(str, a['throughputs']))})",
        ),
        (
            f"API, {clients} clients, p50 / p99 ms",
            lambda a: f"{a[f'api_{clients}_clients']['p50_ms']} / {a[f'api_{clients}_clients']['p99_ms']}",
        ),
        (
            "endpoint memory: processes, RSS MB, PSS MB",
            lambda a: f"{a['memory']['processes']}, {a['memory']['rss_mb']}, {a['memory']['pss_mb']}",
        ),
        ("endpoint ready (CreateEndpoint to InService), s", lambda a: a["ready_s"]),
        ("first / tenth answer of a new endpoint, ms", lambda a: f"{a['first_ms']} / {a['tenth_ms']}"),
        ("Lambda cold start: first POST /count, ms", lambda a: a["lambda_cold_ms"]),
    ]
    for label, cell in rows:
        print(f"| {label} | {' | '.join(str(cell(a)) for a in report['arms'])} |")
    bare = report["bare_resnet34_p50_ms"]
    print(f"\nseed-style bare pass (eager ResNet34, one view, fp32): p50 {bare[1]} ms on 1 thread, {bare[2]} ms on 2")


def get_args_parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"bench.serving_speed {command} (run by main)")
    parser.add_argument("command")
    parser.add_argument("--model-dir", default=None, help="an extracted model.tar.gz")
    parser.add_argument("--model", default=None, help="a model.tar.gz")
    parser.add_argument("--photo", default=None, help="the one photo of the p50s")
    parser.add_argument("--photos", default="[]", help="JSON list of the load phases' photos")
    parser.add_argument("--threads", type=int, default=1, help="threads of the bare pass")
    parser.add_argument("--runs", type=int, default=40, help="requests per p50")
    parser.add_argument("--name", default="", help="the arm's name")
    parser.add_argument("--workers", default="", help=f"{WORKERS} of the arm's model ('' leaves it unset)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per load phase")
    parser.add_argument("--clients", type=int, default=4, help="clients of the concurrent phase")
    return parser


if __name__ == "__main__":
    commands = {"handler": handler_main, "arm": arm_main}
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        commands[sys.argv[1]](get_args_parser_for(sys.argv[1]).parse_args())
    else:
        main()
