"""Running a SageMaker training job locally, the way the PyTorch training image runs it.

What SageMaker itself does before the container starts is ours: download every channel from S3
into the job's folder, write the `/opt/ml/input/config` files as SageMaker writes them, and, with a
`CheckpointConfig`, keep its `LocalPath` in step with its `S3Uri` (`CheckpointSync`). What runs in
the container is AWS's: the image's entry point, SageMaker's training toolkit
(`sagemaker-training`'s `train` with `SAGEMAKER_TRAINING_MODULE=sagemaker_pytorch_container.training:main`),
which fetches `sourcedir.tar.gz` from S3 with the job's role, pip-installs its `requirements.txt`,
sets the `SM_*` variables, runs the entry point with `--name value` per hyperparameter and writes
`output/failure` when it fails. After it ends, ours again: the metrics read from its output with
the job's metric definitions, and `/opt/ml/model` uploaded as `<S3OutputPath>/<job>/output/model.tar.gz`.

There is no container: `/opt/ml` is the job's folder, named to the toolkit (and to train.py) by
`SAGEMAKER_BASE_DIR`, the toolkit's own setting for running outside SageMaker.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from standin.aws_calls import role_environment
from standin.launch import free_port

TERMINAL = ("Completed", "Failed", "Stopped")  # the statuses a job (training or tuning) ends in


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


# SageMaker downloads a channel's objects several at a time; one at a time, a channel of small photos
# would spend its time in round trips.
DOWNLOAD_THREADS = 8


def _download(s3, objects: list[tuple[str, str, Path]]) -> None:
    """Each (bucket, key, destination), several at a time; an object that cannot be read fails the job
    as SageMaker fails it, naming the object."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[str, str, Path]) -> None:
        bucket, key, destination = item
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
            raise JobError(
                f"ClientError: Data download failed: could not download s3://{bucket}/{key} ({code})"
            ) from exc
        destination.write_bytes(body)

    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        list(pool.map(one, objects))


def download_prefix(s3, uri: str, target: Path) -> int:
    """S3Prefix: every object under `uri`, relative to it."""
    bucket, prefix = split_s3_uri(uri)
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            # A prefix naming one object whole (a model.tar.gz) gives that file under its own name.
            relative = obj["Key"][len(prefix) :].lstrip("/") or obj["Key"].rsplit("/", 1)[-1]
            if not relative.endswith("/"):
                objects.append((bucket, obj["Key"], target / relative))
    if not objects:
        raise JobError(f"ClientError: no data in channel {uri}")
    _download(s3, objects)
    return len(objects)


def read_manifest(s3, uri: str) -> tuple[str, str, list[str]]:
    """A ManifestFile (`[{"prefix": "s3://bucket/prefix/"}, "relative/key", ...]`): its prefix's bucket
    and key, and its relative keys."""
    bucket, key = split_s3_uri(uri)
    try:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception as exc:
        raise JobError(f"ClientError: could not read the manifest file {uri}: {exc}") from exc
    if (
        not isinstance(manifest, list)
        or not manifest
        or not isinstance(manifest[0], dict)
        or not str(manifest[0].get("prefix", "")).startswith("s3://")
        or not all(isinstance(entry, str) for entry in manifest[1:])
    ):
        raise JobError(f'ClientError: the manifest file {uri} is not [{{"prefix": "s3://..."}}, "relative/key", ...]')
    prefix_bucket, prefix = split_s3_uri(manifest[0]["prefix"])
    return prefix_bucket, prefix, manifest[1:]


def download_manifest(s3, uri: str, target: Path) -> int:
    """ManifestFile: each object the manifest lists, at its path relative to the manifest's prefix."""
    bucket, prefix, entries = read_manifest(s3, uri)
    if not entries:
        raise JobError(f"ClientError: the manifest file {uri} lists no objects")
    _download(s3, [(bucket, prefix + entry, target / entry) for entry in entries])
    return len(entries)


def download_channel(s3, channel: dict, target: Path) -> int:
    source = channel["DataSource"]["S3DataSource"]
    if source["S3DataType"] == "ManifestFile":
        return download_manifest(s3, source["S3Uri"], target)
    return download_prefix(s3, source["S3Uri"], target)


class JobError(RuntimeError):
    """A failure that becomes the job's FailureReason as it is."""


CONTAINER_ROOT = "/opt/ml"
DEFAULT_CHECKPOINT_PATH = "/opt/ml/checkpoints"


def checkpoint_folder(job: dict, root: Path) -> Path | None:
    """The local folder standing for the job's `CheckpointConfig.LocalPath` (default
    /opt/ml/checkpoints), or None without a CheckpointConfig. There is no container: only paths
    under /opt/ml can be given a place, in the job's folder."""
    config = job.get("CheckpointConfig")
    if not config:
        return None
    local = (config.get("LocalPath") or DEFAULT_CHECKPOINT_PATH).rstrip("/")
    relative = os.path.relpath(local, CONTAINER_ROOT)
    if not local.startswith(CONTAINER_ROOT + "/") or relative.startswith(".."):
        raise JobError(
            f"ClientError: CheckpointConfig.LocalPath {local} is not under {CONTAINER_ROOT} "
            "(the stand-in maps only /opt/ml into the job's folder)"
        )
    return root / relative


class CheckpointSync:
    """`CheckpointConfig` as SageMaker honours it: at the start, everything under `S3Uri` is copied
    into the local folder (a retry under a new name resumes from what the earlier job left); while
    the job runs, files written there are uploaded to `S3Uri` under the same relative path; at the
    end (completed, failed or stopped) a last pass uploads what is left.

    The folder is polled every `interval` seconds. A file is uploaded once it is complete and differs
    (size, mtime, inode) from what was uploaded last: during the run, complete means not written to
    for `quiet` seconds (a file renamed into place, as train.py's save_atomic does, is whole at
    once; its mtime is the last write); after the run, everything is. Every file counts, whatever
    its name: SageMaker copies whatever is in the folder, so a temporary file written there (an
    atomic write's `*.tmp`) is uploaded too, and restored on the next start (train.py's save_atomic
    writes its partial files beside the folder for that reason). A file deleted locally stays in
    S3: nothing is deleted there."""

    def __init__(
        self, s3, uri: str, folder: Path, interval: float = 1.0, quiet: float = 0.5, log: Callable[[str], None] = print
    ) -> None:
        self.s3, self.folder, self.interval, self.quiet, self.log = s3, folder, interval, quiet, log
        self.bucket, key = split_s3_uri(uri)
        self.prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        self.uploaded: dict[str, tuple] = {}  # relative path -> the stat it was uploaded at
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    @staticmethod
    def _signature(stat: os.stat_result) -> tuple:
        return stat.st_size, stat.st_mtime_ns, stat.st_ino

    def restore(self) -> int:
        """Copy every object under S3Uri into the folder; the number copied."""
        self.folder.mkdir(parents=True, exist_ok=True)
        count = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(self.prefix) :]
                if not relative or relative.endswith("/"):
                    continue
                destination = self.folder / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                body = self.s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"]
                tmp = destination.with_name(destination.name + ".restoring")
                with tmp.open("wb") as out:
                    shutil.copyfileobj(body, out, 1 << 20)
                tmp.replace(destination)
                # What was just downloaded is not uploaded back unless the job changes it.
                self.uploaded[relative] = self._signature(destination.stat())
                count += 1
        return count

    def sync(self, final: bool = False) -> int:
        """One pass: upload the files that are complete and new or changed; the number uploaded."""
        with self.lock:
            count = 0
            for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
                relative = path.relative_to(self.folder).as_posix()
                try:
                    with path.open("rb") as handle:
                        stat = os.fstat(handle.fileno())
                        signature = self._signature(stat)
                        complete = final or time.time_ns() - stat.st_mtime_ns >= self.quiet * 1e9
                        if not complete or self.uploaded.get(relative) == signature:
                            continue
                        # The open handle keeps reading this version even if a rename replaces the file.
                        self.s3.put_object(Bucket=self.bucket, Key=self.prefix + relative, Body=handle)
                except FileNotFoundError:  # renamed or removed between the listing and the open
                    continue
                self.uploaded[relative] = signature
                count += 1
                self.log(f"checkpoint uploaded: {relative} -> s3://{self.bucket}/{self.prefix}{relative}")
            return count

    def _poll(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.sync()
            except Exception as exc:  # S3 unreachable for a moment: the next poll or the last pass retries
                self.log(f"checkpoint upload failed, retrying: {type(exc).__name__}: {exc}")

    def start(self) -> None:
        self.thread = threading.Thread(target=self._poll, daemon=True, name=f"checkpoints-{self.folder}")
        self.thread.start()

    def finish(self) -> int:
        """Stop polling and upload whatever is left."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        return self.sync(final=True)


# The PyTorch training image's entry point: SageMaker's training toolkit, handing over to the
# PyTorch toolkit's launcher (the image's SAGEMAKER_TRAINING_MODULE).
TOOLKIT_COMMAND = ("-m", "sagemaker_training.cli.train")
TRAINING_MODULE = "sagemaker_pytorch_container.training:main"
# SageMaker's fixed name of a job's single host, and the instance group it belongs to.
HOST = "algo-1"
INSTANCE_GROUP = "homogeneousCluster"
# What StopTrainingJob leaves a job between SIGTERM and SIGKILL ("Stop a training job": 120 s).
STOP_GRACE_S = 120.0


def resource_config(job: dict) -> dict:
    """`resourceconfig.json` as SageMaker writes it for a one-instance job."""
    instance_type = job.get("ResourceConfig", {}).get("InstanceType", "local")
    return {
        "current_host": HOST,
        "current_instance_type": instance_type,
        "current_group_name": INSTANCE_GROUP,
        "hosts": [HOST],
        "network_interface_name": "eth0",
        "instance_groups": [{"instance_group_name": INSTANCE_GROUP, "instance_type": instance_type, "hosts": [HOST]}],
    }


def input_data_config(job: dict) -> dict:
    """`inputdataconfig.json` as SageMaker writes it: each channel's input mode and S3 settings."""
    config = {}
    for channel in job.get("InputDataConfig", []):
        source = channel["DataSource"]["S3DataSource"]
        entry = {
            "TrainingInputMode": channel.get("InputMode")
            or job.get("AlgorithmSpecification", {}).get("TrainingInputMode", "File"),
            "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
            "RecordWrapperType": channel.get("RecordWrapperType", "None"),
        }
        if channel.get("ContentType"):
            entry["ContentType"] = channel["ContentType"]
        config[channel["ChannelName"]] = entry
    return config


def prepare(job: dict, root: Path, s3, region: str, python: str) -> tuple[list[str], dict[str, str]]:
    """Do what SageMaker does before the container starts, under `root` standing for /opt/ml: the
    channels in `input/data`, the `input/config` files, the empty folders. Return the toolkit's
    arguments (after the container-side Python) and the container's environment."""
    for channel in job.get("InputDataConfig", []):
        download_channel(s3, channel, root / "input" / "data" / channel["ChannelName"])
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(job.get("HyperParameters", {})))
    (config / "inputdataconfig.json").write_text(json.dumps(input_data_config(job)))
    (config / "resourceconfig.json").write_text(json.dumps(resource_config(job)))
    # The toolkit needs model/ and output/ to exist (without output/ a failure can exit 0), and
    # extracts the source only into an empty code/: one fresh folder per job.
    for folder in ("model", "output/data", "code"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    checkpoints = checkpoint_folder(job, root)  # a LocalPath the stand-in cannot place fails the job here
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)

    # The container's environment: the image's settings and SageMaker's, the job's role's
    # credentials (the toolkit fetches the source with them), never the stand-in's own variables for
    # the job (SM_*), credentials or import path.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SM_", "AWS_ACCESS_KEY", "AWS_SECRET", "AWS_SESSION", "AWS_PROFILE"))
        and k not in ("PYTHONPATH", "SAGEMAKER_BASE_DIR")
    }
    env.update(role_environment(job["RoleArn"]))
    env.update(
        {
            "AWS_REGION": region,
            "AWS_DEFAULT_REGION": region,
            "TRAINING_JOB_NAME": job["TrainingJobName"],
            "TRAINING_JOB_ARN": job.get("TrainingJobArn", ""),
            "SAGEMAKER_TRAINING_MODULE": TRAINING_MODULE,
            "SAGEMAKER_BASE_DIR": str(root),
            # The toolkit waits up to 15 minutes for `algo-1` to resolve, as hosts come up on SageMaker;
            # this is its own switch for a host that never will.
            "SM_STUDIO_LOCAL_MODE": "true",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            # The image's interpreter comes first on its PATH: the toolkit starts `torchrun` by name.
            "PATH": os.pathsep.join([str(Path(python).parent), os.environ.get("PATH", "")]),
            # On SageMaker each job has its instances to itself; here jobs share one host, so each job's
            # torchrun (the toolkit's torch_distributed launcher) gets a rendezvous port of its own.
            "PET_MASTER_PORT": str(free_port()),
            # A fresh instance's torch hub cache is empty: the host's must not lend a job weights that the
            # job did not bring (its weights channel) and could not download under network isolation.
            "TORCH_HOME": str(root / "torch"),
        }
    )
    env.update(job.get("Environment", {}))
    return list(TOOLKIT_COMMAND), env


class JobProcess:
    """The container's processes: the toolkit and what it starts, in a process group of their own, so
    that StopTrainingJob reaches the entry point too (SIGTERM to all, SIGKILL after the grace time)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, grace_s: float = STOP_GRACE_S) -> None:
        self.popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.grace_s = grace_s
        assert self.popen.stdout is not None  # stdout=PIPE
        self.stdout = self.popen.stdout

    def _signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, number)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)
        killer = threading.Timer(self.grace_s, self._signal, args=(signal.SIGKILL,))
        killer.daemon = True
        killer.start()

    def wait(self) -> int:
        code = self.popen.wait()
        self._signal(signal.SIGKILL)  # nothing the entry point left behind outlives the job
        return code


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
    """The job's output in CloudWatch Logs under SageMaker's names (a training job's
    `/aws/sagemaker/TrainingJobs`, `<job>/algo-1-<time>`; a transform job names its own group and
    stream), so the Amazon provider's `print_log` shows it in the Airflow task log. Lines are sent
    in batches."""

    def __init__(
        self, logs, job_name: str, flush_every: float = 1.0, group: str = LOG_GROUP, stream: str | None = None
    ) -> None:
        self.logs, self.flush_every, self.last = logs, flush_every, time.time()
        self.pending: list[dict] = []
        self.group = group
        self.stream = stream or f"{job_name}/algo-1-{int(time.time())}"
        with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
            logs.create_log_group(logGroupName=group)
        logs.create_log_stream(logGroupName=group, logStreamName=self.stream)

    def write(self, line: str) -> None:
        # CloudWatch Logs refuses empty messages; a blank line (in a traceback, say) is kept as one space.
        self.pending.append({"timestamp": int(time.time() * 1000), "message": line.rstrip("\n") or " "})
        if time.time() - self.last >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.logs.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=self.pending)
            self.pending = []
        self.last = time.time()


def _log_line(log_path: Path, line: str) -> None:
    """A line of the stand-in's own in the job's job.log (not in CloudWatch: the script's output only)."""
    with log_path.open("a") as log:
        log.write(f"[standin] {line}\n")


def run_job(
    job: dict,
    root: Path,
    s3,
    python: str,
    update: Callable[..., None],
    started_process: Callable[[JobProcess], None] | None = None,
    logs=None,
    metrics_seen: Callable[[dict[str, list[float]]], None] | None = None,
    region: str = "us-east-1",
) -> None:
    """Run `job` to its end, reporting through `update(status=..., secondary=..., **fields)`.
    With a CloudWatch Logs client, the container's output also goes there; `metrics_seen` gets the
    metric series so far whenever a line adds to them (what early stopping looks at)."""
    log_path = root / "job.log"
    update(status="InProgress", secondary="Downloading", message="Downloading input data")
    try:
        command, env = prepare(job, root, s3, region, python)
    except JobError as exc:
        update(status="Failed", secondary="Failed", message=str(exc), FailureReason=str(exc))
        return
    checkpoints = None
    folder = checkpoint_folder(job, root)  # None without a CheckpointConfig
    if folder is not None:
        checkpoints = CheckpointSync(
            s3,
            job["CheckpointConfig"]["S3Uri"],
            folder,
            log=lambda line: _log_line(log_path, line),
        )
        restored = checkpoints.restore()
        _log_line(log_path, f"checkpoints: {restored} file(s) restored from {job['CheckpointConfig']['S3Uri']}")
        checkpoints.start()
    update(status="InProgress", secondary="Training", message="Training in progress (SageMaker's training toolkit)")
    definitions = job.get("AlgorithmSpecification", {}).get("MetricDefinitions", [])
    metrics: dict[str, list[float]] = {}
    started = time.time()
    cloudwatch = CloudWatchLog(logs, job["TrainingJobName"]) if logs is not None else None
    runtime_limit = job.get("StoppingCondition", {}).get("MaxRuntimeInSeconds")
    exceeded, limit = threading.Event(), None
    try:
        with log_path.open("a") as log:
            proc = JobProcess([python, *command], env, root)
            if started_process:
                started_process(proc)
            if runtime_limit:  # StoppingCondition: SageMaker stops the job at its limit, as StopTrainingJob would

                def stop_at_limit() -> None:
                    exceeded.set()
                    proc.terminate()

                limit = threading.Timer(runtime_limit, stop_at_limit)
                limit.daemon = True
                limit.start()
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if cloudwatch:
                    cloudwatch.write(line)
                if parse_metrics(line, definitions, metrics) and metrics_seen:
                    metrics_seen(metrics)
            code = proc.wait()
    except BaseException:
        if checkpoints:  # no poller outlives its job
            checkpoints.stopping.set()
        raise
    finally:
        if limit:
            limit.cancel()
    if cloudwatch:
        cloudwatch.flush()
    if checkpoints:  # completed, failed or stopped: SageMaker's last upload of the checkpoints
        checkpoints.finish()
    seconds = int(time.time() - started)
    final = [{"MetricName": k, "Value": v[-1], "Timestamp": time.time()} for k, v in sorted(metrics.items())]
    if code < 0:  # stopped: what the script saved in /opt/ml/model is kept, as SageMaker keeps it
        artifacts = {}
        if any((root / "model").iterdir()):
            artifacts = {"ModelArtifacts": {"S3ModelArtifacts": upload_model(job, root, s3)}}
        secondary, message = (
            ("MaxRuntimeExceeded", "Training job runtime exceeded MaxRuntimeInSeconds provided")
            if exceeded.is_set()
            else ("Stopped", "Stopped by StopTrainingJob")
        )
        update(
            status="Stopped",
            secondary=secondary,
            message=message,
            FinalMetricDataList=final,
            TrainingTimeInSeconds=seconds,
            BillableTimeInSeconds=seconds,
            **artifacts,
        )
        return
    if code != 0:
        failure = root / "output" / "failure"
        reason = failure.read_text().strip() if failure.is_file() else ""
        reason = f"AlgorithmError: {reason or 'ExecuteUserScriptError'}, exit code {code}"
        update(
            status="Failed",
            secondary="Failed",
            message=reason,
            FailureReason=reason[:1024],
            FinalMetricDataList=final,
            TrainingTimeInSeconds=seconds,
        )
        return
    update(status="InProgress", secondary="Uploading", message="Uploading generated training model")
    update(
        status="Completed",
        secondary="Completed",
        message="Training job completed",
        ModelArtifacts={"S3ModelArtifacts": upload_model(job, root, s3)},
        FinalMetricDataList=final,
        TrainingTimeInSeconds=seconds,
        BillableTimeInSeconds=seconds,
    )


def upload_model(job: dict, root: Path, s3) -> str:
    """/opt/ml/model as `<S3OutputPath>/<job>/output/model.tar.gz`; its URI."""
    bucket, prefix = split_s3_uri(job["OutputDataConfig"]["S3OutputPath"])
    key = f"{prefix.rstrip('/')}/{job['TrainingJobName']}/output/model.tar.gz".lstrip("/")
    s3.put_object(Bucket=bucket, Key=key, Body=package_model(root / "model"))
    return f"s3://{bucket}/{key}"
