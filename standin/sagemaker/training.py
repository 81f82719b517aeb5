"""Running a SageMaker training job locally, in script mode, the way the PyTorch containers do.

For one job: fetch `sourcedir.tar.gz` and every channel from S3 into the job's folder, write the
`/opt/ml/input/config` files, set the `SM_*` variables, run the entry point with the
container-side Python (`--name value` per hyperparameter), read metrics from its output with the
job's metric definitions, and upload `model.tar.gz` to `<S3OutputPath>/<job>/output/`.

There is no container: `/opt/ml` is the job's folder, passed to the script as `SM_OPT_ML_ROOT`
(and as the usual `SM_MODEL_DIR`, `SM_CHANNEL_*` ...).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

RESERVED_PREFIX = "sagemaker_"
TERMINAL = ("Completed", "Failed", "Stopped")  # the statuses a job (training or tuning) ends in


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def decode_hyperparameters(hyperparameters: dict[str, str]) -> dict[str, object]:
    """SageMaker stores strings; the SDK JSON-encodes values, plain strings pass through."""
    decoded = {}
    for name, value in hyperparameters.items():
        try:
            decoded[name] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            decoded[name] = value
    return decoded


def script_arguments(hyperparameters: dict[str, object]) -> list[str]:
    """`--name value` for each of the user's hyperparameters (the SDK's own are left out)."""
    args = []
    for name, value in sorted(hyperparameters.items()):
        if name.startswith(RESERVED_PREFIX):
            continue
        args += [f"--{name}", json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return args


def download_prefix(s3, uri: str, target: Path) -> int:
    bucket, prefix = split_s3_uri(uri)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            # A prefix naming one object whole (a model.tar.gz) gives that file under its own name.
            relative = obj["Key"][len(prefix):].lstrip("/") or obj["Key"].rsplit("/", 1)[-1]
            if relative.endswith("/"):
                continue
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(destination))
            count += 1
    if count == 0:
        raise JobError(f"ClientError: no data in channel {uri}")
    return count


class JobError(RuntimeError):
    """A failure that becomes the job's FailureReason as it is."""


def prepare(job: dict, root: Path, s3) -> tuple[list[str], dict[str, str], Path]:
    """Lay out /opt/ml under `root`; return the command, its environment and its working folder."""
    hps = decode_hyperparameters(job.get("HyperParameters", {}))
    program = hps.get("sagemaker_program")
    submit = hps.get("sagemaker_submit_directory")
    if not program or not submit:
        raise JobError("ClientError: script mode needs the sagemaker_program and sagemaker_submit_directory "
                       "hyperparameters (this stand-in runs script-mode jobs only)")
    code = root / "code"
    code.mkdir(parents=True, exist_ok=True)
    bucket, key = split_s3_uri(submit)
    try:
        archive = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey as exc:
        raise JobError(f"ClientError: source code {submit} does not exist") from exc
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(code, filter="data")
    if not (code / program).is_file():
        raise JobError(f"ClientError: entry point {program} is not in {submit}")

    channels = {}
    for channel in job.get("InputDataConfig", []):
        target = root / "input" / "data" / channel["ChannelName"]
        download_prefix(s3, channel["DataSource"]["S3DataSource"]["S3Uri"], target)
        channels[channel["ChannelName"]] = str(target)
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(job.get("HyperParameters", {})))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {c["ChannelName"]: {"TrainingInputMode": c.get("InputMode", "File")} for c in job.get("InputDataConfig", [])}))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    for folder in ("model", "output/data", "checkpoints"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    user_hps = {k: v for k, v in hps.items() if not k.startswith(RESERVED_PREFIX)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update({
        "SM_OPT_ML_ROOT": str(root),
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HPS": json.dumps(user_hps),
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_NUM_GPUS": "0",
        "SM_HOSTS": json.dumps(["algo-1"]),
        "SM_CURRENT_HOST": "algo-1",
        "SM_TRAINING_ENV": json.dumps({"job_name": job["TrainingJobName"], "hyperparameters": user_hps}),
        "TRAINING_JOB_NAME": job["TrainingJobName"],
        "PYTHONUNBUFFERED": "1",
    })
    env.update({f"SM_CHANNEL_{name.upper()}": path for name, path in channels.items()})
    env.update({f"SM_HP_{name.upper()}": str(value) for name, value in user_hps.items()})
    env.update(job.get("Environment", {}))
    return [program, *script_arguments(hps)], env, code


def parse_metrics(line: str, definitions: list[dict], series: dict[str, list[float]]) -> bool:
    """Append every metric value found in `line` to its series; True if any was found."""
    found = False
    for definition in definitions:
        for match in re.findall(definition["Regex"], line):
            try:
                series.setdefault(definition["Name"], []).append(float(match))
                found = True
            except ValueError:
                continue
    return found


def package_model(model_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for item in sorted(model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    return buffer.getvalue()


LOG_GROUP = "/aws/sagemaker/TrainingJobs"


class CloudWatchLog:
    """The job's output in CloudWatch Logs under SageMaker's names (`<job>/algo-1-<time>`), so the
    Amazon provider's `print_log` shows it in the Airflow task log. Lines are sent in batches."""

    def __init__(self, logs, job_name: str, flush_every: float = 1.0) -> None:
        self.logs, self.pending, self.flush_every, self.last = logs, [], flush_every, time.time()
        self.stream = f"{job_name}/algo-1-{int(time.time())}"
        with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
            logs.create_log_group(logGroupName=LOG_GROUP)
        logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=self.stream)

    def write(self, line: str) -> None:
        # CloudWatch Logs refuses empty messages; a blank line (in a traceback, say) is kept as one space.
        self.pending.append({"timestamp": int(time.time() * 1000), "message": line.rstrip("\n") or " "})
        if time.time() - self.last >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=self.stream, logEvents=self.pending)
            self.pending = []
        self.last = time.time()


def run_job(job: dict, root: Path, s3, python: str, update: Callable[..., None],
            started_process: Callable[[subprocess.Popen], None] | None = None, logs=None,
            metrics_seen: Callable[[dict[str, list[float]]], None] | None = None) -> None:
    """Run `job` to its end, reporting through `update(status=..., secondary=..., **fields)`.
    With a CloudWatch Logs client, the script's output also goes there; `metrics_seen` gets the
    metric series so far whenever a line adds to them (what early stopping looks at)."""
    log_path = root / "job.log"
    update(status="InProgress", secondary="Downloading", message="Downloading input data and code")
    try:
        command, env, cwd = prepare(job, root, s3)
    except JobError as exc:
        update(status="Failed", secondary="Failed", message=str(exc), FailureReason=str(exc))
        return
    update(status="InProgress", secondary="Training", message="Training in progress (local process)")
    definitions = job.get("AlgorithmSpecification", {}).get("MetricDefinitions", [])
    metrics: dict[str, list[float]] = {}
    started = time.time()
    cloudwatch = CloudWatchLog(logs, job["TrainingJobName"]) if logs is not None else None
    with log_path.open("a") as log:
        proc = subprocess.Popen([python, *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if started_process:
            started_process(proc)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if cloudwatch:
                cloudwatch.write(line)
            if parse_metrics(line, definitions, metrics) and metrics_seen:
                metrics_seen(metrics)
        code = proc.wait()
    if cloudwatch:
        cloudwatch.flush()
    seconds = int(time.time() - started)
    final = [{"MetricName": k, "Value": v[-1], "Timestamp": time.time()} for k, v in sorted(metrics.items())]
    if code < 0:  # killed by StopTrainingJob
        update(status="Stopped", secondary="Stopped", message="Stopped by StopTrainingJob",
               FinalMetricDataList=final, TrainingTimeInSeconds=seconds)
        return
    if code != 0:
        failure = root / "output" / "failure"
        reason = failure.read_text().strip() if failure.is_file() else ""
        reason = f"AlgorithmError: {reason or 'ExecuteUserScriptError'}, exit code {code}"
        update(status="Failed", secondary="Failed", message=reason, FailureReason=reason[:1024],
               FinalMetricDataList=final, TrainingTimeInSeconds=seconds)
        return
    update(status="InProgress", secondary="Uploading", message="Uploading generated training model")
    bucket, prefix = split_s3_uri(job["OutputDataConfig"]["S3OutputPath"])
    key = f"{prefix.rstrip('/')}/{job['TrainingJobName']}/output/model.tar.gz".lstrip("/")
    s3.put_object(Bucket=bucket, Key=key, Body=package_model(root / "model"))
    update(status="Completed", secondary="Completed", message="Training job completed",
           ModelArtifacts={"S3ModelArtifacts": f"s3://{bucket}/{key}"}, FinalMetricDataList=final,
           TrainingTimeInSeconds=seconds, BillableTimeInSeconds=seconds)
