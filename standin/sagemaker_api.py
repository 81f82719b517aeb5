"""The SageMaker API operations the stand-in serves, checked against botocore's service model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.session
from botocore.utils import parse_timestamp
from botocore.validate import ParamValidator

from standin import training, tuning
from standin.aws_calls import role_credentials
from standin.endpoints import EndpointHost, WorkerFailed
from standin.roles import RoleCheck

log = logging.getLogger("standin")
ACCOUNT = "000000000000"
TERMINAL = ("Completed", "Failed", "Stopped")
# List* filters on a record's times: parameter -> the field it bounds (strictly, as AWS does).
TIME_FILTERS = {"CreationTimeBefore": "CreationTime", "CreationTimeAfter": "CreationTime",
                "LastModifiedTimeBefore": "LastModifiedTime", "LastModifiedTimeAfter": "LastModifiedTime"}


def _epoch(value: float | str) -> float:
    # boto3 sends timestamps as epoch seconds; other clients may send ISO 8601 strings.
    return float(value) if isinstance(value, int | float) else parse_timestamp(value).timestamp()


@dataclass(frozen=True)
class Resource:
    folder: str
    name_field: str
    arn_field: str
    missing: str  # AWS's message for a name that does not exist
    duplicate_code: str
    duplicate: str  # AWS's message for a name that exists already


RESOURCES = {
    "training-job": Resource(
        "training-jobs", "TrainingJobName", "TrainingJobArn", "Requested resource not found: {arn}",
        "ResourceInUse", "Training job names must be unique within an AWS account and region, and a training "
                         "job with this name already exists ({arn})"),
    "hyper-parameter-tuning-job": Resource(
        "tuning-jobs", "HyperParameterTuningJobName", "HyperParameterTuningJobArn",
        "Requested resource not found: {arn}", "ResourceInUse",
        "Tuning job names must be unique within an AWS account and region ({arn})"),
    "model": Resource("models", "ModelName", "ModelArn", 'Could not find model "{arn}".',
                      "ValidationException", 'Cannot create already existing model "{arn}".'),
    "endpoint": Resource(
        "endpoints", "EndpointName", "EndpointArn", 'Could not find endpoint "{arn}".',
        "ValidationException", 'Cannot create already existing endpoint "{arn}".'),
    "endpoint-config": Resource(
        "endpoint-configs", "EndpointConfigName", "EndpointConfigArn", 'Could not find endpoint configuration "{arn}".',
        "ValidationException", 'Cannot create already existing endpoint configuration "{arn}".'),
}


# The role a request hands to SageMaker, which AWS checks as iam:PassRole on the caller.
PASSED_ROLES = {"CreateTrainingJob": ("RoleArn",),
                "CreateHyperParameterTuningJob": ("TrainingJobDefinition", "RoleArn"),
                "CreateModel": ("ExecutionRoleArn",)}


def arn(kind: str, name: str, region: str = "us-east-1") -> str:
    # SageMaker writes names in lowercase in its ARNs, and IAM matches those.
    return f"arn:aws:sagemaker:{region}:{ACCOUNT}:{kind}/{name.lower()}"


def authorizations(operation: str, params: dict) -> list[tuple]:
    """The IAM actions (and resources) AWS checks for one SageMaker API call: the operation on the
    resource it names ("*" for the List calls), sagemaker:AddTags when it tags at creation, and
    iam:PassRole for a role it hands over."""
    resource = params.get("ResourceArn", "*")
    for kind, spec in RESOURCES.items():
        if spec.name_field in params and _noun(kind) in operation:
            resource = arn(kind, params[spec.name_field])
            break
    found = [(f"sagemaker:{operation}", resource)]
    if operation.startswith("Create") and params.get("Tags"):
        found.append(("sagemaker:AddTags", resource))
    role = passed_role(operation, params)
    if role:
        found.append(("iam:PassRole", role, {"iam:PassedToService": "sagemaker.amazonaws.com"}))
    return found


def passed_role(operation: str, params: dict) -> str | None:
    """The role ARN a request hands to SageMaker, if it hands one."""
    role: object = params
    for field in PASSED_ROLES.get(operation, ()):
        role = role.get(field) if isinstance(role, dict) else None
    return role if isinstance(role, str) else None


def _noun(kind: str) -> str:
    return "".join(part.title() for part in kind.split("-"))


class AwsError(Exception):
    """An error as AWS sends it: a code (the `__type`) and a message."""

    def __init__(self, code: str, message: str, status: int = 400, extra: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.extra = code, message, status, extra or {}


class TokenBucket:
    """Invocations per second with a burst, per endpoint: what makes AWS answer ThrottlingException."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, max(1, burst)
        self.tokens: dict[str, tuple[float, float]] = {}  # endpoint -> (tokens, when)
        self.lock = threading.Lock()

    def take(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self.lock:
            tokens, then = self.tokens.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            allowed = tokens >= 1
            self.tokens[key] = (tokens - 1 if allowed else tokens, now)
            return allowed


class SageMakerApi:
    """Training jobs (create, describe, list, stop), state kept as JSON under `state_dir`."""

    def __init__(self, state_dir: Path, aws_endpoint: str, container_python: str, region: str = "us-east-1",
                 invoke_rate: float = 0.0, invoke_burst: int = 1, unhealthy_models: str | None = None,
                 roles: RoleCheck | None = None) -> None:
        self.model = botocore.session.get_session().get_service_model("sagemaker")
        self.state_dir = Path(state_dir)
        self.aws_endpoint, self.python, self.region = aws_endpoint, container_python, region
        self.lock = threading.Lock()
        self.processes: dict[str, object] = {}
        self.series: dict[str, dict[str, list[float]]] = {}  # training job -> metric values so far
        self.endpoints = EndpointHost(self.state_dir / "endpoint-workers", container_python,
                                      lambda role_arn: self._client("s3", role_arn))
        self.invoke_limit = TokenBucket(invoke_rate, invoke_burst)
        self.roles = roles or RoleCheck(None)
        # Failure drills: models whose name matches fail their health check, as a broken container would.
        self.unhealthy_models = re.compile(unhealthy_models) if unhealthy_models else None
        self._recover()

    # -- plumbing -------------------------------------------------------------------------------
    def call(self, operation: str, params: dict) -> dict:
        try:
            op_model = self.model.operation_model(operation)
        except Exception as exc:
            raise AwsError("UnknownOperationException", f"Operation {operation} is not supported") from exc
        report = ParamValidator().validate(params, op_model.input_shape)
        if report.has_errors():
            raise AwsError("ValidationException", report.generate_report())
        handler = getattr(self, "op_" + operation, None)
        if handler is None:
            raise AwsError("UnknownOperationException",
                           f"{operation} is valid SageMaker but not served by the local stand-in "
                           "(see standin/README.md)")
        self._check_passed_role(operation, params)
        return handler(params)

    def _check_passed_role(self, operation: str, params: dict) -> None:
        # SageMaker assumes the role at the request and refuses it there, before anything runs.
        role = passed_role(operation, params)
        if role and self.roles.refusal(role, "sagemaker.amazonaws.com"):
            raise AwsError("ValidationException", f"Could not assume role {role}. Please ensure that the role exists "
                                                  "and allows principal 'sagemaker.amazonaws.com' to assume the role.")

    def _file(self, kind: str, name: str) -> Path:
        return self.state_dir / RESOURCES[kind].folder / name / "resource.json"

    def _arn(self, kind: str, name: str) -> str:
        return arn(kind, name, self.region)

    def _get(self, kind: str, name: str) -> dict:
        path = self._file(kind, name)
        if not path.is_file():
            # What AWS really answers: a ValidationException (the service model lists ResourceNotFound
            # for some operations, but SageMaker sends this, and the Amazon provider relies on it).
            raise AwsError("ValidationException", RESOURCES[kind].missing.format(arn=self._arn(kind, name)))
        return json.loads(path.read_text())

    def _put(self, kind: str, record: dict) -> None:
        path = self._file(kind, record[RESOURCES[kind].name_field])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def _all(self, kind: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in (self.state_dir / RESOURCES[kind].folder).glob("*/resource.json")]

    def _create(self, kind: str, params: dict) -> dict:
        """Store a new resource with its ARN and creation time; a duplicate name is refused."""
        spec = RESOURCES[kind]
        name = params[spec.name_field]
        if self._file(kind, name).exists():
            raise AwsError(spec.duplicate_code, spec.duplicate.format(arn=self._arn(kind, name), name=name))
        now = time.time()
        record = {**params, spec.arn_field: self._arn(kind, name), "CreationTime": now, "LastModifiedTime": now}
        self._put(kind, record)
        return record

    def _delete(self, kind: str, name: str) -> dict:
        self._get(kind, name)
        shutil.rmtree(self._file(kind, name).parent)
        return {}

    def _client(self, service: str, role_arn: str):
        """A client acting as `role_arn`: SageMaker reads and writes S3 and logs with the job's or
        the model's role, never with the caller's rights."""
        return boto3.client(service, endpoint_url=self.aws_endpoint, region_name=self.region,
                            **role_credentials(role_arn))

    def _recover(self) -> None:
        # A job that was running when the stand-in stopped cannot be resumed: say so, as AWS
        # would for a lost instance.
        for job in self._all("training-job"):
            if job["TrainingJobStatus"] not in TERMINAL:
                job.update(TrainingJobStatus="Failed", SecondaryStatus="Failed",
                           FailureReason="InternalServerError: the local stand-in restarted during the job")
                self._put("training-job", job)
        for job in self._all("hyper-parameter-tuning-job"):
            if job["HyperParameterTuningJobStatus"] not in TERMINAL:
                job.update(HyperParameterTuningJobStatus="Failed",
                           FailureReason="InternalServerError: the local stand-in restarted during the tuning job")
                self._put("hyper-parameter-tuning-job", job)
        # Endpoints come back up with the configuration they were serving.
        for endpoint in self._all("endpoint"):
            if endpoint.get("EndpointConfigName"):
                endpoint.update(EndpointStatus="Creating")
                self._put("endpoint", endpoint)
                self._deploy_async(endpoint["EndpointName"], endpoint["EndpointConfigName"], updating=False)

    def op_ListTags(self, params: dict) -> dict:
        """The tags a resource was created with (AddTags is not served: tags are set at creation)."""
        arn = params["ResourceArn"]
        for kind, spec in RESOURCES.items():
            for record in self._all(kind):
                if record.get(spec.arn_field) == arn:
                    return {"Tags": record.get("Tags", [])}
        raise AwsError("ValidationException", f"Resource {arn} not found")

    # -- training jobs --------------------------------------------------------------------------
    def op_CreateTrainingJob(self, params: dict) -> dict:
        name = params["TrainingJobName"]
        with self.lock:
            notes = []
            resources = params.get("ResourceConfig", {})
            if resources.get("InstanceType") or resources.get("InstanceCount", 1) != 1:
                notes.append(f"instance {resources.get('InstanceType')} x{resources.get('InstanceCount')} "
                             "not honoured: runs as one local process")
            if params.get("EnableManagedSpotTraining"):
                notes.append("managed spot not honoured locally")
            if params.get("VpcConfig"):
                notes.append("VPC config not honoured locally")
            now = time.time()
            message = "; ".join(["Starting the local process", *notes])
            job = self._create("training-job", {
                **params, "TrainingJobStatus": "InProgress", "SecondaryStatus": "Starting",
                "SecondaryStatusTransitions": [{"Status": "Starting", "StartTime": now, "StatusMessage": message}]})
        threading.Thread(target=self._run, args=(name,), daemon=True, name=f"job-{name}").start()
        return {"TrainingJobArn": job["TrainingJobArn"]}

    def _run(self, name: str) -> None:
        job = self._get("training-job", name)
        root = self._file("training-job", name).parent / "opt-ml"

        def update(status: str, secondary: str, message: str, **fields) -> None:
            with self.lock:
                current = self._get("training-job", name)
                now = time.time()
                if current["TrainingJobStatus"] == "Stopping" and status == "InProgress":
                    return
                transitions = current["SecondaryStatusTransitions"]
                if transitions[-1]["Status"] != secondary:
                    transitions[-1]["EndTime"] = now
                    transitions.append({"Status": secondary, "StartTime": now, "StatusMessage": message})
                if status == "InProgress" and "TrainingStartTime" not in current:
                    current["TrainingStartTime"] = now
                if status in TERMINAL:
                    current["TrainingEndTime"] = now
                current.update(TrainingJobStatus=status, SecondaryStatus=secondary, LastModifiedTime=now, **fields)
                self._put("training-job", current)

        try:
            role = job["RoleArn"]
            training.run_job(job, root, self._client("s3", role), self.python, update,
                             started_process=lambda proc: self._started(name, proc),
                             logs=self._client("logs", role),
                             metrics_seen=lambda series: self.series.__setitem__(name, {
                                 k: list(v) for k, v in series.items()}))
        except Exception as exc:  # S3 unreachable, no credentials...: the job fails, saying why
            reason = f"ClientError: {type(exc).__name__}: {exc}"
            update(status="Failed", secondary="Failed", message=reason, FailureReason=reason[:1024])
        finally:
            self.processes.pop(name, None)

    def _started(self, name: str, proc) -> None:
        # A StopTrainingJob that came between "Training" and the process starting found no process to
        # stop: it is stopped here instead of running to completion.
        with self.lock:
            self.processes[name] = proc
            stopping = self._get("training-job", name)["TrainingJobStatus"] == "Stopping"
        if stopping:
            proc.terminate()

    def op_DescribeTrainingJob(self, params: dict) -> dict:
        return self._get("training-job", params["TrainingJobName"])

    @staticmethod
    def _listed(records: list[dict], params: dict, name_field: str, status_field: str | None = None) -> list[dict]:
        """The NameContains / StatusEquals / *TimeBefore / *TimeAfter / SortBy / SortOrder part that every
        List* call shares."""
        if params.get("NameContains"):
            records = [r for r in records if params["NameContains"] in r[name_field]]
        if params.get("StatusEquals"):
            records = [r for r in records if r[status_field] == params["StatusEquals"]]
        for bound, field in TIME_FILTERS.items():
            if params.get(bound) is not None:
                limit, before = _epoch(params[bound]), bound.endswith("Before")
                records = [r for r in records if (r[field] < limit if before else r[field] > limit)]
        key = {"Name": name_field, "Status": status_field}.get(params.get("SortBy"), "CreationTime")
        return sorted(records, key=lambda r: r[key], reverse=params.get("SortOrder", "Descending") == "Descending")

    def op_ListTrainingJobs(self, params: dict) -> dict:
        jobs = self._listed(self._all("training-job"), params, "TrainingJobName", "TrainingJobStatus")
        start = int(params.get("NextToken") or 0)
        size = params.get("MaxResults", 100)
        page = jobs[start:start + size]
        summaries = [{k: j[k] for k in ("TrainingJobName", "TrainingJobArn", "CreationTime", "TrainingJobStatus",
                                        "LastModifiedTime") if k in j} for j in page]
        result = {"TrainingJobSummaries": summaries}
        if start + size < len(jobs):
            result["NextToken"] = str(start + size)
        return result

    @staticmethod
    def _page(records: list[dict], params: dict, list_field: str, fields: tuple[str, ...]) -> dict:
        """One page of a List* answer, as AWS pages it: MaxResults (1 to 100, 10 by default) from
        NextToken on, and a NextToken while more remain."""
        size, token = params.get("MaxResults", 10), params.get("NextToken") or "0"
        if size > 100:  # botocore's validator checks only the minimum
            raise AwsError("ValidationException", f"1 validation error detected: Value '{size}' at 'maxResults' "
                                                  "failed to satisfy constraint: Member must have value less than "
                                                  "or equal to 100")
        if not token.isdigit():
            raise AwsError("ValidationException", "Invalid pagination token")
        start = int(token)
        result = {list_field: [{k: r[k] for k in fields if k in r} for r in records[start:start + size]]}
        if start + size < len(records):
            result["NextToken"] = str(start + size)
        return result

    def op_StopTrainingJob(self, params: dict) -> dict:
        name = params["TrainingJobName"]
        with self.lock:
            job = self._get("training-job", name)
            if job["TrainingJobStatus"] in TERMINAL:
                raise AwsError("ValidationException", f"The training job {name} is already {job['TrainingJobStatus']}")
            job.update(TrainingJobStatus="Stopping", SecondaryStatus="Stopping", LastModifiedTime=time.time())
            self._put("training-job", job)
        proc = self.processes.get(name)
        if proc is not None:
            proc.terminate()
        return {}

    # -- models and endpoint configurations (records; endpoints serve them) -------------------------
    def op_CreateModel(self, params: dict) -> dict:
        with self.lock:
            return {"ModelArn": self._create("model", params)["ModelArn"]}

    def op_DescribeModel(self, params: dict) -> dict:
        return self._get("model", params["ModelName"])

    def op_DeleteModel(self, params: dict) -> dict:
        with self.lock:
            return self._delete("model", params["ModelName"])

    def op_ListModels(self, params: dict) -> dict:
        with self.lock:  # a deletion removes folders that listing reads
            models = self._listed(self._all("model"), params, "ModelName")
        return self._page(models, params, "Models", ("ModelName", "ModelArn", "CreationTime"))

    def op_CreateEndpointConfig(self, params: dict) -> dict:
        with self.lock:
            for variant in params["ProductionVariants"]:
                self._get("model", variant["ModelName"])  # AWS refuses a config of a model it does not know
            return {"EndpointConfigArn": self._create("endpoint-config", params)["EndpointConfigArn"]}

    def op_DescribeEndpointConfig(self, params: dict) -> dict:
        return self._get("endpoint-config", params["EndpointConfigName"])

    def op_DeleteEndpointConfig(self, params: dict) -> dict:
        with self.lock:
            return self._delete("endpoint-config", params["EndpointConfigName"])

    def op_ListEndpointConfigs(self, params: dict) -> dict:
        with self.lock:
            configs = self._listed(self._all("endpoint-config"), params, "EndpointConfigName")
        return self._page(configs, params, "EndpointConfigs", ("EndpointConfigName", "EndpointConfigArn",
                                                               "CreationTime"))

    # -- endpoints ----------------------------------------------------------------------------------
    def _deploy_async(self, name: str, config_name: str, updating: bool) -> None:
        threading.Thread(target=self._deploy, args=(name, config_name, updating), daemon=True,
                         name=f"endpoint-{name}").start()

    def _deploy(self, name: str, config_name: str, updating: bool) -> None:
        config = self._get("endpoint-config", config_name)
        variant = config["ProductionVariants"][0]
        try:
            model = self._get("model", variant["ModelName"])
            if self.unhealthy_models and self.unhealthy_models.search(variant["ModelName"]):
                raise WorkerFailed(f"The primary container for production variant {variant['VariantName']} did not "
                                   "pass the ping health check. Please check CloudWatch logs for this endpoint. "
                                   "(stand-in: the model name matches --unhealthy-models)")
            worker = self.endpoints.start(name, config_name, model["PrimaryContainer"]["ModelDataUrl"],
                                          model["ExecutionRoleArn"])
        except (AwsError, WorkerFailed) as exc:
            reason = exc.message if isinstance(exc, AwsError) else str(exc)
            with self.lock:
                endpoint = self._get("endpoint", name)
                # A failed update leaves the old model serving; a failed creation leaves nothing.
                endpoint.update(EndpointStatus="InService" if updating else "Failed",
                                FailureReason=reason[:1024], LastModifiedTime=time.time())
                self._put("endpoint", endpoint)
            return
        self.endpoints.switch(name, worker)
        with self.lock:
            endpoint = self._get("endpoint", name)
            endpoint.pop("FailureReason", None)
            endpoint.update(EndpointStatus="InService", EndpointConfigName=config_name, LastModifiedTime=time.time(),
                            ProductionVariants=[{"VariantName": variant["VariantName"],
                                                 "CurrentInstanceCount": 1, "DesiredInstanceCount": 1}])
            self._put("endpoint", endpoint)

    def op_CreateEndpoint(self, params: dict) -> dict:
        with self.lock:
            self._get("endpoint-config", params["EndpointConfigName"])
            endpoint = self._create("endpoint", {**params, "EndpointStatus": "Creating"})
        self._deploy_async(params["EndpointName"], params["EndpointConfigName"], updating=False)
        return {"EndpointArn": endpoint["EndpointArn"]}

    def op_DescribeEndpoint(self, params: dict) -> dict:
        return self._get("endpoint", params["EndpointName"])

    def op_UpdateEndpoint(self, params: dict) -> dict:
        name = params["EndpointName"]
        with self.lock:
            endpoint = self._get("endpoint", name)
            self._get("endpoint-config", params["EndpointConfigName"])
            if endpoint["EndpointStatus"] != "InService":
                arn = endpoint["EndpointArn"]
                raise AwsError("ValidationException", f'Cannot update in-progress endpoint "{arn}".')
            endpoint.update(EndpointStatus="Updating", LastModifiedTime=time.time())
            self._put("endpoint", endpoint)
        self._deploy_async(name, params["EndpointConfigName"], updating=True)
        return {"EndpointArn": endpoint["EndpointArn"]}

    def op_DeleteEndpoint(self, params: dict) -> dict:
        with self.lock:
            self.endpoints.stop(params["EndpointName"])
            return self._delete("endpoint", params["EndpointName"])

    def op_ListEndpoints(self, params: dict) -> dict:
        with self.lock:
            endpoints = self._listed(self._all("endpoint"), params, "EndpointName", "EndpointStatus")
        return self._page(endpoints, params, "Endpoints", ("EndpointName", "EndpointArn", "CreationTime",
                                                           "LastModifiedTime", "EndpointStatus"))

    def invoke(self, name: str, body: bytes, content_type: str | None, accept: str | None) -> tuple[bytes, str]:
        """SageMaker Runtime InvokeEndpoint: the model server's answer, or its error as ModelError."""
        endpoint = self._get("endpoint", name)
        if endpoint["EndpointStatus"] not in ("InService", "Updating"):
            raise AwsError("ValidationException", f"Endpoint {name} is {endpoint['EndpointStatus']}, not InService.")
        if not self.invoke_limit.take(name):
            raise AwsError("ThrottlingException", "Rate exceeded")
        try:
            status, payload, response_type = self.endpoints.invoke(name, body, content_type, accept)
        except KeyError as exc:
            raise AwsError("ServiceUnavailable", f"Endpoint {name} has no running model", 503) from exc
        except OSError as exc:
            raise AwsError("ModelNotReadyException", f"the model server did not answer: {exc}", 424) from exc
        if status != 200:
            message = payload.decode(errors="replace")
            raise AwsError("ModelError", f"Received {'client' if status < 500 else 'server'} error ({status}) from "
                                         f"primary with message \"{message}\".", 424,
                           extra={"OriginalStatusCode": status, "OriginalMessage": message})
        return payload, response_type

    # -- hyperparameter tuning jobs -------------------------------------------------------------------
    def op_CreateHyperParameterTuningJob(self, params: dict) -> dict:
        config = params["HyperParameterTuningJobConfig"]
        definition = params.get("TrainingJobDefinition")
        if definition is None:
            raise AwsError("ValidationException", "the stand-in needs TrainingJobDefinition (one definition)")
        metric = config.get("HyperParameterTuningJobObjective", {}).get("MetricName")
        names = {d["Name"] for d in definition["AlgorithmSpecification"].get("MetricDefinitions", [])}
        if metric not in names:
            raise AwsError("ValidationException", f"The objective metric {metric} is not among the metric "
                                                  f"definitions of the training job definition ({sorted(names)})")
        with self.lock:
            job = self._create("hyper-parameter-tuning-job", {
                **params, "HyperParameterTuningJobStatus": "InProgress",
                "TrainingJobStatusCounters": {"Completed": 0, "InProgress": 0, "RetryableError": 0,
                                              "NonRetryableError": 0, "Stopped": 0},
                "ObjectiveStatusCounters": {"Succeeded": 0, "Pending": 0, "Failed": 0}})
        threading.Thread(target=self._tune, args=(params["HyperParameterTuningJobName"],), daemon=True).start()
        return {"HyperParameterTuningJobArn": job["HyperParameterTuningJobArn"]}

    def _tune(self, name: str) -> None:
        job = self._get("hyper-parameter-tuning-job", name)
        config, definition = job["HyperParameterTuningJobConfig"], job["TrainingJobDefinition"]
        objective = config["HyperParameterTuningJobObjective"]
        maximize = objective["Type"] == "Maximize"
        limits = config["ResourceLimits"]
        total = limits["MaxNumberOfTrainingJobs"]
        # One core per trial at least: more parallel trials than cores only slows every one of them.
        parallel = max(1, min(limits["MaxParallelTrainingJobs"], os.cpu_count() or 1))
        rng = random.Random(int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2**32)
        trials: list[str] = []
        history: list[tuple[dict, float]] = []
        while True:
            tuning_job = self._get("hyper-parameter-tuning-job", name)
            stopping = tuning_job["HyperParameterTuningJobStatus"] == "Stopping"
            states = {t: self._get("training-job", t) for t in trials}
            running = [t for t, s in states.items() if s["TrainingJobStatus"] not in TERMINAL]
            history = [(s["TunedHyperParameters"], v) for s in states.values()
                       if (v := self._objective(s, objective["MetricName"])) is not None]
            if config.get("TrainingJobEarlyStoppingType") == "Auto" and not stopping:
                completed = [self.series.get(t, {}).get(objective["MetricName"], [])
                             for t, s in states.items() if s["TrainingJobStatus"] == "Completed"]
                for t in running:
                    if tuning.stop_early(self.series.get(t, {}).get(objective["MetricName"], []), completed, maximize):
                        log.info("tuning job %s: stopping %s early (below the median of completed trials)", name, t)
                        self._stop_quietly(t)
            if stopping:
                for t in running:
                    self._stop_quietly(t)
            elif len(running) < parallel and len(trials) < total:
                tuned = tuning.next_configuration(config.get("Strategy", "Bayesian"), config["ParameterRanges"],
                                                  rng, history, maximize)
                trials.append(self._start_trial(tuning_job, definition, len(trials) + 1, tuned))
                continue
            self._record_tuning_progress(name, states, objective, maximize, finished=not running and
                                         (stopping or len(trials) >= total))
            if not running and (stopping or len(trials) >= total):
                return
            time.sleep(0.5)

    def _stop_quietly(self, trial: str) -> None:
        with contextlib.suppress(AwsError):  # it may have ended on its own in the meantime
            self.op_StopTrainingJob({"TrainingJobName": trial})

    def _start_trial(self, tuning_job: dict, definition: dict, number: int, tuned: dict[str, str]) -> str:
        digest = hashlib.sha256(json.dumps(tuned, sort_keys=True).encode()).hexdigest()[:8]
        trial = f"{tuning_job['HyperParameterTuningJobName'][:23]}-{number:03d}-{digest}"
        params = {k: v for k, v in definition.items()
                  if k in ("AlgorithmSpecification", "RoleArn", "InputDataConfig", "OutputDataConfig", "ResourceConfig",
                           "StoppingCondition", "CheckpointConfig", "EnableManagedSpotTraining", "Environment")}
        params["AlgorithmSpecification"] = {k: v for k, v in params["AlgorithmSpecification"].items()
                                            if k in ("TrainingImage", "TrainingInputMode", "MetricDefinitions")}
        params.update(TrainingJobName=trial, HyperParameters={**definition.get("StaticHyperParameters", {}), **tuned})
        self.call("CreateTrainingJob", params)
        with self.lock:
            record = self._get("training-job", trial)
            record.update(TuningJobArn=tuning_job["HyperParameterTuningJobArn"], TunedHyperParameters=tuned)
            self._put("training-job", record)
        return trial

    @staticmethod
    def _objective(job: dict, metric: str) -> float | None:
        if job["TrainingJobStatus"] != "Completed":
            return None
        values = [m["Value"] for m in job.get("FinalMetricDataList", []) if m["MetricName"] == metric]
        return values[-1] if values else None

    def _summary(self, job: dict, objective: dict) -> dict:
        summary = {k: job[k] for k in ("TrainingJobName", "TrainingJobArn", "CreationTime", "TrainingJobStatus",
                                       "TunedHyperParameters", "TrainingStartTime", "TrainingEndTime",
                                       "FailureReason") if k in job}
        value = self._objective(job, objective["MetricName"])
        if value is not None:
            summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
                "Type": objective["Type"], "MetricName": objective["MetricName"], "Value": value}
        summary["ObjectiveStatus"] = ("Succeeded" if value is not None else
                                      "Pending" if job["TrainingJobStatus"] not in TERMINAL else "Failed")
        return summary

    def _record_tuning_progress(self, name: str, states: dict, objective: dict, maximize: bool,
                                finished: bool) -> None:
        summaries = [self._summary(s, objective) for s in states.values()]
        status_counts = {"Completed": 0, "InProgress": 0, "RetryableError": 0, "NonRetryableError": 0, "Stopped": 0}
        objective_counts = {"Succeeded": 0, "Pending": 0, "Failed": 0}
        for s in summaries:
            key = {"Failed": "NonRetryableError", "Stopping": "InProgress"}.get(s["TrainingJobStatus"],
                                                                                 s["TrainingJobStatus"])
            status_counts[key] += 1
            objective_counts[s["ObjectiveStatus"]] += 1
        scored = [s for s in summaries if "FinalHyperParameterTuningJobObjectiveMetric" in s]
        with self.lock:
            job = self._get("hyper-parameter-tuning-job", name)
            job.update(TrainingJobStatusCounters=status_counts, ObjectiveStatusCounters=objective_counts,
                       LastModifiedTime=time.time())
            if scored:
                pick = max if maximize else min
                job["BestTrainingJob"] = pick(scored, key=lambda s: s["FinalHyperParameterTuningJobObjectiveMetric"]
                                              ["Value"])
            if finished:
                job["HyperParameterTuningEndTime"] = time.time()
                if job["HyperParameterTuningJobStatus"] == "Stopping":
                    job["HyperParameterTuningJobStatus"] = "Stopped"
                elif scored:
                    job["HyperParameterTuningJobStatus"] = "Completed"
                else:
                    job.update(HyperParameterTuningJobStatus="Failed",
                               FailureReason="All training jobs failed or reported no objective metric")
            self._put("hyper-parameter-tuning-job", job)

    def op_DescribeHyperParameterTuningJob(self, params: dict) -> dict:
        return self._get("hyper-parameter-tuning-job", params["HyperParameterTuningJobName"])

    def op_ListHyperParameterTuningJobs(self, params: dict) -> dict:
        jobs = self._listed(self._all("hyper-parameter-tuning-job"), params, "HyperParameterTuningJobName",
                            "HyperParameterTuningJobStatus")
        fields = ("HyperParameterTuningJobName", "HyperParameterTuningJobArn", "HyperParameterTuningJobStatus",
                  "CreationTime", "HyperParameterTuningEndTime", "LastModifiedTime", "TrainingJobStatusCounters",
                  "ObjectiveStatusCounters")
        summaries = [{k: j[k] for k in fields if k in j} | {
            "Strategy": j["HyperParameterTuningJobConfig"].get("Strategy", "Bayesian"),
            "ResourceLimits": j["HyperParameterTuningJobConfig"]["ResourceLimits"]} for j in jobs]
        return {"HyperParameterTuningJobSummaries": summaries[: params.get("MaxResults", 100)]}

    def op_ListTrainingJobsForHyperParameterTuningJob(self, params: dict) -> dict:
        job = self._get("hyper-parameter-tuning-job", params["HyperParameterTuningJobName"])
        objective = job["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
        trials = [self._summary(t, objective) for t in self._all("training-job")
                  if t.get("TuningJobArn") == job["HyperParameterTuningJobArn"]]
        if params.get("StatusEquals"):
            trials = [t for t in trials if t["TrainingJobStatus"] == params["StatusEquals"]]
        if params.get("SortBy") == "FinalObjectiveMetricValue":
            trials.sort(key=lambda t: t.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value", -1e30),
                        reverse=params.get("SortOrder", "Descending") == "Descending")
        else:
            trials.sort(key=lambda t: t["CreationTime"], reverse=params.get("SortOrder", "Descending") == "Descending")
        return {"TrainingJobSummaries": trials[: params.get("MaxResults", 100)]}

    def op_StopHyperParameterTuningJob(self, params: dict) -> dict:
        with self.lock:
            job = self._get("hyper-parameter-tuning-job", params["HyperParameterTuningJobName"])
            if job["HyperParameterTuningJobStatus"] in TERMINAL:
                raise AwsError("ValidationException", "The tuning job has already ended")
            job["HyperParameterTuningJobStatus"] = "Stopping"
            self._put("hyper-parameter-tuning-job", job)
        return {}
