"""A bad model's canary against all at once: how long clients see errors, and how many, when an endpoint
is updated to a model that answers 500 to every request.

  PYTHONPATH=plugins .venv/bin/python -m bench.rollout_safety [--repeats 3] [--clients 4] [--rate 10]

Starts a moto server and the stand-in on loopback. Each run serves a healthy model on a fresh endpoint
(2 instances), starts clients that send at a steady rate, and updates the endpoint to a model that loads,
answers /ping and fails every request, in one of three ways, alternating:
- canary: the deploy DAG's default (bin_counter.rollout.deployment_config "canary", 50 %), rolled back on
  the endpoint's alarms from bin_counter.rollout.endpoint_alarms (5xx errors in a minute >= 1, latency);
- all_at_once: ALL_AT_ONCE with the same alarms;
- no_alarm: ALL_AT_ONCE without AutoRollbackConfiguration (the baseline: nothing undoes it).
Times are from the UpdateEndpoint call. Prints one JSON line per run and a Markdown table, and writes
everything to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from bin_counter.rollout import alarm_names, deployment_config, endpoint_alarms
from standin.iam import service_role
from standin.launch import start_moto, start_standin

ROOT = Path(__file__).resolve().parents[1]
CONTAINER_PYTHON = ROOT / ".venv-container" / "bin" / "python"
MODES = ("canary", "all_at_once", "no_alarm")
INSTANCES = 2  # the deploy DAG's default instance_count
# The deploy DAG's alarm defaults (max_5xx_per_minute, max_model_latency_ms).
MAX_5XX_PER_MINUTE, MAX_LATENCY_MS = 1, 2000
# Tiny models (inference.py only, no weights): an endpoint starts in seconds. The bad one has a bug in its
# serving code: it loads and answers /ping, and every request fails with 500.
HEALTHY = b"""import json

def model_fn(model_dir):
    return {"version": "good"}

def input_fn(body, content_type):
    return body

def predict_fn(data, model):
    return model

def output_fn(prediction, accept):
    return json.dumps(prediction)
"""
FAILING = (
    HEALTHY
    + b"""
def predict_fn(data, model):
    raise RuntimeError("CUDA error: device-side assert triggered")
"""
)
OK = "ok"


def model_archive(code: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        member = tarfile.TarInfo("code/inference.py")
        member.size = len(code)
        tar.addfile(member, io.BytesIO(code))
    return out.getvalue()


@dataclass(frozen=True)
class Request:
    sent: float  # time.time() when sent
    answered: float
    outcome: str  # OK, or the error code a client saw ("ModelError 500", ...)


class SteadyClients:
    """`clients` threads, each sending `rate` requests a second on a fixed schedule (staggered between
    threads), so that the load does not drop when answers turn into errors; every request is kept."""

    def __init__(self, runtime, endpoint: str, clients: int, rate: float) -> None:
        self.runtime, self.endpoint, self.clients, self.rate = runtime, endpoint, clients, rate
        self.requests: list[Request] = []
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> SteadyClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def _client(self, number: int) -> None:
        interval = 1 / self.rate
        due = time.time() + interval * number / self.clients
        while not self.stopping.wait(max(0.0, due - time.time())):
            sent = time.time()
            outcome = self._ask()
            with self.lock:
                self.requests.append(Request(sent, time.time(), outcome))
            due = max(due + interval, time.time())  # late: no burst to catch up

    def _ask(self) -> str:
        try:
            answer = self.runtime.invoke_endpoint(
                EndpointName=self.endpoint, Body=b"{}", ContentType="application/json"
            )
            json.loads(answer["Body"].read())
            return OK
        except ClientError as exc:
            status = exc.response.get("OriginalStatusCode") or exc.response["ResponseMetadata"]["HTTPStatusCode"]
            return f"{exc.response['Error']['Code']} {status}"
        except Exception as exc:  # no answer at all: a client sees that too
            return type(exc).__name__


def summarize(
    requests: list[Request], update_at: float, back_at: float | None, switched_at: float | None, alarm_at: float | None
) -> dict:
    """One run's numbers, in seconds from `update_at` (the UpdateEndpoint call). `back_at`: InService on
    the old configuration after a rollback; `switched_at`: InService on the bad one (no rollback);
    `alarm_at`: the alarm's move to ALARM. The update's requests are those sent from the call until the
    endpoint was InService again (without a rollback: until the clients stopped)."""
    after = sorted((r for r in requests if r.sent >= update_at), key=lambda r: r.sent)
    errors = [r for r in after if r.outcome != OK]
    end = back_at if back_at is not None else (after[-1].sent if after else update_at)
    during = [r for r in after if r.sent <= end]
    failed_during = [r for r in during if r.outcome != OK]

    def since(moment: float | None) -> float | None:
        return None if moment is None else round(moment - update_at, 2)

    result = {
        "requests_during_update": len(during),
        "errors": len(failed_during),
        "error_share_of_update": round(len(failed_during) / len(during), 3) if during else None,
        "error_kinds": dict(Counter(r.outcome for r in failed_during)),
        "first_error_s": since(min(r.answered for r in errors)) if errors else None,
        "alarm_s": since(alarm_at),
        "back_on_old_config_s": since(back_at),
        "switched_to_bad_config_s": since(switched_at),
        "last_error_s": since(max(r.answered for r in errors)) if errors and back_at is not None else None,
        "errors_after_back": sum(1 for r in after if back_at is not None and r.sent > back_at and r.outcome != OK),
    }
    # The bad model's share: of the requests sent while the new fleet took traffic (first error to last).
    if errors:
        last = errors[-1].sent if back_at is not None else end
        exposed = [r for r in after if errors[0].sent <= r.sent <= last]
        result["exposure_s"] = round(last - errors[0].sent, 2)
        result["error_share_while_exposed"] = round(sum(r.outcome != OK for r in exposed) / len(exposed), 3)
    if switched_at is not None:  # the baseline: what clients got once the update had "succeeded"
        settled = [r for r in after if r.sent >= switched_at]
        result["watched_after_switch_s"] = round(end - switched_at, 1)
        result["error_share_after_switch"] = (
            round(sum(r.outcome != OK for r in settled) / len(settled), 3) if settled else None
        )
    return result


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per mode: the median of each number over its runs, with the runs' minimum and maximum."""
    found: dict[str, dict] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        row: dict = {"runs": len(mine)}
        for key in dict.fromkeys(k for r in mine for k in r):  # a number missing from a run is left out
            values = [v for r in mine if isinstance(v := r.get(key), int | float) and not isinstance(v, bool)]
            if values:
                row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        found[mode] = row
    return found


def _cell(row: dict, key: str, unit: str = "", percent: bool = False) -> str:
    stat = row.get(key)
    if stat is None:
        return "-"
    scale, fmt = (100, "{:.0f}") if percent else (1, "{:g}")
    median, low, high = (fmt.format(stat[k] * scale) for k in ("median", "min", "max"))
    spread = "" if low == high else f" ({low}-{high})"
    return f"{median}{unit}{spread}"


def table(summary: dict[str, dict]) -> str:
    """The Markdown table: medians, with the runs' range in brackets."""
    labels = {
        "canary": "canary 50 %, 5xx alarm",
        "all_at_once": "all at once, 5xx alarm",
        "no_alarm": "all at once, no alarm (baseline)",
    }
    lines = [
        "| update | runs | first error | alarm in ALARM | back on the old config, InService | last error "
        "| errors | requests during the update | error share of the update | error share while the bad model "
        "took traffic |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, row in summary.items():
        if mode == "no_alarm":
            back = "never (InService on the bad model at " + _cell(row, "switched_to_bad_config_s", " s") + ")"
            last = "still at the end (watched " + _cell(row, "watched_after_switch_s", " s") + " after the switch)"
        else:
            back, last = _cell(row, "back_on_old_config_s", " s"), _cell(row, "last_error_s", " s")
        lines.append(
            f"| {labels[mode]} | {row['runs']} | {_cell(row, 'first_error_s', ' s')} | {_cell(row, 'alarm_s', ' s')} "
            f"| {back} | {last} | {_cell(row, 'errors')} | {_cell(row, 'requests_during_update')} "
            f"| {_cell(row, 'error_share_of_update', ' %', percent=True)} "
            f"| {_cell(row, 'error_share_while_exposed', ' %', percent=True)} |"
        )
    return "\n".join(lines)


def update_request(mode: str, endpoint: str, bake_s: int) -> dict:
    """UpdateEndpoint's DeploymentConfig as the deploy DAG builds it (no_alarm: without the rollback)."""
    names = list(alarm_names(endpoint).values())
    config = deployment_config("all_at_once" if mode == "no_alarm" else mode, names, bake_s)
    if mode == "no_alarm":
        del config["AutoRollbackConfiguration"]  # at least one alarm, or none of it (botocore's model)
    return config


def wait_status(sm, endpoint: str, timeout: float, poll: float = 0.2) -> dict:
    deadline = time.time() + timeout
    while True:
        described = sm.describe_endpoint(EndpointName=endpoint)
        if described["EndpointStatus"] not in ("Creating", "Updating") or time.time() > deadline:
            return described
        time.sleep(poll)


def run_once(sm, runtime, cloudwatch, mode: str, number: int, args: argparse.Namespace) -> dict:
    endpoint = f"safety-{mode.replace('_', '-')}-{number}"
    sm.create_endpoint(EndpointName=endpoint, EndpointConfigName="good")
    if wait_status(sm, endpoint, 180)["EndpointStatus"] != "InService":
        raise SystemExit(f"{endpoint} did not come up on the healthy model")
    # The baseline has no alarms at all (alarms outside a bake are not evaluated locally anyway).
    alarms = [] if mode == "no_alarm" else endpoint_alarms(endpoint, MAX_5XX_PER_MINUTE, MAX_LATENCY_MS)
    for alarm in alarms:
        cloudwatch.put_metric_alarm(**alarm)
    switched_at = back_at = None
    with SteadyClients(runtime, endpoint, args.clients, args.rate) as clients:
        time.sleep(args.warm)
        update_at = time.time()
        sm.update_endpoint(
            EndpointName=endpoint, EndpointConfigName="bad", DeploymentConfig=update_request(mode, endpoint, args.bake)
        )
        described = wait_status(sm, endpoint, 300)
        ended = described["LastModifiedTime"].timestamp()
        if described["EndpointConfigName"] == "good":
            back_at = ended
            time.sleep(args.tail)
        else:
            switched_at = ended
            time.sleep(max(0.0, ended + args.watch - time.time()))
    requests = clients.requests
    alarm_state = alarm_at = None
    if alarms:
        alarm = cloudwatch.describe_alarms(AlarmNames=[alarm_names(endpoint)["errors"]])["MetricAlarms"][0]
        alarm_state = alarm["StateValue"]
        alarm_at = alarm["StateUpdatedTimestamp"].timestamp() if alarm_state == "ALARM" else None
        cloudwatch.delete_alarms(AlarmNames=[a["AlarmName"] for a in alarms])
    sm.delete_endpoint(EndpointName=endpoint)
    return {
        "mode": mode,
        "endpoint": endpoint,
        "final_config": described["EndpointConfigName"],
        "failure_reason": described.get("FailureReason"),
        "alarm_state": alarm_state,
        "requests_total": len(requests),
        **summarize(requests, update_at, back_at, switched_at, alarm_at),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--rate", type=float, default=10, help="requests a second per client")
    parser.add_argument("--bake", type=int, default=10, help="WaitIntervalInSeconds (the DAG's bake_minutes * 60)")
    parser.add_argument("--warm", type=float, default=1.0, help="seconds of traffic before the update")
    parser.add_argument("--tail", type=float, default=3.0, help="seconds of traffic after a rollback")
    parser.add_argument("--watch", type=float, default=10.0, help="baseline: seconds of traffic after its switch")
    parser.add_argument("--out", default="build/bench/rollout-safety.json", help="JSON results")
    args = parser.parse_args()
    # Loopback servers only: any credentials do, and the stand-in inherits them.
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ[name] = value
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    state = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    started = time.time()
    moto, moto_url = start_moto()
    # The stand-in's own fork server: the fleets start in seconds, as a bench of timings after the start needs.
    standin, url = start_standin(state, moto_url, CONTAINER_PYTHON)
    try:
        role = service_role(boto3.client("iam", endpoint_url=moto_url), "bench", "sagemaker.amazonaws.com")
        s3 = boto3.client("s3", endpoint_url=moto_url)
        s3.create_bucket(Bucket="bench")
        sm = boto3.client("sagemaker", endpoint_url=url)
        for name, code in (("good", HEALTHY), ("bad", FAILING)):
            s3.put_object(Bucket="bench", Key=f"{name}/model.tar.gz", Body=model_archive(code))
            sm.create_model(
                ModelName=name,
                ExecutionRoleArn=role,
                PrimaryContainer={
                    "Image": "local/pytorch-inference:cpu",
                    "ModelDataUrl": f"s3://bench/{name}/model.tar.gz",
                    "Environment": {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"},
                },
            )
            sm.create_endpoint_config(
                EndpointConfigName=name,
                ProductionVariants=[
                    {
                        "VariantName": "AllTraffic",
                        "ModelName": name,
                        "InstanceType": "ml.m5.large",
                        "InitialInstanceCount": INSTANCES,
                    }
                ],
            )
        runtime = boto3.client(
            "sagemaker-runtime",
            endpoint_url=url,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": 1},  # every error a client would see
                max_pool_connections=args.clients * 2,
                read_timeout=30,
            ),
        )
        cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_url)
        runs = []
        for number in range(args.repeats):
            for mode in MODES:
                run = run_once(sm, runtime, cloudwatch, mode, number, args)
                print(json.dumps(run), flush=True)
                runs.append(run)
    finally:
        for process in (standin, moto):
            process.terminate()
            process.wait(timeout=20)
        shutil.rmtree(state, ignore_errors=True)
    summary = aggregate(runs)
    result = {
        "command": "PYTHONPATH=plugins .venv/bin/python -m bench.rollout_safety "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, CPU only",
        "settings": {**vars(args), "instances": INSTANCES, "max_5xx_per_minute": MAX_5XX_PER_MINUTE},
        "wall_s": round(time.time() - started, 1),
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary))
    print(f"({result['wall_s']} s in all; {out})")


if __name__ == "__main__":
    main()
