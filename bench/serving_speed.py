"""Serving fast: the API's latency, throughput and memory with this checkout's serving code against the
code of an earlier commit (the baseline: its handlers, its stand-in and its published model), and
the seed-style model's bare forward pass, side by side in one run; and whether the counts changed.

  PYTHONPATH=plugins .venv/bin/python -m bench.serving_speed --baseline-ref c0da49b \\
      --abid ../shared/abid --seconds 20 --clients 4 [--workers 1 2] [--skip-counts]

One after the other, each in its own processes:
  1. counts: the 554 held-out test photos (the accuracy experiments' key-block split) through each
     archive's own inference.py in-process: how many counts differ, and each one's accuracy;
  2. the bare pass: an eager ResNet34, one view, fp32 (the seed's model), with as many threads as a
     worker gets; each archive's handlers in-process on one photo;
  3. per arm (the baseline, then this checkout with each --workers): a moto server and that tree's
     stand-in, the arm's model at an endpoint (SAGEMAKER_MODEL_SERVER_WORKERS set for this checkout's
     arms), the API function in front; the endpoint's first ten answers, the model server directly,
     InvokeEndpoint and POST /count with 1 client, POST /count with --clients clients, the Lambda
     function's first (cold) answer, and the resident memory of every process of the endpoint.
The arms run --repeat times, interleaved (baseline, then each of this checkout's, again), and the
tables give each number's median: this machine's speed drifts by a quarter between minutes. Prints
one JSON line per arm's run and Markdown tables. The baseline tree comes from `git archive`.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTAINER_PYTHON = ROOT / ".venv-container" / "bin" / "python"
PHOTO = "00010.jpg"  # an original-size photo (not one of the 224 px copies)
WORKERS = "SAGEMAKER_MODEL_SERVER_WORKERS"


def timed(call, runs: int, warm: int = 3) -> list[float]:
    for _ in range(warm):
        call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def p50(times: list[float]) -> float:
    return round(statistics.median(times), 1)


# -- in the container-side environment -------------------------------------------------------------
def counts_main(args: argparse.Namespace) -> None:
    """Counts of the listed photos through the archive's own inference.py (in-process, one at a time)."""
    sys.path.insert(0, f"{args.model_dir}/code")
    import inference

    model = inference.model_fn(args.model_dir)
    keys = json.loads(Path(args.keys).read_text())
    found = {}
    for key in keys:
        data = (Path(args.abid) / "bin-images" / f"{key}.jpg").read_bytes()
        found[key] = inference.predict_fn(inference.input_fn(data, "image/jpeg"), model)["count"]
    print(json.dumps(found))


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


# -- one arm's stack, in the Airflow-side environment of its own tree --------------------------------
def endpoint_processes(state_dir: str) -> list[int]:
    """The endpoint's processes. standin.sagemaker.endpoints.model_server_processes finds them in this
    checkout; an arm runs on its own tree's stand-in, and the baseline's has no such function."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(w.endswith((b"model_frontend.py", b"model_backend.py")) for w in words) and any(
            state_dir.encode() in w for w in words
        ):
            found.append(int(cmdline.parent.name))
    return found


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


def memory_mb(pids: list[int]) -> dict:
    """Resident memory of the processes: RSS (shared pages counted in each) and PSS (shared out)."""
    rss = pss = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        rss += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        pss += int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:")))
    return {"processes": len(pids), "rss_mb": round(rss / 1024), "pss_mb": round(pss / 1024)}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), the ones that ended meanwhile left out."""
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


def front_port(pids: list[int]) -> int:
    for pid in pids:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(w.endswith(b"model_frontend.py") for w in words):
            return int(words[words.index(b"--port") + 1])
    raise RuntimeError("no model server front end found")


def arm_main(args: argparse.Namespace) -> None:
    import urllib.request

    import boto3
    from botocore.config import Config

    from bin_counter.api_function import ensure_function
    from bin_counter.api_load import gateway_sender, run_load
    from standin.iam import service_role
    from standin.launch import start_moto, start_standin

    role, key = "arn:aws:iam::000000000000:role/bench", "bench-key"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "bench"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    photos = [Path(p) for p in json.loads(args.photos)]
    body = Path(args.photo).read_bytes()
    state = tempfile.mkdtemp(prefix="bench-serving-")
    moto, moto_url = start_moto()
    service_role(boto3.client("iam", endpoint_url=moto_url), "bench", "sagemaker.amazonaws.com", "lambda.amazonaws.com")
    standin, url = start_standin(Path(state), moto_url, Path(args.container_python), api_key=key)
    result: dict = {"arm": args.name}
    try:
        s3 = boto3.client("s3", endpoint_url=moto_url)
        s3.create_bucket(Bucket="bench")
        s3.upload_file(args.model, "bench", "model/model.tar.gz")
        sm = boto3.client("sagemaker", endpoint_url=url)
        environment = {"SAGEMAKER_PROGRAM": "inference.py", **({WORKERS: args.workers} if args.workers else {})}
        result["ready_s"] = serve_endpoint(sm, "bin-counter", "s3://bench/model/model.tar.gz", role, environment)
        runtime = boto3.client(
            "sagemaker-runtime",
            endpoint_url=url,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}, max_pool_connections=args.clients * 2),
        )

        def invoke_endpoint():
            runtime.invoke_endpoint(EndpointName="bin-counter", ContentType="image/jpeg", Body=body)["Body"].read()

        first_ten = timed(invoke_endpoint, 10, warm=0)
        result["first_ms"], result["tenth_ms"] = round(first_ten[0], 1), round(first_ten[9], 1)
        pids = endpoint_processes(state)
        port = front_port(pids)

        def direct():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, method="POST", headers={"Content-Type": "image/jpeg"}
            )
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - loopback
                answer.read()

        result["model_server_p50_ms"] = p50(timed(direct, args.runs))
        result["invoke_endpoint_p50_ms"] = p50(timed(invoke_endpoint, args.runs))
        ensure_function(boto3.client("lambda", endpoint_url=url), "bin-counter-api", "bin-counter", role)
        send_one = gateway_sender(f"{url}/count", key, [Path(args.photo)])
        result["lambda_cold_ms"] = round(timed(lambda: send_one(0), 1, warm=0)[0], 1)
        one = timed(lambda: send_one(0), args.runs)
        result["api_p50_ms"], result["api_p99_ms"] = p50(one), round(sorted(one)[int(len(one) * 0.99) - 1], 1)
        send = gateway_sender(f"{url}/count", key, photos)
        run_load(send, args.clients, 3)  # every Lambda environment warm
        for clients in (1, args.clients):
            summary = run_load(send, clients, args.seconds).summary()
            kept = ("sent", "failed", "ok_per_s", "p50_ms", "p99_ms")
            result[f"api_{clients}_clients"] = {k: summary[k] for k in kept}
        result["memory"] = memory_mb(endpoint_processes(state))
    finally:
        for process in (standin, moto):
            process.terminate()
            process.wait(timeout=20)
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(result))


# -- the run -----------------------------------------------------------------------------------------
def run_json(command: list[str], cwd: Path, env: dict | None = None) -> dict:
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(ref: str, into: Path) -> Path:
    """The baseline commit's files, its published model included, beside this checkout's environments."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for env in (".venv", ".venv-container"):
        (into / env).symlink_to((ROOT / env).resolve())
    return into


def extracted(archive: Path, into: Path) -> str:
    into.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(into)], check=True)
    return str(into)


def test_keys(abid: Path) -> tuple[list[str], dict[str, int]]:
    from bench.batch_vs_api import choose_photos

    chosen, test = choose_photos(abid, 100_000)
    truth = {r.key: r.count for r in chosen if r.key in test}
    return sorted(truth), truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="c0da49b", help="the commit whose serving code is the baseline")
    parser.add_argument(
        "--model",
        default=str(ROOT / "models" / "bin-counter.tar.gz"),
        help="this checkout's model archive (the baseline's is its commit's models/bin-counter.tar.gz)",
    )
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"), help="the ABID mirror")
    parser.add_argument(
        "--workers", nargs="+", default=["1", "2"], help=f"{WORKERS} of this checkout's arms, one arm each"
    )
    parser.add_argument("--seconds", type=float, default=20, help="seconds per load phase")
    parser.add_argument("--clients", type=int, default=4, help="clients of the concurrent phase")
    parser.add_argument("--runs", type=int, default=40, help="requests per one-client p50")
    parser.add_argument("--limit", type=int, default=20, help="photos sent in turn by the load phases")
    parser.add_argument("--skip-counts", action="store_true", help="leave out the 554-photo count comparison")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every arm, interleaved; the tables give medians")
    args = parser.parse_args()
    abid = Path(args.abid)
    photo = str(abid / "bin-images" / PHOTO)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        base = baseline_tree(args.baseline_ref, work / "baseline")
        archives = {"baseline": base / "models" / "bin-counter.tar.gz", "current": Path(args.model)}
        dirs = {name: extracted(path, work / f"model-{name}") for name, path in archives.items()}
        script = str(Path(__file__).resolve())
        report: dict = {"baseline_ref": args.baseline_ref}

        if not args.skip_counts:
            keys, truth = test_keys(abid)
            (work / "keys.json").write_text(json.dumps(keys))
            counts = {
                name: run_json(
                    [
                        str(CONTAINER_PYTHON),
                        script,
                        "counts",
                        "--model-dir",
                        d,
                        "--keys",
                        str(work / "keys.json"),
                        "--abid",
                        str(abid),
                    ],
                    ROOT,
                )
                for name, d in dirs.items()
            }
            changed = sum(counts["baseline"][k] != counts["current"][k] for k in keys)
            report["counts"] = {
                "photos": len(keys),
                "changed": changed,
                "changed_share": round(changed / len(keys), 4),
                **{
                    f"accuracy_{n}": round(sum(c[k] == truth[k] for k in keys) / len(keys), 4)
                    for n, c in counts.items()
                },
            }
            print(json.dumps(report["counts"]), flush=True)

        bare = {}
        for threads in (1, 2):
            bare[threads] = run_json(
                [
                    str(CONTAINER_PYTHON),
                    script,
                    "handler",
                    "--photo",
                    photo,
                    "--threads",
                    str(threads),
                    "--runs",
                    str(args.runs),
                ],
                ROOT,
                {"PYTHONPATH": str(ROOT / "sagemaker_code")},
            )["bare_p50_ms"]
        report["bare_resnet34_p50_ms"] = bare
        handlers = {
            "baseline": run_json(
                [
                    str(CONTAINER_PYTHON),
                    script,
                    "handler",
                    "--photo",
                    photo,
                    "--model-dir",
                    dirs["baseline"],
                    "--runs",
                    str(args.runs),
                ],
                ROOT,
            )
        }
        for workers in args.workers:
            handlers[f"current, {workers} worker(s)"] = run_json(
                [
                    str(CONTAINER_PYTHON),
                    script,
                    "handler",
                    "--photo",
                    photo,
                    "--model-dir",
                    dirs["current"],
                    "--runs",
                    str(args.runs),
                ],
                ROOT,
                {WORKERS: workers},
            )
        report["handlers_in_process"] = handlers
        print(json.dumps({"bare": bare, "handlers": handlers}), flush=True)

        from bin_counter.api_client import images_in

        photos = json.dumps([str(p) for p in images_in([str(abid / "bin-images")])[: args.limit]])
        arms = [("baseline", base, archives["baseline"], "")] + [
            (f"current, {w} worker(s)", ROOT, archives["current"], w) for w in args.workers
        ]
        runs: dict[str, list[dict]] = {name: [] for name, *_ in arms}
        for _ in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every arm
            for name, tree, archive, workers in arms:
                command = [
                    sys.executable,
                    script,
                    "arm",
                    "--name",
                    name,
                    "--model",
                    str(archive),
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
                    "--container-python",
                    str(CONTAINER_PYTHON),
                ]
                found = run_json(command, tree, {"PYTHONPATH": f"{tree}:{tree / 'plugins'}"})
                print(json.dumps(found), flush=True)
                runs[name].append(found)
        report["arms"] = [median_of(found) for found in runs.values()]
        print_tables(report, args.clients)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    base = report["arms"][0]
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
            f"API, {clients} clients, x the baseline",
            lambda a: round(a[f"api_{clients}_clients"]["ok_per_s"] / base[f"api_{clients}_clients"]["ok_per_s"], 2),
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
    if "counts" in report:
        c = report["counts"]
        print(
            f"counts: {c['changed']} of {c['photos']} photos changed ({c['changed_share']:.2%}); accuracy "
            f"{c['accuracy_baseline']} (baseline) / {c['accuracy_current']} (current)"
        )


def get_args_parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"bench.serving_speed {command} (run by main)")
    parser.add_argument("command")
    parser.add_argument("--model-dir", default=None, help="an extracted model.tar.gz")
    parser.add_argument("--model", default=None, help="a model.tar.gz")
    parser.add_argument("--keys", default=None, help="a JSON list of ABID keys")
    parser.add_argument("--abid", default=None, help="the ABID mirror")
    parser.add_argument("--photo", default=None, help="the one photo of the p50s")
    parser.add_argument("--photos", default="[]", help="JSON list of the load phases' photos")
    parser.add_argument("--threads", type=int, default=1, help="threads of the bare pass")
    parser.add_argument("--runs", type=int, default=40, help="requests per p50")
    parser.add_argument("--name", default="", help="the arm's name")
    parser.add_argument("--workers", default="", help=f"{WORKERS} of the arm's model ('' leaves it unset)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per load phase")
    parser.add_argument("--clients", type=int, default=4, help="clients of the concurrent phase")
    parser.add_argument("--container-python", default=str(CONTAINER_PYTHON), help="the stand-in's model python")
    return parser


if __name__ == "__main__":
    commands = {"counts": counts_main, "handler": handler_main, "arm": arm_main}
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        commands[sys.argv[1]](get_args_parser_for(sys.argv[1]).parse_args())
    else:
        main()
