"""Running a SageMaker batch transform job locally, on the serving stack endpoints use.

For one job: list the input objects (an S3 prefix, or a manifest file) with the model's execution
role, start `model_frontend.py` processes on the model (`endpoints.serve_model`, the model container's
`Environment` updated with the job's), send every object to them as SageMaker's batch transform
sends it (whole, or split into lines and mini-batches up to `MaxPayloadInMB`), and upload each
object's answers to `<S3OutputPath>/<relative path>.out`, as the API reference's TransformOutput
describes it: "Batch transform doesn't upload partially processed objects ... uploads only the
output for successfully processed objects. If any object fails in the transform job batch transform
marks the job as failed."

Not honoured: the instance type, and instances beyond this machine's cores (one worker process
stands for one instance); the job's first log lines say so.
"""

from __future__ import annotations

import gzip
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from standin.sagemaker import endpoints
from standin.sagemaker.endpoints import ModelServer, WorkerFailed
from standin.sagemaker.exceptions import ValidationException
from standin.sagemaker.training import CloudWatchLog, JobError, read_manifest, split_s3_uri

LOG_GROUP = "/aws/sagemaker/TransformJobs"
# MaxPayloadInMB is in MB, which AWS defines nowhere; taken as MiB, as what evidence there is says:
# SageMaker's old 5 MB InvokeEndpoint limit was reported as "HTTP content length exceeded 5246976
# bytes" (5 MiB + 4 KiB, aws/sagemaker-python-sdk#171), and TorchServe's execution-parameters plugin
# for SageMaker gives MaxPayloadInMB as max_request_size / (1024 * 1024). A payload of exactly the
# limit is sent, one byte more is not. (bin_counter.batch chooses photos by the stricter 10^6.)
MB = 1024 * 1024
# CreateTransformJob's MaxPayloadInMB: "The default value is 6 MB. The value of MaxPayloadInMB cannot
# be greater than 100 MB. If you specify the MaxConcurrentTransforms parameter, the value of
# (MaxConcurrentTransforms * MaxPayloadInMB) also cannot exceed 100 MB." 0 is for HTTP chunked
# encoding of arbitrarily large payloads: here, no limit.
DEFAULT_PAYLOAD_MB, MAX_PAYLOAD_MB = 6, 100
# ModelClientConfig: InvocationsTimeoutInSeconds 1..3600 (default 600), InvocationsMaxRetries 0..3 (default 3).
DEFAULT_TIMEOUT_S, DEFAULT_RETRIES = 600, 3
SERVED_SPLIT_TYPES = ("None", "Line")
SERVED_DATA_TYPES = ("S3Prefix", "ManifestFile")
# DataProcessing's defaults: the whole input, the whole output, nothing joined.
DEFAULT_DATA_PROCESSING = {"InputFilter": "$", "OutputFilter": "$", "JoinSource": "None"}


def check_request(params: dict) -> None:
    """A CreateTransformJob request the stand-in takes, or ValidationException: AWS's limits that the
    service model does not state (its own are checked for every operation, standin/constraints.py),
    and what the stand-in does not serve."""
    payload = params.get("MaxPayloadInMB", DEFAULT_PAYLOAD_MB)
    if payload > MAX_PAYLOAD_MB:
        raise ValidationException(
            f"1 validation error detected: Value '{payload}' at 'maxPayloadInMB' failed to "
            f"satisfy constraint: Member must have value less than or equal to {MAX_PAYLOAD_MB}"
        )
    concurrent = params.get("MaxConcurrentTransforms") or 1
    if concurrent * payload > MAX_PAYLOAD_MB:
        raise ValidationException(
            f"MaxConcurrentTransforms ({concurrent}) * MaxPayloadInMB ({payload}) = "
            f"{concurrent * payload} MB exceeds the limit of {MAX_PAYLOAD_MB} MB"
        )
    source = params["TransformInput"]["DataSource"]["S3DataSource"]
    unserved = []
    if source["S3DataType"] not in SERVED_DATA_TYPES:
        unserved.append(f"S3DataType {source['S3DataType']} (only {' and '.join(SERVED_DATA_TYPES)})")
    split = params["TransformInput"].get("SplitType", "None")
    if split not in SERVED_SPLIT_TYPES:
        unserved.append(f"SplitType {split} (only {' and '.join(SERVED_SPLIT_TYPES)})")
    processing = {**DEFAULT_DATA_PROCESSING, **params.get("DataProcessing", {})}
    if processing != DEFAULT_DATA_PROCESSING:
        unserved.append(f"DataProcessing {params['DataProcessing']} (only the defaults {DEFAULT_DATA_PROCESSING})")
    if params.get("DataCaptureConfig"):
        unserved.append("DataCaptureConfig")
    if unserved:
        raise ValidationException(
            "The local stand-in does not serve " + "; ".join(unserved) + " in transform jobs (see standin/README.md)"
        )


def with_defaults(params: dict) -> dict:
    """The job's record: the request with the limits it runs under filled in, as DescribeTransformJob
    reports them. MaxConcurrentTransforms unset: 1, SageMaker's when the container serves no
    /execution-parameters (the PyTorch image's TorchServe loads no such plugin)."""
    return {
        **params,
        "MaxConcurrentTransforms": params.get("MaxConcurrentTransforms") or 1,
        "MaxPayloadInMB": params.get("MaxPayloadInMB", DEFAULT_PAYLOAD_MB),
    }


def check_input(s3, data_source: dict, role_arn: str, region: str) -> None:
    """SageMaker refuses a job whose S3 prefix has no objects at CreateTransformJob, in these words
    (aws/amazon-sagemaker-examples#2414); a manifest is read when the job runs."""
    source = data_source["S3DataSource"]
    if source["S3DataType"] != "S3Prefix":
        return
    bucket, prefix = split_s3_uri(source["S3Uri"])
    try:
        found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0)
    except Exception:  # no such bucket, no permission: the same answer
        found = 0
    if not found:
        raise ValidationException(
            f'No S3 objects found under S3 URL "{source["S3Uri"]}" given in input data source. Please ensure that the '
            f"bucket exists in the selected region ({region}), that objects exist under that S3 prefix, and that the "
            f'role "{role_arn}" has "s3:ListBucket" permissions on bucket "{bucket}".'
        )


class TransformError(RuntimeError):
    """A failure of the whole job; its message becomes the FailureReason as it is."""


class ObjectFailed(RuntimeError):
    """One input object that gets no .out; the message says why."""


@dataclass(frozen=True)
class InputObject:
    bucket: str
    key: str
    relative: str  # its path under S3OutputPath, without ".out"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def input_objects(s3, source: dict) -> list[InputObject]:
    """The job's input objects in the order they are listed: for S3Prefix every object under S3Uri,
    sorted by key, relative to the S3Uri's folder (its key up to the last "/"); for ManifestFile the
    manifest's keys (`[{"prefix": "s3://bucket/prefix/"}, "relative/key", ...]`), relative to its prefix."""
    if source["S3DataType"] == "S3Prefix":
        bucket, prefix = split_s3_uri(source["S3Uri"])
        folder = prefix[: prefix.rfind("/") + 1]
        keys = [
            obj["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]
        return [InputObject(bucket, key, key[len(folder) :]) for key in sorted(keys)]
    try:
        prefix_bucket, prefix, entries = read_manifest(s3, source["S3Uri"])
    except JobError as exc:
        raise TransformError(str(exc)) from exc
    return [InputObject(prefix_bucket, prefix + entry, entry) for entry in entries]


def output_location(output_path: str, relative: str) -> tuple[str, str]:
    """(bucket, key) of an input object's answers: `<S3OutputPath>/<relative path>.out`."""
    bucket, prefix = split_s3_uri(output_path)
    return bucket, (f"{prefix.rstrip('/')}/" if prefix.strip("/") else "") + relative + ".out"


def payloads(body: bytes, split_type: str, strategy: str, limit: int) -> list[bytes]:
    """The request bodies for one object: the whole object (SplitType None), or its non-empty lines,
    one per request (SingleRecord) or as many as fit in `limit` bytes joined by newlines
    (MultiRecord). A payload over `limit` (0: none) fails the object: it is not sent."""
    if split_type == "None":
        requests = [body]
    else:
        records = [line.rstrip(b"\r") for line in body.split(b"\n")]
        records = [record for record in records if record]
        if strategy == "MultiRecord" and limit:
            requests, current = [], b""
            for record in records:
                joined = current + b"\n" + record if current else record
                if current and len(joined) > limit:
                    requests.append(current)
                    joined = record
                current = joined
            requests += [current] if current else []
        elif strategy == "MultiRecord":
            requests = [b"\n".join(records)] if records else []
        else:
            requests = records
    for payload in requests:
        if limit and len(payload) > limit:
            what = "object" if split_type == "None" else "record"
            raise ObjectFailed(
                f"the {what} is {len(payload)} bytes, over MaxPayloadInMB ({limit // MB} MB = "
                f"{limit} bytes): not sent to the model"
            )
    return requests


def assemble(answers: list[bytes], assemble_with: str) -> bytes:
    """One object's output: "To add a newline character at the end of every transformed record,
    specify Line" (TransformOutput.AssembleWith); None concatenates them as they are."""
    return b"".join(answer + b"\n" for answer in answers) if assemble_with == "Line" else b"".join(answers)


class JobLog:
    """The job's progress lines: `job.log` in its folder, and CloudWatch Logs under SageMaker's names
    (`/aws/sagemaker/TransformJobs`, a stream `<job>/<instance id>` per worker) where a client is given."""

    def __init__(self, path: Path, job_name: str, instances: list[str], logs=None) -> None:
        self.path, self.lock = path, threading.Lock()
        self.streams = (
            [CloudWatchLog(logs, job_name, group=LOG_GROUP, stream=f"{job_name}/{instance}") for instance in instances]
            if logs is not None
            else []
        )

    def line(self, text: str, instance: int = 0) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        with self.lock:
            with self.path.open("a") as log:
                log.write(f"{stamp}: {text}\n")
            if self.streams:
                self.streams[instance % len(self.streams)].write(text)

    def flush(self) -> None:
        with self.lock:
            for stream in self.streams:
                stream.flush()


class TransformRun:
    """One transform job from start to end: its workers, its objects, its stop. `update(status,
    **fields)` reports to the job's record."""

    def __init__(
        self,
        job: dict,
        model: dict,
        root: Path,
        s3,
        python: str,
        update: Callable[..., None],
        logs=None,
        cpu_count: int = 1,
    ) -> None:
        self.job, self.model, self.root, self.s3, self.python, self.update = job, model, root, s3, python, update
        requested = job["TransformResources"]["InstanceCount"]
        self.instances = [f"i-{uuid.uuid4().hex[:17]}" for _ in range(max(1, min(requested, cpu_count)))]
        self.log = JobLog(root / "job.log", job["TransformJobName"], self.instances, logs)
        self.stopping = threading.Event()
        self.processes: list = []
        self.lock = threading.Lock()

    def stop(self) -> None:
        """StopTransformJob, or the stand-in shutting down: no more requests, no worker left running."""
        self.stopping.set()
        with self.lock:
            processes = list(self.processes)
        for process in processes:
            process.terminate()

    def _started(self, process) -> None:
        with self.lock:
            self.processes.append(process)
        if self.stopping.is_set():
            process.terminate()

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.stop()
            self._forward_worker_logs()
            self.log.flush()

    def _run(self) -> None:
        job = self.job
        resources = job["TransformResources"]
        self.update("InProgress", TransformStartTime=time.time())
        self.log.line(
            f"[sagemaker logs]: MaxConcurrentTransforms={job['MaxConcurrentTransforms']}, "
            f"MaxPayloadInMB={job['MaxPayloadInMB']}, "
            f"BatchStrategy={job.get('BatchStrategy', 'SingleRecord').upper()}"
        )
        self.log.line(
            f"[standin] instance type {resources['InstanceType']} not honoured; "
            f"{len(self.instances)} of {resources['InstanceCount']} instance(s) run, one model worker "
            f"process each (this machine's cores bound them)"
        )
        try:
            objects = input_objects(self.s3, job["TransformInput"]["DataSource"]["S3DataSource"])
            servers = self._start_workers()
        except (TransformError, WorkerFailed) as exc:
            if self.stopping.is_set():
                self.update("Stopped")
                return
            reason = str(exc) if isinstance(exc, TransformError) else f"ClientError: {exc}"
            self.log.line(f"[sagemaker logs]: {reason}")
            self.update("Failed", FailureReason=reason[:1024])
            return
        failures = self._transform_all(objects, servers)
        if self.stopping.is_set():
            self.log.line("[standin] stopped by StopTransformJob")
            self.update("Stopped")
        elif failures:
            first, detail = min(failures, key=lambda f: objects.index(f[0]))
            reason = (
                f"ClientError: {len(failures)} of {len(objects)} input objects failed and have no .out; "
                f"the first: {first.uri}: {detail}"
            )
            self.update("Failed", FailureReason=reason[:1024])
        else:
            self.log.line(f"[standin] {len(objects)} object(s) transformed")
            self.update("Completed")

    def _start_workers(self) -> list[ModelServer]:
        container = self.model.get("PrimaryContainer") or self.model["Containers"][0]
        url = container.get("ModelDataUrl")
        if not url:
            raise TransformError(f"ClientError: the model {self.model['ModelName']} has no ModelDataUrl")
        # The model container's Environment, with the job's on top (CreateTransformJob's Environment).
        environment = {**container.get("Environment", {}), **self.job.get("Environment", {})}
        servers: list[ModelServer | None] = [None] * len(self.instances)
        errors: list[WorkerFailed] = []

        def start(index: int) -> None:
            try:
                servers[index] = endpoints.serve_model(
                    self.root / f"model-{index}", url, self.s3, self.python, environment, started=self._started
                )
            except WorkerFailed as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(len(self.instances))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for index, instance in enumerate(self.instances):
            self.log.line(f"[standin] model worker {index} ({instance}) is serving", index)
        return [server for server in servers if server is not None]

    def _transform_all(self, objects: list[InputObject], servers: list[ModelServer]) -> list[tuple[InputObject, str]]:
        """Every object through the workers, MaxConcurrentTransforms requests at most in flight to each
        (one object per request stream; an object's own requests go one after another)."""
        pending: queue.Queue[InputObject] = queue.Queue()
        for item in objects:
            pending.put(item)
        failures: list[tuple[InputObject, str]] = []

        def drain(server: ModelServer, index: int) -> None:
            while not self.stopping.is_set():
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._transform_one(item, server, index)
                except ObjectFailed as exc:
                    if not self.stopping.is_set():
                        self.log.line(f"[sagemaker logs]: {item.bucket}/{item.key}: ClientError: {exc}", index)
                        failures.append((item, str(exc)))
                except Exception as exc:  # S3 refused a read or a write: this object fails, the others go on
                    if not self.stopping.is_set():
                        detail = f"{type(exc).__name__}: {exc}"
                        self.log.line(f"[sagemaker logs]: {item.bucket}/{item.key}: {detail}", index)
                        failures.append((item, detail))

        threads = [
            threading.Thread(target=drain, args=(server, index), daemon=True)
            for index, server in enumerate(servers)
            for _ in range(self.job["MaxConcurrentTransforms"])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return failures

    def _transform_one(self, item: InputObject, server: ModelServer, index: int) -> None:
        job = self.job
        config = job["TransformInput"]
        body = self.s3.get_object(Bucket=item.bucket, Key=item.key)["Body"].read()
        if config.get("CompressionType") == "Gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError) as exc:
                raise ObjectFailed(f"CompressionType is Gzip and the object is not gzip: {exc}") from exc
        requests = payloads(
            body, config.get("SplitType", "None"), job.get("BatchStrategy", "SingleRecord"), job["MaxPayloadInMB"] * MB
        )
        answers = []
        for payload in requests:
            if self.stopping.is_set():
                return
            answers.append(self._ask(server, payload))
        output = job["TransformOutput"]
        bucket, key = output_location(output["S3OutputPath"], item.relative)
        if self.stopping.is_set():  # a stopped job stores no more output
            return
        self.s3.put_object(Bucket=bucket, Key=key, Body=assemble(answers, output.get("AssembleWith", "None")))
        self.log.line(f"[standin] {item.uri} -> s3://{bucket}/{key}", index)

    def _ask(self, server: ModelServer, payload: bytes) -> bytes:
        """The model's 200 answer to one request, retried on a timeout, a dropped connection or a 5xx
        as ModelClientConfig says; anything else fails the object."""
        client = self.job.get("ModelClientConfig", {})
        timeout = client.get("InvocationsTimeoutInSeconds", DEFAULT_TIMEOUT_S)
        attempts = 1 + client.get("InvocationsMaxRetries", DEFAULT_RETRIES)
        content_type, accept = self.job["TransformInput"].get("ContentType"), self.job["TransformOutput"].get("Accept")
        failure, tried = "", 0
        while tried < attempts:
            tried += 1
            try:
                status, answer, _ = endpoints.invoke(server.port, payload, content_type, accept, timeout)
            except OSError as exc:
                failure = f"no answer from the model within {timeout}s ({exc})"
                if self.stopping.is_set():
                    break
                continue
            if status == 200:
                return answer
            first_line = answer.decode(errors="replace").split("\n", 1)[0][:300]
            # TorchServe's 413 for a request over max_request_size has no body: the status alone.
            failure = f"Bad HTTP status received from algorithm: {status}" + (f": {first_line}" if first_line else "")
            if status < 500:
                raise ObjectFailed(failure)
        raise ObjectFailed(f"{failure} (after {tried} attempt(s))")

    def _forward_worker_logs(self) -> None:
        """What the model workers printed (the toolkit's tracebacks), in their instances' streams, as
        the container's output reaches CloudWatch on AWS; it stays in `model-<n>.log` beside job.log."""
        if not self.log.streams:
            return
        for index in range(len(self.instances)):
            path = self.root / f"model-{index}.log"
            if path.is_file():
                for line in path.read_text(errors="replace").splitlines():
                    self.log.streams[index].write(line)
