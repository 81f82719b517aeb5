"""The SageMaker backend: the resources the stand-in keeps (training, tuning and transform jobs, models,
endpoint configurations, endpoints), one JSON record each under the state directory, and what happens
to them. A training job runs through `training`, a tuning job chooses and counts its trials through
`tuning`, an endpoint serves through `endpoints`, a transform job runs through `transform`. Requests
and answers are `responses`' business: the operations here take requests in the service model's
terms, which `responses` has checked for those that come from outside (a tuning job's trials are the
backend's own)."""

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
from datetime import UTC, datetime
from pathlib import Path

import boto3
from botocore.config import Config

from standin.aws_calls import role_credentials, service_credentials
from standin.cloudwatch.evaluator import AlarmEvaluator
from standin.cloudwatch.metrics import MetricPublisher
from standin.core import ACCOUNT, AwsError
from standin.roles import RoleCheck
from standin.sagemaker import endpoints, rollout, serverless, training, transform, tuning
from standin.sagemaker.capture import CaptureWriter, check_config
from standin.sagemaker.endpoints import EndpointHost, Fleet, WorkerFailed
from standin.sagemaker.exceptions import (
    ModelError,
    ModelNotReadyException,
    ResourceInUse,
    ResourceNotFound,
    RuntimeValidationError,
    ServiceUnavailable,
    ThrottlingException,
    ValidationException,
)
from standin.sagemaker.training import TERMINAL

log = logging.getLogger("standin")


@dataclass(frozen=True)
class Resource:
    folder: str
    name_field: str
    arn_field: str
    status_field: str | None  # what StatusEquals and SortBy=Status look at
    missing: str  # AWS's message for a name that does not exist
    duplicate_error: type[AwsError]
    duplicate: str  # AWS's message for a name that exists already
    # AWS's code for a name that does not exist: ValidationException but for tuning jobs (exceptions.py)
    missing_error: type[AwsError] = ValidationException


RESOURCES = {
    "training-job": Resource(
        "training-jobs",
        "TrainingJobName",
        "TrainingJobArn",
        "TrainingJobStatus",
        "Requested resource not found: {arn}",
        ResourceInUse,
        "Training job names must be unique within an AWS account and region, and a training job with this name "
        "already exists ({arn})",
    ),
    "hyper-parameter-tuning-job": Resource(
        "tuning-jobs",
        "HyperParameterTuningJobName",
        "HyperParameterTuningJobArn",
        "HyperParameterTuningJobStatus",
        # AWS's own words, as aws/amazon-sagemaker-examples#1540 and #2440 quote them.
        "Amazon SageMaker can't find a tuning job called {name}. Type another name.",
        ResourceInUse,
        "A hyperparameter tuning job with the name, {name}, already exists. Choose a different name.",
        ResourceNotFound,
    ),
    "transform-job": Resource(
        "transform-jobs",
        "TransformJobName",
        "TransformJobArn",
        "TransformJobStatus",
        "Could not find requested job with name {name}",
        ResourceInUse,
        "Transform job names must be unique within an AWS account and region, and a transform job with this name "
        "already exists ({arn})",
    ),
    "model": Resource(
        "models",
        "ModelName",
        "ModelArn",
        None,
        'Could not find model "{arn}".',
        ValidationException,
        'Cannot create already existing model "{arn}".',
    ),
    "endpoint": Resource(
        "endpoints",
        "EndpointName",
        "EndpointArn",
        "EndpointStatus",
        'Could not find endpoint "{arn}".',
        ValidationException,
        'Cannot create already existing endpoint "{arn}".',
    ),
    "endpoint-config": Resource(
        "endpoint-configs",
        "EndpointConfigName",
        "EndpointConfigArn",
        None,
        'Could not find endpoint configuration "{arn}".',
        ValidationException,
        'Cannot create already existing endpoint configuration "{arn}".',
    ),
}


def arn(kind: str, name: str, region: str = "us-east-1") -> str:
    # SageMaker writes names in lowercase in its ARNs, and IAM matches those.
    return f"arn:aws:sagemaker:{region}:{ACCOUNT}:{kind}/{name.lower()}"


class Store:
    """The resources' records: `<state>/<folder>/<name>/resource.json`, written whole each time, so
    that a restart finds every resource as it was."""

    def __init__(self, root: Path, region: str) -> None:
        self.root, self.region = root, region

    def arn(self, kind: str, name: str) -> str:
        return arn(kind, name, self.region)

    def file(self, kind: str, name: str) -> Path:
        return self.root / RESOURCES[kind].folder / name / "resource.json"

    def get(self, kind: str, name: str) -> dict:
        path = self.file(kind, name)
        if not path.is_file():
            spec = RESOURCES[kind]
            raise spec.missing_error(spec.missing.format(arn=self.arn(kind, name), name=name))
        return json.loads(path.read_text())

    def put(self, kind: str, record: dict) -> None:
        path = self.file(kind, record[RESOURCES[kind].name_field])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def all(self, kind: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in (self.root / RESOURCES[kind].folder).glob("*/resource.json")]

    def create(self, kind: str, params: dict) -> dict:
        """Store a new resource with its ARN and creation time; a duplicate name is refused."""
        spec = RESOURCES[kind]
        name = params[spec.name_field]
        if self.file(kind, name).exists():
            raise spec.duplicate_error(spec.duplicate.format(arn=self.arn(kind, name), name=name))
        now = time.time()
        record = {**params, spec.arn_field: self.arn(kind, name), "CreationTime": now, "LastModifiedTime": now}
        self.put(kind, record)
        return record

    def delete(self, kind: str, name: str) -> None:
        self.get(kind, name)
        shutil.rmtree(self.file(kind, name).parent)


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


class SageMakerBackend:
    """What SageMaker does with its resources: training jobs run, tuning jobs run trials, endpoints
    deploy their configuration's model and serve it. One lock orders every change of state."""

    def __init__(
        self,
        state_dir: Path,
        aws_endpoint: str,
        container_python: str,
        region: str = "us-east-1",
        invoke_rate: float = 0.0,
        invoke_burst: int = 1,
        unhealthy_models: str | None = None,
        roles: RoleCheck | None = None,
        serverless_idle_s: float = serverless.IDLE_S,
    ) -> None:
        self.store = Store(Path(state_dir), region)
        self.aws_endpoint, self.python, self.region = aws_endpoint, container_python, region
        self.lock = threading.Lock()
        self.processes: dict[str, training.JobProcess] = {}
        self.series: dict[str, dict[str, list[float]]] = {}  # training job -> metric values so far
        self.transforms: dict[str, transform.TransformRun] = {}  # running transform jobs
        self.closing = False  # shutting down: a job's end is the next start's to record
        self.endpoints = EndpointHost(
            Path(state_dir) / "endpoint-workers", container_python, lambda role_arn: self._client("s3", role_arn)
        )
        self.invoke_limit = TokenBucket(invoke_rate, invoke_burst)
        # SageMaker's metrics and CloudWatch's alarm evaluation are AWS's own work, not the caller's.
        self.metrics = MetricPublisher(lambda: self._service_client("cloudwatch"))
        self.captures = CaptureWriter(self._capture_client)  # endpoints' data capture, in the background
        self.serverless = serverless.ServerlessPool(self._warm, self._scale_to_zero, serverless_idle_s)
        self.bake_poll = 1.0  # how often alarms are evaluated during a baking period
        self.roles = roles or RoleCheck(None)
        # Failure drills: models whose name matches fail their health check, as a broken container would.
        self.unhealthy_models = re.compile(unhealthy_models) if unhealthy_models else None
        self._recover()

    # -- plumbing -------------------------------------------------------------------------------
    def _assume(self, role: str | None) -> None:
        # SageMaker assumes the role at the request and refuses it there, before anything runs.
        if role and self.roles.refusal(role, "sagemaker.amazonaws.com"):
            raise ValidationException(
                f"Could not assume role {role}. Please ensure that the role exists "
                "and allows principal 'sagemaker.amazonaws.com' to assume the role."
            )

    def _client(self, service: str, role_arn: str):
        """A client acting as `role_arn`: SageMaker reads and writes S3 and logs with the job's or
        the model's role, never with the caller's rights."""
        return boto3.client(
            service, endpoint_url=self.aws_endpoint, region_name=self.region, **role_credentials(role_arn)
        )

    def _capture_client(self, role_arn: str):
        # Short timeouts and no retries: an unreachable S3 holds up the capture thread only briefly,
        # and what it could not write is tried again on its next turn.
        quick = Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
        return boto3.client(
            "s3", endpoint_url=self.aws_endpoint, region_name=self.region, config=quick, **role_credentials(role_arn)
        )

    def _service_client(self, service: str):
        return boto3.client(service, endpoint_url=self.aws_endpoint, region_name=self.region, **service_credentials())

    def _recover(self) -> None:
        # A job that was running when the stand-in stopped cannot be resumed: say so, as AWS
        # would for a lost instance.
        for job in self.store.all("training-job"):
            if job["TrainingJobStatus"] not in TERMINAL:
                job.update(
                    TrainingJobStatus="Failed",
                    SecondaryStatus="Failed",
                    FailureReason="InternalServerError: the local stand-in restarted during the job",
                )
                self.store.put("training-job", job)
        for job in self.store.all("hyper-parameter-tuning-job"):
            if job["HyperParameterTuningJobStatus"] not in TERMINAL:
                job.update(
                    HyperParameterTuningJobStatus="Failed",
                    FailureReason="InternalServerError: the local stand-in restarted during the tuning job",
                )
                self.store.put("hyper-parameter-tuning-job", job)
        for job in self.store.all("transform-job"):
            if job["TransformJobStatus"] not in TERMINAL:
                job.update(
                    TransformJobStatus="Failed",
                    TransformEndTime=time.time(),
                    LastModifiedTime=time.time(),
                    FailureReason="InternalServerError: the local stand-in restarted during the transform job",
                )
                self.store.put("transform-job", job)
        # Endpoints come back up with the configuration they were serving.
        for endpoint in self.store.all("endpoint"):
            if endpoint.get("EndpointConfigName"):
                # A blue/green update cut short by the restart is given up: the endpoint serves what it served.
                if endpoint.pop("PendingDeploymentSummary", None) is not None:
                    endpoint["FailureReason"] = "the local stand-in restarted during the deployment"
                endpoint.update(EndpointStatus="Creating")
                self.store.put("endpoint", endpoint)
                self._deploy_async(endpoint["EndpointName"], endpoint["EndpointConfigName"], updating=False)

    def shutdown(self) -> None:
        """No model server or training process outlives the stand-in (their jobs are marked failed at
        the next start)."""
        self.endpoints.stop_all()
        self.metrics.stop()
        self.captures.stop()
        self.serverless.close()
        self.closing = True
        for run in list(self.transforms.values()):
            run.stop()
        for process in list(self.processes.values()):
            process.terminate()

    # -- any resource ---------------------------------------------------------------------------
    def describe(self, kind: str, name: str) -> dict:
        return self.store.get(kind, name)

    def records(self, kind: str) -> list[dict]:
        with self.lock:  # a deletion removes folders that listing reads
            return self.store.all(kind)

    def tags(self, resource_arn: str) -> list[dict]:
        """The tags a resource was created with (AddTags is not served: tags are set at creation)."""
        for kind, spec in RESOURCES.items():
            for record in self.store.all(kind):
                if record.get(spec.arn_field) == resource_arn:
                    return record.get("Tags", [])
        raise ValidationException(f"Resource {resource_arn} not found")

    def delete(self, kind: str, name: str) -> None:
        with self.lock:
            self.store.delete(kind, name)

    # -- training jobs --------------------------------------------------------------------------
    def create_training_job(self, params: dict) -> dict:
        self._assume(params["RoleArn"])
        name = params["TrainingJobName"]
        with self.lock:
            notes = []
            resources = params.get("ResourceConfig", {})
            if resources.get("InstanceType") or resources.get("InstanceCount", 1) != 1:
                notes.append(
                    f"instance {resources.get('InstanceType')} x{resources.get('InstanceCount')} "
                    "not honoured: runs as one local container"
                )
            if params.get("EnableManagedSpotTraining"):
                notes.append("managed spot not honoured locally")
            if params.get("VpcConfig"):
                notes.append("VPC config not honoured locally")
            now = time.time()
            message = "; ".join(["Starting the local container", *notes])
            job = self.store.create(
                "training-job",
                {
                    **params,
                    "TrainingJobStatus": "InProgress",
                    "SecondaryStatus": "Starting",
                    "SecondaryStatusTransitions": [{"Status": "Starting", "StartTime": now, "StatusMessage": message}],
                },
            )
        threading.Thread(target=self._run, args=(name,), daemon=True, name=f"job-{name}").start()
        return job

    def _run(self, name: str) -> None:
        job = self.store.get("training-job", name)
        root = self.store.file("training-job", name).parent / "opt-ml"

        def update(status: str, secondary: str, message: str, **fields) -> None:
            with self.lock:
                current = self.store.get("training-job", name)
                now = time.time()
                if current["TrainingJobStatus"] == "Stopping":
                    if status == "InProgress":
                        return
                    if status == "Completed":
                        # The script finished just as StopTrainingJob came: a stop that SageMaker has
                        # accepted always ends Stopped (with the model artifacts, as a stopped job keeps them).
                        status, secondary, message = "Stopped", "Stopped", "Stopped by StopTrainingJob"
                transitions = current["SecondaryStatusTransitions"]
                if transitions[-1]["Status"] != secondary:
                    transitions[-1]["EndTime"] = now
                    transitions.append({"Status": secondary, "StartTime": now, "StatusMessage": message})
                if status == "InProgress" and "TrainingStartTime" not in current:
                    current["TrainingStartTime"] = now
                if status in TERMINAL:
                    current["TrainingEndTime"] = now
                current.update(TrainingJobStatus=status, SecondaryStatus=secondary, LastModifiedTime=now, **fields)
                self.store.put("training-job", current)

        try:
            role = job["RoleArn"]
            training.run_job(
                job,
                root,
                self._client("s3", role),
                self.python,
                update,
                started_process=lambda proc: self._started(name, proc),
                logs=self._client("logs", role),
                metrics_seen=lambda series: self.series.__setitem__(name, {k: list(v) for k, v in series.items()}),
                region=self.region,
            )
        except Exception as exc:  # S3 unreachable, no credentials...: the job fails, saying why
            reason = f"ClientError: {type(exc).__name__}: {exc}"
            update(status="Failed", secondary="Failed", message=reason, FailureReason=reason[:1024])
        finally:
            self.processes.pop(name, None)

    def _started(self, name: str, proc: training.JobProcess) -> None:
        # A StopTrainingJob that came between "Training" and the process starting found no process to
        # stop: it is stopped here instead of running to completion.
        with self.lock:
            self.processes[name] = proc
            stopping = self.store.get("training-job", name)["TrainingJobStatus"] == "Stopping"
        if stopping:
            proc.terminate()

    def stop_training_job(self, name: str) -> None:
        with self.lock:
            job = self.store.get("training-job", name)
            if job["TrainingJobStatus"] in TERMINAL:
                # AWS's words (awslabs/benchmark-ai#928: "An error occurred (ValidationException) when
                # calling the StopTrainingJob operation: The request was rejected because the training
                # job is in status Stopped.").
                raise ValidationException(
                    f"The request was rejected because the training job is in status {job['TrainingJobStatus']}."
                )
            job.update(TrainingJobStatus="Stopping", SecondaryStatus="Stopping", LastModifiedTime=time.time())
            self.store.put("training-job", job)
        proc = self.processes.get(name)
        if proc is not None:
            proc.terminate()

    # -- models and endpoint configurations (records; endpoints serve them) -------------------------
    def create_model(self, params: dict) -> dict:
        self._assume(params.get("ExecutionRoleArn"))
        with self.lock:
            return self.store.create("model", params)

    def create_endpoint_config(self, params: dict) -> dict:
        check_config(params.get("DataCaptureConfig"))
        with self.lock:
            for variant in params["ProductionVariants"]:
                self.store.get("model", variant["ModelName"])  # AWS refuses a config of a model it does not know
            return self.store.create("endpoint-config", params)

    # -- endpoints ----------------------------------------------------------------------------------
    def create_endpoint(self, params: dict) -> dict:
        with self.lock:
            self.store.get("endpoint-config", params["EndpointConfigName"])
            endpoint = self.store.create("endpoint", {**params, "EndpointStatus": "Creating"})
        self._deploy_async(params["EndpointName"], params["EndpointConfigName"], updating=False)
        return endpoint

    def update_endpoint(self, name: str, config_name: str, deployment_config: dict | None = None) -> dict:
        with self.lock:
            endpoint = self.store.get("endpoint", name)
            config = self.store.get("endpoint-config", config_name)
            if deployment_config:
                rollout.check(deployment_config, config["ProductionVariants"][0].get("InitialInstanceCount", 1))
            # Refused on a Failed endpoint too: "DeleteEndpoint is the only operation that can be
            # performed on a failed endpoint" (botocore's DescribeEndpointOutput.EndpointStatus doc).
            if endpoint["EndpointStatus"] != "InService":
                raise ValidationException(f'Cannot update in-progress endpoint "{endpoint["EndpointArn"]}".')
            endpoint.update(EndpointStatus="Updating", LastModifiedTime=time.time())
            self.store.put("endpoint", endpoint)
        self._deploy_async(name, config_name, updating=True, deployment_config=deployment_config)
        return endpoint

    def delete_endpoint(self, name: str) -> None:
        with self.lock:
            self.serverless.forget(name)
            self.endpoints.stop(name)
            self.store.delete("endpoint", name)

    def _deploy_async(self, name: str, config_name: str, updating: bool, deployment_config: dict | None = None) -> None:
        threading.Thread(
            target=self._deploy,
            args=(name, config_name, updating, deployment_config),
            daemon=True,
            name=f"endpoint-{name}",
        ).start()

    def _instances(self, name: str, variant: dict, environment: dict[str, str]) -> tuple[int, dict[str, str]]:
        """How many model servers stand for the variant's instances here (its InitialInstanceCount, at
        most this machine's cores), and the model container's environment for each: without its own
        SAGEMAKER_MODEL_SERVER_WORKERS, each instance gets its share of the cores (on AWS each instance
        has cores of its own; here they share them, and each worker holds the model in memory)."""
        wanted = variant.get("InitialInstanceCount", 1)
        cores = os.cpu_count() or 1
        count = max(1, min(wanted, cores))
        if count < wanted:
            log.info(
                "endpoint %s: %d instances asked, %d model servers run (this machine's cores)", name, wanted, count
            )
        if count > 1 and "SAGEMAKER_MODEL_SERVER_WORKERS" not in environment:
            environment = {**environment, "SAGEMAKER_MODEL_SERVER_WORKERS": str(max(1, cores // count))}
        return count, environment

    def _deploy(self, name: str, config_name: str, updating: bool, deployment_config: dict | None = None) -> None:
        try:
            if updating and self.serverless.is_serverless(name):
                self._warm(name)  # a serverless endpoint that scaled to zero serves (blue) while green starts
            # AWS lets a configuration (and its model) be deleted while an endpoint deploys it, having read
            # both at the request; the stand-in reads them here, and fails the deployment saying why
            # rather than leave the endpoint Creating for ever.
            config = self.store.get("endpoint-config", config_name)
            variant = config["ProductionVariants"][0]
            model = self.store.get("model", variant["ModelName"])
            if self.unhealthy_models and self.unhealthy_models.search(variant["ModelName"]):
                raise WorkerFailed(
                    f"The primary container for production variant {variant['VariantName']} did not "
                    "pass the ping health check. Please check CloudWatch logs for this endpoint. "
                    "(stand-in: the model name matches --unhealthy-models)"
                )
            count, environment = self._instances(name, variant, model["PrimaryContainer"].get("Environment") or {})
            if updating and deployment_config and "BlueGreenUpdatePolicy" in deployment_config:
                self._set_pending(name, config_name, variant, count, current=0)
            fleet = self.endpoints.start(
                name,
                config_name,
                model["PrimaryContainer"]["ModelDataUrl"],
                model["ExecutionRoleArn"],
                environment,
                count,
            )
            if config.get("DataCaptureConfig"):
                fleet.capture = (config["DataCaptureConfig"], model["ExecutionRoleArn"])
        except (AwsError, WorkerFailed) as exc:
            reason = exc.message if isinstance(exc, AwsError) else str(exc)
            with self.lock:
                endpoint = self.store.get("endpoint", name)
                # A failed update leaves the old model serving; a failed creation leaves nothing.
                endpoint.pop("PendingDeploymentSummary", None)
                endpoint.update(
                    EndpointStatus="InService" if updating else "Failed",
                    FailureReason=reason[:1024],
                    LastModifiedTime=time.time(),
                )
                self.store.put("endpoint", endpoint)
            return
        policy = (deployment_config or {}).get("BlueGreenUpdatePolicy")
        retire_after = 5.0
        if updating and policy and deployment_config:
            alarms = [a["AlarmName"] for a in deployment_config.get("AutoRollbackConfiguration", {}).get("Alarms", [])]
            failure = self._shift(name, fleet, policy, alarms, model["ExecutionRoleArn"], count)
            if failure is not None:
                self._rolled_back(name, failure, deployment_config)
                return
            retire_after = max(retire_after, policy.get("TerminationWaitInSeconds", 0))
        self.endpoints.switch(name, fleet, retire_after)
        with self.lock:
            endpoint = self.store.get("endpoint", name)
            endpoint.pop("FailureReason", None)
            endpoint.pop("PendingDeploymentSummary", None)
            if updating and deployment_config:
                endpoint["LastDeploymentConfig"] = deployment_config
            endpoint.update(
                EndpointStatus="InService",
                EndpointConfigName=config_name,
                LastModifiedTime=time.time(),
                ProductionVariants=[
                    {
                        "VariantName": variant["VariantName"],
                        "CurrentWeight": float(variant.get("InitialVariantWeight", 1.0)),
                        "DesiredWeight": float(variant.get("InitialVariantWeight", 1.0)),
                        "CurrentInstanceCount": count,
                        "DesiredInstanceCount": variant.get("InitialInstanceCount", 1),
                    }
                ],
            )
            self._serving_kind(endpoint, variant)
            self.store.put("endpoint", endpoint)

    # -- sizes: instance counts, serverless ------------------------------------------------------------
    def _serving_kind(self, endpoint: dict, variant: dict) -> None:
        """A serverless variant is summarised by its ServerlessConfig (DescribeEndpoint's
        Current/DesiredServerlessConfig), not instance counts, and its requests are admitted by the pool."""
        config = variant.get("ServerlessConfig")
        if config is None:
            self.serverless.forget(endpoint["EndpointName"])
            return
        summary = endpoint["ProductionVariants"][0]
        for key in ("CurrentInstanceCount", "DesiredInstanceCount"):
            summary.pop(key, None)
        summary.update(CurrentServerlessConfig=dict(config), DesiredServerlessConfig=dict(config))
        self.serverless.serve(endpoint["EndpointName"], config["MaxConcurrency"])

    def _warm(self, name: str) -> None:
        """A serverless endpoint's model server, started if it scaled to zero (the cold start)."""
        if name in self.endpoints.live:
            return
        endpoint = self.store.get("endpoint", name)
        config_name = endpoint["EndpointConfigName"]
        variant = self.store.get("endpoint-config", config_name)["ProductionVariants"][0]
        model = self.store.get("model", variant["ModelName"])
        container = model["PrimaryContainer"]
        log.info("endpoint %s: cold start", name)
        try:
            fleet = self.endpoints.start(
                name, config_name, container["ModelDataUrl"], model["ExecutionRoleArn"], container.get("Environment")
            )
        except WorkerFailed as exc:
            raise ModelNotReadyException(f"the serverless endpoint's model did not start: {exc}") from exc
        self.endpoints.switch(name, fleet, 0.0)

    def _scale_to_zero(self, name: str) -> None:
        try:
            status = self.store.get("endpoint", name)["EndpointStatus"]
        except ValidationException:
            return
        if status == "InService":  # an update in progress keeps what it runs
            log.info("endpoint %s: idle, scaled to zero", name)
            self.endpoints.stop(name)

    def update_weights_and_capacities(self, name: str, desired: list[dict]) -> dict:
        """UpdateEndpointWeightsAndCapacities: the variant's instance count changes (what Application
        Auto Scaling calls); the endpoint is Updating until the model servers are there."""
        with self.lock:
            endpoint = self.store.get("endpoint", name)
            if endpoint["EndpointStatus"] != "InService":
                raise ValidationException(f'Cannot update in-progress endpoint "{endpoint["EndpointArn"]}".')
            summary = endpoint["ProductionVariants"][0]
            [wanted] = desired  # one variant per endpoint here (bin_counter's AllTraffic)
            if wanted["VariantName"] != summary["VariantName"]:
                raise ValidationException(
                    f'The variant(s) "[{wanted["VariantName"]}]" is/are not present in the endpoint "{name}".'
                )
            if "DesiredInstanceCount" in wanted and "CurrentServerlessConfig" in summary:
                raise ValidationException(
                    f"Variant {wanted['VariantName']} of endpoint {name} is serverless: it has no instance count "
                    "(stand-in's wording)"
                )
            count = wanted.get("DesiredInstanceCount", summary.get("DesiredInstanceCount", 1))
            summary["DesiredInstanceCount"] = count
            if "DesiredWeight" in wanted:
                summary["DesiredWeight"] = float(wanted["DesiredWeight"])
            endpoint.update(EndpointStatus="Updating", LastModifiedTime=time.time())
            self.store.put("endpoint", endpoint)
        threading.Thread(target=self._resize, args=(name, count), daemon=True, name=f"resize-{name}").start()
        return endpoint

    def _resize(self, name: str, wanted: int) -> None:
        """As many model servers as `wanted` instances (at most one per core), added beside the running
        ones or retired from them; then InService with the new CurrentInstanceCount."""
        endpoint = self.store.get("endpoint", name)
        variant = self.store.get("endpoint-config", endpoint["EndpointConfigName"])["ProductionVariants"][0]
        model = self.store.get("model", variant["ModelName"])
        container = model["PrimaryContainer"]
        count, environment = self._instances(name, {"InitialInstanceCount": wanted}, container.get("Environment") or {})
        failure = None
        try:
            self.endpoints.resize(
                name,
                count,
                lambda more: self.endpoints.start(
                    name,
                    endpoint["EndpointConfigName"],
                    container["ModelDataUrl"],
                    model["ExecutionRoleArn"],
                    environment,
                    more,
                ),
            )
        except (KeyError, WorkerFailed) as exc:
            failure = f"the instance count did not change: {exc}"
        with self.lock:
            endpoint = self.store.get("endpoint", name)
            summary = endpoint["ProductionVariants"][0]
            running = self.endpoints.live.get(name)
            summary["CurrentInstanceCount"] = len(running.instances) if running else 0
            summary["CurrentWeight"] = summary.get("DesiredWeight", summary.get("CurrentWeight", 1.0))
            endpoint.update(EndpointStatus="InService", LastModifiedTime=time.time())
            if failure:
                endpoint["FailureReason"] = failure
            self.store.put("endpoint", endpoint)

    # -- blue/green updates ---------------------------------------------------------------------------
    def _set_pending(self, name: str, config_name: str, variant: dict, count: int, current: int) -> None:
        """DescribeEndpoint's PendingDeploymentSummary: the new configuration and its fleet so far."""
        with self.lock:
            endpoint = self.store.get("endpoint", name)
            summary = endpoint.get("PendingDeploymentSummary") or {"StartTime": time.time()}
            summary.update(
                EndpointConfigName=config_name,
                ProductionVariants=[
                    {
                        "VariantName": variant["VariantName"],
                        "CurrentInstanceCount": current,
                        "DesiredInstanceCount": variant.get("InitialInstanceCount", 1),
                        "InstanceType": variant.get("InstanceType", "ml.m5.large"),
                    }
                ],
            )
            endpoint["PendingDeploymentSummary"] = summary
            self.store.put("endpoint", endpoint)

    def _shift(self, name: str, fleet: Fleet, policy: dict, alarms: list[str], role: str, count: int) -> str | None:
        """Shift the requests to the green `fleet` step by step, baking each step while the rollback
        alarms are evaluated (CloudWatch's work) and read (SageMaker's, with the endpoint's execution role,
        as the guide asks it to be allowed cloudwatch:DescribeAlarms); the FailureReason if it must roll
        back (an alarm in ALARM, or MaximumExecutionTimeoutInSeconds passed), else None."""
        started = time.monotonic()
        limit = policy.get("MaximumExecutionTimeoutInSeconds")
        evaluator = (
            AlarmEvaluator(self._service_client("cloudwatch"), self._service_client("sns"), self.region)
            if alarms
            else None
        )
        reader = self._client("cloudwatch", role) if alarms else None
        with self.lock:
            variant = self.store.get("endpoint", name).get("PendingDeploymentSummary", {}).get("ProductionVariants")
        # A step turns on whole instances of the fleet the configuration asks for (however many model
        # servers stand for them on this machine).
        desired = (variant or [{}])[0].get("DesiredInstanceCount", count)
        for share, bake in rollout.steps(policy, desired):
            self.endpoints.route(name, fleet, share)
            log.info("endpoint %s: %.0f%% of requests to %s, baking %ds", name, share * 100, fleet.config_name, bake)
            if variant:
                with self.lock:
                    endpoint = self.store.get("endpoint", name)
                    summary = endpoint.get("PendingDeploymentSummary")
                    if summary:
                        summary["ProductionVariants"][0].update(
                            CurrentInstanceCount=count, CurrentWeight=share, DesiredWeight=1.0
                        )
                        self.store.put("endpoint", endpoint)
            end = time.monotonic() + bake
            while True:
                if limit is not None and time.monotonic() - started > limit:
                    return rollout.TIMEOUT_ROLLBACK.format(seconds=limit)
                if evaluator is not None:
                    tripped = self._tripped(evaluator, reader, alarms)
                    if tripped:
                        return rollout.ALARM_ROLLBACK.format(alarms=", ".join(tripped))
                if time.monotonic() >= end:
                    break
                time.sleep(min(self.bake_poll, max(0.0, end - time.monotonic())))
        return None

    def _tripped(self, evaluator: AlarmEvaluator, reader, alarms: list[str]) -> list[str]:
        """The rollback alarms in ALARM now; an evaluation that fails (moto unreachable) trips none."""
        try:
            self.metrics.flush()  # what the bake's requests did, before it is judged
            evaluator.evaluate(alarms)
            described = reader.describe_alarms(AlarmNames=alarms).get("MetricAlarms", [])
        except Exception as exc:
            log.warning("could not evaluate the rollback alarms %s: %s", alarms, exc)
            return []
        return sorted(a["AlarmName"] for a in described if a.get("StateValue") == "ALARM")

    def _rolled_back(self, name: str, reason: str, deployment_config: dict) -> None:
        """All requests back to the blue fleet, the green one retired, the endpoint InService on its
        old configuration with the reason."""
        self.endpoints.abandon(name)
        log.info("endpoint %s: rolled back: %s", name, reason)
        with self.lock:
            endpoint = self.store.get("endpoint", name)
            endpoint.pop("PendingDeploymentSummary", None)
            endpoint.update(
                EndpointStatus="InService",
                FailureReason=reason[:1024],
                LastDeploymentConfig=deployment_config,
                LastModifiedTime=time.time(),
            )
            self.store.put("endpoint", endpoint)

    def invoke(
        self, name: str, body: bytes, content_type: str | None, accept: str | None, inference_id: str | None = None
    ) -> tuple[bytes, str]:
        """SageMaker Runtime InvokeEndpoint: the model server's answer and its content type, or its
        error as ModelError. An answered request is captured as the serving configuration says."""
        # SageMaker Runtime's own error for an endpoint it cannot invoke (its service model's
        # ValidationError, not the SageMaker API's ValidationException), with AWS's message for a missing one.
        try:
            endpoint = self.store.get("endpoint", name)
        except ValidationException as exc:
            raise RuntimeValidationError(f"Endpoint {name} of account {ACCOUNT} not found.") from exc
        if endpoint["EndpointStatus"] not in ("InService", "Updating"):
            raise RuntimeValidationError(f"Endpoint {name} is {endpoint['EndpointStatus']}, not InService.")
        if not self.invoke_limit.take(name):
            raise ThrottlingException("Rate exceeded")
        arrived, arrived_at = time.perf_counter(), datetime.now(UTC)
        try:
            fleet, port = self.endpoints.pick(name)
        except KeyError as exc:
            raise ServiceUnavailable(f"Endpoint {name} has no running model") from exc
        variant = (endpoint.get("ProductionVariants") or [{}])[0].get("VariantName", "AllTraffic")
        sent = time.perf_counter()
        try:
            status, payload, response_type = endpoints.invoke(port, body, content_type, accept)
        except OSError as exc:
            answered = time.perf_counter()
            self.metrics.record(name, variant, None, answered - sent, sent - arrived, len(fleet.instances))
            raise ModelNotReadyException(f"the model server did not answer: {exc}") from exc
        answered = time.perf_counter()
        self.metrics.record(name, variant, status, answered - sent, sent - arrived, len(fleet.instances))
        if status != 200:
            raise ModelError(status, payload.decode(errors="replace"))
        if fleet.capture is not None:
            config, role = fleet.capture
            request, answer = (body, content_type), (payload, response_type)
            self.captures.record(config, role, (name, variant), request, answer, inference_id, arrived_at)
        return payload, response_type

    # -- batch transform jobs -------------------------------------------------------------------------
    def create_transform_job(self, params: dict) -> dict:
        transform.check_request(params)
        model = self.store.get("model", params["ModelName"])  # AWS: 'Could not find model "<arn>".'
        role = model["ExecutionRoleArn"]
        # SageMaker lists the input with the model's role at the request, and refuses an empty prefix there.
        transform.check_input(self._client("s3", role), params["TransformInput"]["DataSource"], role, self.region)
        with self.lock:
            job = self.store.create(
                "transform-job", {**transform.with_defaults(params), "TransformJobStatus": "InProgress"}
            )
        threading.Thread(
            target=self._transform,
            args=(params["TransformJobName"],),
            daemon=True,
            name=f"transform-{params['TransformJobName']}",
        ).start()
        return job

    def _transform(self, name: str) -> None:
        job = self.store.get("transform-job", name)

        def update(status: str, **fields) -> None:
            with self.lock:
                if self.closing:  # its workers were stopped by the shutdown, not by StopTransformJob
                    return
                current = self.store.get("transform-job", name)
                if current["TransformJobStatus"] == "Stopping":
                    # A job that StopTransformJob reached ends Stopped, however its work ended.
                    status = "Stopping" if status == "InProgress" else "Stopped"
                    fields.pop("FailureReason", None)
                now = time.time()
                if status in TERMINAL:
                    current["TransformEndTime"] = now
                current.update(TransformJobStatus=status, LastModifiedTime=now, **fields)
                self.store.put("transform-job", current)

        try:
            model = self.store.get("model", job["ModelName"])
            role = model["ExecutionRoleArn"]
            run = transform.TransformRun(
                job,
                model,
                self.store.file("transform-job", name).parent,
                self._client("s3", role),
                self.python,
                update,
                logs=self._client("logs", role),
                cpu_count=os.cpu_count() or 1,
            )
            with self.lock:
                self.transforms[name] = run
                stopping = self.store.get("transform-job", name)["TransformJobStatus"] == "Stopping"
            if stopping:  # a StopTransformJob that came before the run existed
                run.stop()
            run.run()
        except Exception as exc:  # the model deleted meanwhile, S3 or logs unreachable...: the job fails, saying why
            reason = exc.message if isinstance(exc, AwsError) else f"ClientError: {type(exc).__name__}: {exc}"
            log.exception("transform job %s failed", name)
            update("Failed", FailureReason=reason[:1024])
        finally:
            self.transforms.pop(name, None)

    def stop_transform_job(self, name: str) -> None:
        with self.lock:
            job = self.store.get("transform-job", name)
            if job["TransformJobStatus"] in TERMINAL:
                raise ValidationException(f"The transform job {name} is already {job['TransformJobStatus']}")
            job.update(TransformJobStatus="Stopping", LastModifiedTime=time.time())
            self.store.put("transform-job", job)
            run = self.transforms.get(name)
        if run is not None:
            run.stop()

    # -- hyperparameter tuning jobs -------------------------------------------------------------------
    def create_tuning_job(self, params: dict) -> dict:
        config = params["HyperParameterTuningJobConfig"]
        definition = params.get("TrainingJobDefinition")
        if definition is None:
            raise ValidationException("the stand-in needs TrainingJobDefinition (one definition)")
        self._assume(definition["RoleArn"])
        metric = config.get("HyperParameterTuningJobObjective", {}).get("MetricName")
        names = {d["Name"] for d in definition["AlgorithmSpecification"].get("MetricDefinitions", [])}
        if metric not in names:
            raise ValidationException(
                f"The objective metric {metric} is not among the metric "
                f"definitions of the training job definition ({sorted(names)})"
            )
        with self.lock:
            job = self.store.create(
                "hyper-parameter-tuning-job",
                {
                    **params,
                    "HyperParameterTuningJobStatus": "InProgress",
                    "TrainingJobStatusCounters": {
                        "Completed": 0,
                        "InProgress": 0,
                        "RetryableError": 0,
                        "NonRetryableError": 0,
                        "Stopped": 0,
                    },
                    "ObjectiveStatusCounters": {"Succeeded": 0, "Pending": 0, "Failed": 0},
                },
            )
        threading.Thread(target=self._tune, args=(params["HyperParameterTuningJobName"],), daemon=True).start()
        return job

    def stop_tuning_job(self, name: str) -> None:
        with self.lock:
            job = self.store.get("hyper-parameter-tuning-job", name)
            if job["HyperParameterTuningJobStatus"] in TERMINAL:
                raise ValidationException("The tuning job has already ended")
            job["HyperParameterTuningJobStatus"] = "Stopping"
            self.store.put("hyper-parameter-tuning-job", job)

    def trials(self, tuning_job: dict) -> list[dict]:
        """The tuning job's training jobs, as it summarises them."""
        objective = tuning_job["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
        return [
            tuning.trial_summary(t, objective)
            for t in self.store.all("training-job")
            if t.get("TuningJobArn") == tuning_job["HyperParameterTuningJobArn"]
        ]

    def _tune(self, name: str) -> None:
        job = self.store.get("hyper-parameter-tuning-job", name)
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
            tuning_job = self.store.get("hyper-parameter-tuning-job", name)
            stopping = tuning_job["HyperParameterTuningJobStatus"] == "Stopping"
            states = {t: self.store.get("training-job", t) for t in trials}
            running = [t for t, s in states.items() if s["TrainingJobStatus"] not in TERMINAL]
            history = [
                (s["TunedHyperParameters"], v)
                for s in states.values()
                if (v := tuning.objective_value(s, objective["MetricName"])) is not None
            ]
            if config.get("TrainingJobEarlyStoppingType") == "Auto" and not stopping:
                completed = [
                    self.series.get(t, {}).get(objective["MetricName"], [])
                    for t, s in states.items()
                    if s["TrainingJobStatus"] == "Completed"
                ]
                for t in running:
                    if tuning.stop_early(self.series.get(t, {}).get(objective["MetricName"], []), completed, maximize):
                        log.info("tuning job %s: stopping %s early (below the median of completed trials)", name, t)
                        self._stop_quietly(t)
            if stopping:
                for t in running:
                    self._stop_quietly(t)
            elif len(running) < parallel and len(trials) < total:
                tuned = tuning.next_configuration(
                    config.get("Strategy", "Bayesian"), config["ParameterRanges"], rng, history, maximize
                )
                trials.append(self._start_trial(tuning_job, definition, len(trials) + 1, tuned))
                continue
            self._record_tuning_progress(
                name, states, objective, maximize, finished=not running and (stopping or len(trials) >= total)
            )
            if not running and (stopping or len(trials) >= total):
                return
            time.sleep(0.5)

    def _stop_quietly(self, trial: str) -> None:
        with contextlib.suppress(AwsError):  # it may have ended on its own in the meantime
            self.stop_training_job(trial)

    def _start_trial(self, tuning_job: dict, definition: dict, number: int, tuned: dict[str, str]) -> str:
        params = tuning.trial_request(tuning_job["HyperParameterTuningJobName"], definition, number, tuned)
        trial = params["TrainingJobName"]
        self.create_training_job(params)
        with self.lock:
            record = self.store.get("training-job", trial)
            record.update(TuningJobArn=tuning_job["HyperParameterTuningJobArn"], TunedHyperParameters=tuned)
            self.store.put("training-job", record)
        return trial

    def _record_tuning_progress(self, name: str, states: dict, objective: dict, maximize: bool, finished: bool) -> None:
        summaries = [tuning.trial_summary(s, objective) for s in states.values()]
        status_counts, objective_counts = tuning.counters(summaries)
        best = tuning.best_trial(summaries, maximize)
        with self.lock:
            job = self.store.get("hyper-parameter-tuning-job", name)
            job.update(
                TrainingJobStatusCounters=status_counts,
                ObjectiveStatusCounters=objective_counts,
                LastModifiedTime=time.time(),
            )
            if best is not None:
                job["BestTrainingJob"] = best
            if finished:
                job["HyperParameterTuningEndTime"] = time.time()
                if job["HyperParameterTuningJobStatus"] == "Stopping":
                    job["HyperParameterTuningJobStatus"] = "Stopped"
                elif best is not None:
                    job["HyperParameterTuningJobStatus"] = "Completed"
                else:
                    job.update(
                        HyperParameterTuningJobStatus="Failed",
                        FailureReason="All training jobs failed or reported no objective metric",
                    )
            self.store.put("hyper-parameter-tuning-job", job)
