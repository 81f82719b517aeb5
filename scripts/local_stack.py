"""The whole system on one machine: a moto server (S3, CloudWatch Logs), the SageMaker and Lambda
stand-in, and Airflow with its SQLite database, all on loopback.

  PYTHONPATH=plugins .venv/bin/python -m scripts.local_stack demo --source ../shared/abid --keys 01000:01600
  PYTHONPATH=plugins .venv/bin/python -m scripts.local_stack up    # the same stack, and the Airflow UI on :8080

`demo` runs bin_count_data_prep, bin_count_retrain and bin_count_deploy (with `airflow dags test`, the
same DAG code a scheduler would run), prints counts from the deployed endpoint next to the truth, counts
every test photo with bin_count_batch (a batch transform job), and writes the stage timings to
<work>/demo-timings.json. `up` leaves Airflow's components (what
`airflow standalone` runs) up with the connection and Variable set; stop it with Ctrl-C. The only
thing that tells the DAGs they are not on AWS is the `aws_default` connection, printed at start.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import boto3

from standin.cloudwatch import stack_alarms
from standin.iam import create_roles
from standin.launch import airflow_connection, local_stack, start_moto, start_standin, wait_until_up

ROOT = Path(__file__).resolve().parents[1]

VENV_BIN = Path(sys.executable).parent
CONTAINER_PYTHON = ROOT / ".venv-container" / "bin" / "python"
# infra/pipeline.yaml as the local stack deploys it: the DAGs find its bucket, endpoint and function in
# its Variable (they have no default names), so the demo names none of them to the DAGs either.
STACK = local_stack()
BUCKET, ENDPOINT = STACK.outputs["BucketName"], STACK.outputs["EndpointName"]
API_KEY = "local-demo-key"  # what the local API gateway asks for in x-api-key
# A small search that fits two cores: two trials one after the other (side by side, each trial's
# threads fight the other's for the same two cores: 231 s each instead of about 60), then the final job.
DEMO_RETRAIN = {
    "epochs_min": 3,
    "epochs_max": 4,
    "batch_sizes": [32],
    "lr_min": 5e-4,
    "lr_max": 2e-3,
    "max_jobs": 2,
    "max_parallel_jobs": 1,
    "strategy": "Random",
    "training_instance_type": "ml.m5.xlarge",
}
# The approved version onto the endpoint: two instances behind it, a canary baked for 15 s.
DEMO_DEPLOY = {
    "instance_count": 2,
    "serving_workers": 1,
    "rollout": "canary",
    "bake_minutes": 0.25,
    "termination_wait_minutes": 0,
    "smoke_images": 6,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=("demo", "up"), help="demo: data prep, retraining and deployment once; up: the UI"
    )
    parser.add_argument("--work", default="build/stack", help="state of every server and of Airflow")
    parser.add_argument("--source", default="s3://aft-vbi-pds", help="ABID source for the data-prep DAG")
    parser.add_argument("--keys", default="01000:01600", help="key range START:STOP the demo prepares")
    parser.add_argument("--block-size", type=int, default=20, help="keys per split block in the demo")
    parser.add_argument(
        "--moto-port", type=int, default=int(os.environ.get("MOTO_PORT", 5050)), help="port of the moto server"
    )
    parser.add_argument(
        "--standin-port",
        type=int,
        default=int(os.environ.get("STANDIN_PORT", 5055)),
        help="port of the SageMaker and Lambda stand-in",
    )
    parser.add_argument(
        "--ui-port", type=int, default=int(os.environ.get("AIRFLOW_PORT", 8080)), help="port of the Airflow UI (up)"
    )
    parser.add_argument("--show", type=int, default=8, help="demo: test images to count at the end")
    return parser


def container_weights(container_python: Path = CONTAINER_PYTHON) -> str:
    """BIN_COUNTER_IMAGENET_WEIGHTS for the local stack: the weights packages of the container-side
    environment (this one has none), so that the retraining DAG hands every job the backbone's
    weights as its `weights` channel, as it does on AWS."""
    from bin_counter.weights import package_folders

    site_packages = sorted(container_python.parent.parent.glob("lib/python*/site-packages"))
    return os.pathsep.join(str(folder) for folder in package_folders(site_packages))


def airflow_env(work: Path, moto: str, standin: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str((work / "airflow").resolve()),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(airflow_connection(moto, standin)),
            # What docs/infra/README.md tells a user to copy from the stack's outputs, rendered for this account.
            "AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER": STACK.outputs["SageMakerVariable"],
            "AIRFLOW_VAR_BIN_COUNTER_ALERTS_TOPIC": STACK.outputs["AlertsTopicArn"],
            "BIN_COUNTER_SAGEMAKER_POLL_S": "2",
            # A triggerer runs here (AIRFLOW_COMPONENTS; `airflow dags test` runs triggers itself): the
            # SageMaker waits defer to it and free their worker slots (README, "Deferrable waits").
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
            "BIN_COUNTER_IMAGENET_WEIGHTS": env.get("BIN_COUNTER_IMAGENET_WEIGHTS") or container_weights(),
            # Airflow starts its task runners as `airflow ...` from the PATH.
            "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return env


# What `airflow standalone` runs, as separate processes so that one can be stopped and restarted.
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def server_env(env: dict[str, str], port: int, users: str = "", passwords_file: Path | None = None) -> dict[str, str]:
    """`env` for Airflow's long-running components on 127.0.0.1:`port`. With `users` ("name:role,...")
    and their `passwords_file` ({"name": "password"}) the UI asks to log in; without, everyone is admin."""
    env = {
        **env,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        # Task processes reach the API server here; every component must sign with the same secret.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": env.get("AIRFLOW__API_AUTH__JWT_SECRET", "bin-counter-local-only"),
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
    }
    if users:
        env.update(
            {
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            }
        )
    else:
        env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "True"
    return env


def start_component(name: str, env: dict[str, str], work: Path) -> subprocess.Popen:
    """One Airflow component (`airflow <name>`) in its own process group, its output in <work>/<name>.log."""
    with (work / f"{name}.log").open("ab") as out:
        return subprocess.Popen(
            [str(VENV_BIN / "airflow"), name], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_component(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal the component's whole process group (its task runners too) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class LiveAirflow:
    """Airflow's components on loopback, each its own process: what `airflow standalone` runs, with a
    handle on each so a drill can kill one and start it again."""

    def __init__(self, env: dict[str, str], work: Path, port: int) -> None:
        self.env, self.work, self.port = env, work, port
        self.url = f"http://127.0.0.1:{port}"
        self.components: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 300) -> LiveAirflow:
        for name in AIRFLOW_COMPONENTS:
            self.components[name] = start_component(name, self.env, self.work)
        wait_until_up(f"{self.url}/api/v2/monitor/health", self.components["api-server"], timeout=timeout)
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        stop_component(self.components[name], sig)

    def restart(self, name: str) -> None:
        self.components[name] = start_component(name, self.env, self.work)

    def stop(self) -> None:
        for process in self.components.values():
            stop_component(process)


def airflow(args: list[str], env: dict[str, str], log: Path) -> float:
    """Run an airflow CLI command, its output into `log`; its wall time in seconds."""
    started = time.time()
    with log.open("ab") as out:
        proc = subprocess.run(
            [str(VENV_BIN / "airflow"), *args], env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode != 0:
        raise SystemExit(f"airflow {' '.join(args[:3])} failed (exit {proc.returncode}); its log: {log}")
    return time.time() - started


def dag_run_state(env: dict[str, str], dag_id: str) -> tuple[str, dict[str, list]]:
    """The state of a DAG's latest run and its tasks' [state, duration], from the metadata database."""
    code = f"""
import json
from airflow.models import DagRun, TaskInstance
from airflow.utils.session import create_session
with create_session() as s:
    run = s.query(DagRun).filter(DagRun.dag_id == {dag_id!r}).order_by(DagRun.id.desc()).first()
    tis = s.query(TaskInstance).filter(TaskInstance.dag_id == {dag_id!r}, TaskInstance.run_id == run.run_id)
    print(json.dumps({{"state": str(run.state), "tasks": {{t.task_id: [str(t.state), t.duration] for t in tis}}}}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["state"], result["tasks"]


def training_seconds(sm) -> dict[str, tuple[datetime, datetime]]:
    """When each training job's process ran, (start, end) (the work; everything else is overhead)."""
    jobs = {}
    for job in sm.list_training_jobs(MaxResults=100)["TrainingJobSummaries"]:
        described = sm.describe_training_job(TrainingJobName=job["TrainingJobName"])
        if "TrainingStartTime" in described and "TrainingEndTime" in described:
            jobs[job["TrainingJobName"]] = (described["TrainingStartTime"], described["TrainingEndTime"])
    return jobs


def covered_seconds(intervals: Iterable[tuple[datetime, datetime]]) -> float:
    """Wall time during which at least one interval was running."""
    total, end = 0.0, None
    for start, stop in sorted((a.timestamp(), b.timestamp()) for a, b in intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def show_counts(runtime, endpoint: str, version: str, images: list[dict]) -> None:
    """Count real test images with the deployed endpoint, next to the truth."""
    print(f"\n== counts from endpoint {endpoint!r} for held-out test images of dataset {version}")
    for image in images:
        answer = json.loads(
            runtime.invoke_endpoint(
                EndpointName=endpoint, Body=base64.b64decode(image["base64"]), ContentType="image/jpeg"
            )["Body"].read()
        )
        print(
            f"  {image['key']}: true count {image['count']}, counted {answer['count']} "
            f"(confidence {answer['confidence']:.2f}, model {answer['model_version']})"
        )


def count_through_the_api(standin: str, image: dict, work: Path) -> None:
    """One real test image through the local API gateway and the Lambda function, with curl."""
    path = work / f"{Path(image['key']).name}"
    path.write_bytes(base64.b64decode(image["base64"]))
    command = [
        "curl",
        "-s",
        "-X",
        "POST",
        f"{standin}/count",
        "-H",
        f"x-api-key: {API_KEY}",
        "-H",
        "Content-Type: image/jpeg",
        "--data-binary",
        f"@{path}",
    ]
    print(
        f"\n== the public API on loopback (true count {image['count']}):\n$ "
        + " ".join(f"'{part}'" if " " in part else part for part in command),
        flush=True,
    )
    if shutil.which("curl"):
        subprocess.run(command, check=False)
        print(flush=True)
    else:
        from bin_counter.api_client import count

        print(json.dumps(count(f"{standin}/count", path, API_KEY, None, 30, 3)[1]))


def start_servers(work: Path, moto_port: int, standin_port: int) -> tuple[list[subprocess.Popen], str, str]:
    moto_proc, moto = start_moto(moto_port)
    os.environ.update({"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"})
    # The roles infra/pipeline.yaml creates on AWS: SageMaker and Lambda refuse a role IAM does not have.
    create_roles(boto3.client("iam", endpoint_url=moto, region_name="us-east-1"), STACK)
    standin_proc, standin = start_standin(work / "standin", moto, CONTAINER_PYTHON, standin_port, api_key=API_KEY)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    create_alarms(moto)
    return [standin_proc, moto_proc], moto, standin


def create_alarms(moto: str) -> list[str]:
    """The alerts topic and the two stacks' alarms and dashboards (docs/operations.md, "Alarms"), which
    the stand-in evaluates and notifies to the topic as CloudWatch would."""
    topic = STACK.outputs["AlertsTopicArn"]
    boto3.client("sns", endpoint_url=moto, region_name="us-east-1").create_topic(Name=topic.rsplit(":", 1)[-1])
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto, region_name="us-east-1")
    names = stack_alarms.create(cloudwatch, [STACK, stack_alarms.api_stack(topic)])
    print(f"== {len(names)} alarms to {topic}: {', '.join(names)}", flush=True)
    return names


def check_source(source: str, first_key: str) -> None:
    """Fail in seconds, saying what to do, when the ABID source cannot be read: the DAG's fetch
    would retry for minutes (as it should in production) before failing."""
    from bin_counter.abid import metadata_path, open_source

    try:
        open_source(source).read(metadata_path(first_key))
    except Exception as exc:  # any reason the first metadata file cannot be read
        raise SystemExit(
            f"cannot read {metadata_path(first_key)} from {source} ({type(exc).__name__}: {exc}). "
            "Without internet access, use a local mirror in the ABID layout: "
            "make demo ABID_SOURCE=../shared/abid"
        ) from exc


def demo(args, env: dict[str, str], moto: str, standin: str, work: Path) -> None:
    log = work / "airflow.log"
    timings: dict = {}
    prep_conf = {
        "source": str(Path(args.source).resolve()) if Path(args.source).exists() else args.source,
        "subset": "key_range",
        "key_range": args.keys,
        "block_size": args.block_size,
        "max_count": 5,
    }
    check_source(prep_conf["source"], args.keys.split(":")[0])
    print(f"== bin_count_data_prep: {args.keys} from {args.source} (log: {log})", flush=True)
    timings["bin_count_data_prep"] = airflow(
        ["dags", "test", "bin_count_data_prep", "-c", json.dumps(prep_conf)], env, log
    )
    state, tasks = dag_run_state(env, "bin_count_data_prep")
    print(f"   {state} in {timings['bin_count_data_prep']:.0f} s", flush=True)
    print("== bin_count_retrain: tune (2 trials), retrain, gate, register, approve", flush=True)
    timings["bin_count_retrain"] = airflow(
        ["dags", "test", "bin_count_retrain", "-c", json.dumps(DEMO_RETRAIN)], env, log
    )
    state, retrain_tasks = dag_run_state(env, "bin_count_retrain")
    print(f"   {state} in {timings['bin_count_retrain']:.0f} s", flush=True)
    if state != "success":
        raise SystemExit(f"bin_count_retrain ended {state}: {json.dumps(retrain_tasks)}; see {log}")
    print("== bin_count_deploy: the newest approved version, canary, alarms, smoke check through Lambda", flush=True)
    timings["bin_count_deploy"] = airflow(["dags", "test", "bin_count_deploy", "-c", json.dumps(DEMO_DEPLOY)], env, log)
    state, deploy_tasks = dag_run_state(env, "bin_count_deploy")
    print(f"   {state} in {timings['bin_count_deploy']:.0f} s", flush=True)
    if state != "success":
        raise SystemExit(f"bin_count_deploy ended {state}: {json.dumps(deploy_tasks)}; see {log}")
    sm = boto3.client("sagemaker", endpoint_url=standin, region_name="us-east-1")
    jobs = training_seconds(sm)
    train_wall = covered_seconds(jobs.values())
    timings.update(
        {
            "data_prep_tasks": tasks,
            "retrain_tasks": retrain_tasks,
            "training_jobs_s": {k: round((b - a).total_seconds(), 1) for k, (a, b) in jobs.items()},
            "training_wall_s": round(train_wall, 1),
            "retrain_overhead_share": round(1 - train_wall / timings["bin_count_retrain"], 3),
        }
    )
    (work / "demo-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    runtime = boto3.client("sagemaker-runtime", endpoint_url=standin, region_name="us-east-1")
    from bin_counter.api_function import smoke_images
    from bin_counter.dataset import photos, resolve_dataset

    data = resolve_dataset(s3, BUCKET, None, None)
    version = data["version"]
    images = smoke_images(s3, photos(s3, BUCKET, data, "test"), args.show)
    show_counts(runtime, ENDPOINT, version, images)
    count_through_the_api(standin, images[0], work)
    model = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    )["ProductionVariants"][0]["ModelName"]
    # The model names its registry version, whose evaluation report has the test metrics, whether it is
    # this run's model or the published one.
    tags = {
        t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=sm.describe_model(ModelName=model)["ModelArn"])["Tags"]
    }
    package = sm.describe_model_package(ModelPackageName=tags["bin-counter:model-package"])
    report_bucket, report_key = package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"][5:].split("/", 1)
    scores = json.loads(s3.get_object(Bucket=report_bucket, Key=report_key)["Body"].read())["comparison"]["candidate"]
    print(
        f"\nserving {model} (model package version {package['ModelPackageVersion']}, "
        f"{package['ModelApprovalStatus']}): test accuracy {scores['accuracy']:.4f}, RMSE {scores['rmse']:.4f}, "
        f"within 1 {scores['within_1']:.4f}"
    )
    if package.get("CustomerMetadataProperties", {}).get("gate") == "published":
        print(
            "   (the published model won the gate on the demo's test images; those keys are part of the mirror "
            "it learned from, so its honest numbers are in models/MODEL_CARD.md)"
        )
    batch_count(env, log, timings, s3, version)
    (work / "demo-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(
        f"timings: data prep {timings['bin_count_data_prep']:.0f} s, retrain {timings['bin_count_retrain']:.0f} s "
        f"(training processes {train_wall:.0f} s of it), deploy {timings['bin_count_deploy']:.0f} s, "
        f"batch count {timings['bin_count_batch']:.0f} s; "
        f"details in {work / 'demo-timings.json'}"
    )


def batch_count(env: dict[str, str], log: Path, timings: dict, s3, version: str) -> None:
    """bin_count_batch over the dataset's test photos (its default input) with the endpoint's model;
    prints the summary the report task logged."""
    print(f"\n== bin_count_batch: every test photo of dataset {version}, one SageMaker batch transform job", flush=True)
    timings["bin_count_batch"] = airflow(["dags", "test", "bin_count_batch"], env, log)
    state, tasks = dag_run_state(env, "bin_count_batch")
    timings["batch_tasks"] = tasks
    print(f"   {state} in {timings['bin_count_batch']:.0f} s", flush=True)
    if state != "success":
        raise SystemExit(f"bin_count_batch ended {state}: {json.dumps(tasks)}; see {log}")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="batch-counts/")
    newest = max(
        (o for page in pages for o in page.get("Contents", []) if o["Key"].endswith("/summary.json")),
        key=lambda o: o["LastModified"],
    )
    from bin_counter.batch import summary_lines

    for line in summary_lines(json.loads(s3.get_object(Bucket=BUCKET, Key=newest["Key"])["Body"].read()), 5):
        print("   " + line)


def up(args, env: dict[str, str], work: Path) -> None:
    live = LiveAirflow(server_env(env, args.ui_port), work, args.ui_port)
    print(
        f"== Airflow on {live.url} ({', '.join(AIRFLOW_COMPONENTS)}; logs in {work}); Ctrl-C stops everything",
        flush=True,
    )
    try:
        live.start()
        print(
            "   up: trigger bin_count_data_prep from the UI; bin_count_retrain follows on its asset, and "
            "bin_count_deploy on the model it approves",
            flush=True,
        )
        while all(proc.poll() is None for proc in live.components.values()):
            time.sleep(1)
        ended = [name for name, proc in live.components.items() if proc.poll() is not None]
        raise SystemExit(f"airflow {', '.join(ended)} stopped; see {work}/<component>.log")
    finally:
        live.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # A SIGTERM (a CI timeout, `kill`) stops the stack as Ctrl-C does: no server outlives it.
    signal.signal(signal.SIGTERM, _interrupt)
    if not CONTAINER_PYTHON.exists():
        raise SystemExit(f"{CONTAINER_PYTHON} is missing: run `make envs` first")
    work = Path(args.work)
    # S3 lives in the moto server's memory: the stand-in's jobs and endpoints and Airflow's runs
    # start afresh with it, or they would point at objects that are gone.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    processes, moto, standin = start_servers(work, args.moto_port, args.standin_port)
    env = airflow_env(work, moto, standin)
    print(
        f"== local stack: S3 (moto) {moto}, SageMaker + Lambda stand-in {standin}\n"
        f"   AIRFLOW_CONN_AWS_DEFAULT='{env['AIRFLOW_CONN_AWS_DEFAULT']}'",
        flush=True,
    )
    try:
        airflow(["db", "migrate"], env, work / "airflow.log")
        if args.command == "demo":
            demo(args, env, moto, standin, work)
        else:
            up(args, env, work)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in processes:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
