"""SageMaker's wire format: the SageMaker API (AWS JSON 1.1, `X-Amz-Target: SageMaker.<Operation>`)
and SageMaker Runtime's InvokeEndpoint (REST-JSON, `POST /endpoints/<name>/invocations`).

Each request is parsed, written to the call log as IAM would authorise it (before it runs, so that
what it causes comes after it in the log), validated against botocore's own service model and
handed to the backend; each answer takes the operation's output shape (List* filtered, sorted and
paged as AWS does), each error the shape AWS sends it in."""

from __future__ import annotations

import json
import logging
import uuid

import botocore.session
from botocore.utils import parse_timestamp
from botocore.validate import ParamValidator

from standin import constraints, sar
from standin.aws_calls import CallLog, caller
from standin.core import ACCOUNT, Answer, AwsError, Headers
from standin.sagemaker.exceptions import (
    MAX_INVOKE_BODY_BYTES,
    InternalFailure,
    RuntimeValidationError,
    SerializationException,
    UnknownOperationException,
    ValidationException,
    json_body,
    runtime_body,
)
from standin.sagemaker.forward import REGISTRY_OPERATIONS, MotoForward
from standin.sagemaker.models import RESOURCES, SageMakerBackend

log = logging.getLogger("standin")

# List* filters on a record's times: parameter -> the field it bounds (strictly, as AWS does).
TIME_FILTERS = {
    "CreationTimeBefore": "CreationTime",
    "CreationTimeAfter": "CreationTime",
    "LastModifiedTimeBefore": "LastModifiedTime",
    "LastModifiedTimeAfter": "LastModifiedTime",
}
# The request field that hands SageMaker a role, which AWS checks as iam:PassRole on the caller: for each
# operation whose resource the Service Authorization Reference lists iam:PassRole as a dependent action of
# (tests/airflow_side/test_permissions.py holds the two together for every operation served here).
PASSED_ROLES = {
    "CreateTrainingJob": ("RoleArn",),
    "CreateHyperParameterTuningJob": ("TrainingJobDefinition", "RoleArn"),
    "CreateModel": ("ExecutionRoleArn",),
    "CreateEndpointConfig": ("ExecutionRoleArn",),
}


def authorizations(operation: str, params: dict, region: str = "us-east-1") -> list[tuple]:
    """The IAM actions (and resources) AWS checks for one SageMaker API call, as AWS's Service
    Authorization Reference lists them (`standin.sar`): the operation on every resource type it marks
    required, each ARN built from the request's name fields (CreateEndpoint and UpdateEndpoint: the
    endpoint and the endpoint configuration), "*" for the List calls; sagemaker:AddTags on the resource
    it tags at creation; iam:PassRole for a role it hands over."""
    action = f"sagemaker:{operation}"
    # SageMaker writes names in lowercase in its ARNs, and IAM matches those.
    names = {key: value.lower() for key, value in params.items() if isinstance(value, str)}
    names |= registry_names(names)
    resources = sar.request_arns(action, names, region, ACCOUNT, params.get("ResourceArn"))
    found: list[tuple] = [(action, resource) for _, resource in resources]
    if operation.startswith("Create") and params.get("Tags"):
        tagged = sar.dependent_types(action, "sagemaker:AddTags")
        found += [("sagemaker:AddTags", resource) for kind, resource in resources if kind in tagged]
    role = passed_role(operation, params)
    if role:
        found.append(("iam:PassRole", role, {"iam:PassedToService": "sagemaker.amazonaws.com"}))
    return found


def registry_names(names: dict[str, str]) -> dict[str, str]:
    """The registry's resource names where a request gives an ARN: UpdateModelPackage names its package
    by ModelPackageArn, a versioned package's ModelPackageName is its ARN, and a group may be named by
    ARN. The SAR's ARN formats take the name after the type: `<group>/<version>` for a versioned package."""
    found = {}
    for field in ("ModelPackageArn", "ModelPackageName", "ModelPackageGroupName"):
        value = names.get(field, "")
        if value.startswith("arn:") and value.count(":") >= 5:
            kind, _, name = value.split(":", 5)[5].partition("/")
            if kind in ("model-package", "model-package-group") and name:
                found["ModelPackageName" if kind == "model-package" else "ModelPackageGroupName"] = name
    return found


def passed_role(operation: str, params: dict) -> str | None:
    """The role ARN a request hands to SageMaker, if it hands one."""
    role: object = params
    for field in PASSED_ROLES.get(operation, ()):
        role = role.get(field) if isinstance(role, dict) else None
    return role if isinstance(role, str) else None


def json_answer(status: int, payload: dict, request_id: str) -> Answer:
    """An AWS JSON 1.1 answer: its type, length and request id, in that order."""
    body = json.dumps(payload).encode()
    return (
        status,
        {
            "Content-Type": "application/x-amz-json-1.1",
            "Content-Length": str(len(body)),
            "x-amzn-RequestId": request_id,
        },
        body,
    )


def _epoch(value: float | str) -> float:
    # boto3 sends timestamps as epoch seconds; other clients may send ISO 8601 strings.
    return float(value) if isinstance(value, int | float) else parse_timestamp(value).timestamp()


def _listed(records: list[dict], params: dict, kind: str) -> list[dict]:
    """The NameContains / StatusEquals / *TimeBefore / *TimeAfter / SortBy / SortOrder part that every
    List* call shares."""
    name_field, status_field = RESOURCES[kind].name_field, RESOURCES[kind].status_field
    if params.get("NameContains"):
        records = [r for r in records if params["NameContains"] in r[name_field]]
    if params.get("StatusEquals"):
        records = [r for r in records if r[status_field] == params["StatusEquals"]]
    for bound, field in TIME_FILTERS.items():
        if params.get(bound) is not None:
            limit, before = _epoch(params[bound]), bound.endswith("Before")
            records = [r for r in records if (r[field] < limit if before else r[field] > limit)]
    key = {"Name": name_field, "Status": status_field}.get(params.get("SortBy", ""), "CreationTime")
    return sorted(records, key=lambda r: r[key], reverse=params.get("SortOrder", "Descending") == "Descending")


def _page(records: list[dict], params: dict, list_field: str, fields: tuple[str, ...]) -> dict:
    """One page of a List* answer, as AWS pages it: MaxResults (1 to 100, 10 by default) from
    NextToken on, and a NextToken while more remain."""
    size, token = params.get("MaxResults", 10), params.get("NextToken") or "0"
    if not token.isdigit():
        raise ValidationException("Invalid pagination token")
    start = int(token)
    result: dict = {list_field: [{k: r[k] for k in fields if k in r} for r in records[start : start + size]]}
    if start + size < len(records):
        result["NextToken"] = str(start + size)
    return result


class SageMakerResponse:
    """Requests to the SageMaker API and SageMaker Runtime in, answers out; one `op_<Operation>` per
    operation served."""

    def __init__(self, backend: SageMakerBackend, calls: CallLog | None = None) -> None:
        self.backend = backend
        self.calls = calls or CallLog(None)
        self.model = botocore.session.get_session().get_service_model("sagemaker")
        self.registry = MotoForward(backend.aws_endpoint)

    def dispatch(self, headers: Headers, raw: bytes) -> Answer:
        """One SageMaker API request (AWS JSON 1.1) and its answer."""
        request_id = headers.get("amz-sdk-invocation-id", "local")
        service, _, operation = headers.get("X-Amz-Target", "").partition(".")
        try:
            if service != "SageMaker":
                raise UnknownOperationException(f"unknown target {service}.{operation}")
            try:
                params = json.loads(raw or b"{}")
            except json.JSONDecodeError as exc:
                raise SerializationException(f"request body is not JSON: {exc}") from exc
            self.calls.record(
                caller(headers), lambda: authorizations(operation, params, self.backend.region), "standin"
            )
            if operation in REGISTRY_OPERATIONS:  # the Model Registry is moto's: standin/sagemaker/forward.py
                self.validate(operation, params)
                return self.registry(headers, raw)
            result = self.call(operation, params)
            log.info("%s %s -> 200", operation, params.get("TrainingJobName", ""))
            return json_answer(200, result, request_id)
        except AwsError as exc:
            log.info("%s -> %s %s", operation, exc.status, exc.code)
            return json_answer(exc.status, json_body(exc), request_id)
        except Exception as exc:  # never let one request take the server down
            log.exception("%s failed", operation)
            failure = InternalFailure(f"{type(exc).__name__}: {exc}")
            return json_answer(failure.status, json_body(failure), request_id)

    def call(self, operation: str, params: dict) -> dict:
        """The answer to a valid request of a served operation."""
        self.validate(operation, params)
        handler = getattr(self, "op_" + operation, None)
        if handler is None:
            raise UnknownOperationException(
                f"{operation} is valid SageMaker but not served by the local stand-in (see standin/README.md)"
            )
        return handler(params)

    def validate(self, operation: str, params: dict) -> None:
        """Refuses a request of an unknown operation, or one AWS would refuse as invalid: botocore's
        model, and the constraints AWS checks beyond it."""
        try:
            op_model = self.model.operation_model(operation)
        except Exception as exc:
            raise UnknownOperationException(f"Operation {operation} is not supported") from exc
        report = ParamValidator().validate(params, op_model.input_shape)
        if report.has_errors():
            raise ValidationException(report.generate_report())
        refusal = constraints.report(params, op_model.input_shape)  # what AWS checks beyond botocore
        if refusal:
            raise ValidationException(refusal)

    def invoke_endpoint(self, path: str, headers: Headers, body: bytes) -> Answer:
        """SageMaker Runtime's InvokeEndpoint (REST-JSON): the model's answer as it came, or the error.
        A body above the service's limit is refused here, before the endpoint is looked up: no model
        worker sees it, and it is no call of the endpoint's to authorise."""
        name = path.split("/")[2]
        request_id = str(uuid.uuid4())
        try:
            if len(body) > MAX_INVOKE_BODY_BYTES:
                raise RuntimeValidationError.oversize_body(request_id)
            self.calls.record(
                caller(headers),
                lambda: authorizations("InvokeEndpoint", {"EndpointName": name}, self.backend.region),
                "standin",
            )
            # A serverless endpoint's smaller body limit, MaxConcurrency and cold start (standin.sagemaker.serverless).
            with self.backend.serverless.admitted(name, request_id, len(body)):
                payload, content_type = self.backend.invoke(
                    name,
                    body,
                    headers.get("Content-Type"),
                    headers.get("Accept"),
                    headers.get("X-Amzn-SageMaker-Inference-Id"),  # InferenceId (botocore's sagemaker-runtime model)
                )
        except AwsError as exc:
            return (
                exc.status,
                {"x-amzn-ErrorType": exc.code, "Content-Type": "application/json", "x-amzn-RequestId": request_id},
                json.dumps(runtime_body(exc)).encode(),
            )
        return (
            200,
            {
                "Content-Type": content_type,
                "x-Amzn-Invoked-Production-Variant": "AllTraffic",
                "x-amzn-RequestId": request_id,
            },
            payload,
        )

    # -- any resource ---------------------------------------------------------------------------
    def op_ListTags(self, params: dict) -> dict:
        return {"Tags": self.backend.tags(params["ResourceArn"])}

    # -- training jobs --------------------------------------------------------------------------
    def op_CreateTrainingJob(self, params: dict) -> dict:
        return {"TrainingJobArn": self.backend.create_training_job(params)["TrainingJobArn"]}

    def op_DescribeTrainingJob(self, params: dict) -> dict:
        return self.backend.describe("training-job", params["TrainingJobName"])

    def op_ListTrainingJobs(self, params: dict) -> dict:
        # Its own paging, not _page's: 100 by default, MaxResults and NextToken taken as they come.
        jobs = _listed(self.backend.records("training-job"), params, "training-job")
        start = int(params.get("NextToken") or 0)
        size = params.get("MaxResults", 100)
        page = jobs[start : start + size]
        summaries = [
            {
                k: j[k]
                for k in ("TrainingJobName", "TrainingJobArn", "CreationTime", "TrainingJobStatus", "LastModifiedTime")
                if k in j
            }
            for j in page
        ]
        result: dict = {"TrainingJobSummaries": summaries}
        if start + size < len(jobs):
            result["NextToken"] = str(start + size)
        return result

    def op_StopTrainingJob(self, params: dict) -> dict:
        self.backend.stop_training_job(params["TrainingJobName"])
        return {}

    # -- models and endpoint configurations ---------------------------------------------------------
    def op_CreateModel(self, params: dict) -> dict:
        return {"ModelArn": self.backend.create_model(params)["ModelArn"]}

    def op_DescribeModel(self, params: dict) -> dict:
        return self.backend.describe("model", params["ModelName"])

    def op_DeleteModel(self, params: dict) -> dict:
        self.backend.delete("model", params["ModelName"])
        return {}

    def op_ListModels(self, params: dict) -> dict:
        models = _listed(self.backend.records("model"), params, "model")
        return _page(models, params, "Models", ("ModelName", "ModelArn", "CreationTime"))

    def op_CreateEndpointConfig(self, params: dict) -> dict:
        return {"EndpointConfigArn": self.backend.create_endpoint_config(params)["EndpointConfigArn"]}

    def op_DescribeEndpointConfig(self, params: dict) -> dict:
        return self.backend.describe("endpoint-config", params["EndpointConfigName"])

    def op_DeleteEndpointConfig(self, params: dict) -> dict:
        self.backend.delete("endpoint-config", params["EndpointConfigName"])
        return {}

    def op_ListEndpointConfigs(self, params: dict) -> dict:
        configs = _listed(self.backend.records("endpoint-config"), params, "endpoint-config")
        return _page(configs, params, "EndpointConfigs", ("EndpointConfigName", "EndpointConfigArn", "CreationTime"))

    # -- endpoints ----------------------------------------------------------------------------------
    def op_CreateEndpoint(self, params: dict) -> dict:
        return {"EndpointArn": self.backend.create_endpoint(params)["EndpointArn"]}

    def op_DescribeEndpoint(self, params: dict) -> dict:
        return self.backend.describe("endpoint", params["EndpointName"])

    def op_UpdateEndpoint(self, params: dict) -> dict:
        endpoint = self.backend.update_endpoint(
            params["EndpointName"], params["EndpointConfigName"], params.get("DeploymentConfig")
        )
        return {"EndpointArn": endpoint["EndpointArn"]}

    def op_UpdateEndpointWeightsAndCapacities(self, params: dict) -> dict:
        endpoint = self.backend.update_weights_and_capacities(
            params["EndpointName"], params["DesiredWeightsAndCapacities"]
        )
        return {"EndpointArn": endpoint["EndpointArn"]}

    def op_DeleteEndpoint(self, params: dict) -> dict:
        self.backend.delete_endpoint(params["EndpointName"])
        return {}

    def op_ListEndpoints(self, params: dict) -> dict:
        endpoints = _listed(self.backend.records("endpoint"), params, "endpoint")
        return _page(
            endpoints,
            params,
            "Endpoints",
            ("EndpointName", "EndpointArn", "CreationTime", "LastModifiedTime", "EndpointStatus"),
        )

    # -- batch transform jobs -------------------------------------------------------------------------
    def op_CreateTransformJob(self, params: dict) -> dict:
        return {"TransformJobArn": self.backend.create_transform_job(params)["TransformJobArn"]}

    def op_DescribeTransformJob(self, params: dict) -> dict:
        return self.backend.describe("transform-job", params["TransformJobName"])

    def op_StopTransformJob(self, params: dict) -> dict:
        self.backend.stop_transform_job(params["TransformJobName"])
        return {}

    def op_ListTransformJobs(self, params: dict) -> dict:
        jobs = _listed(self.backend.records("transform-job"), params, "transform-job")
        return _page(
            jobs,
            params,
            "TransformJobSummaries",
            (
                "TransformJobName",
                "TransformJobArn",
                "CreationTime",
                "TransformEndTime",
                "LastModifiedTime",
                "TransformJobStatus",
                "FailureReason",
            ),
        )

    # -- hyperparameter tuning jobs -------------------------------------------------------------------
    def op_CreateHyperParameterTuningJob(self, params: dict) -> dict:
        job = self.backend.create_tuning_job(params)
        return {"HyperParameterTuningJobArn": job["HyperParameterTuningJobArn"]}

    def op_DescribeHyperParameterTuningJob(self, params: dict) -> dict:
        return self.backend.describe("hyper-parameter-tuning-job", params["HyperParameterTuningJobName"])

    def op_ListHyperParameterTuningJobs(self, params: dict) -> dict:
        jobs = _listed(self.backend.records("hyper-parameter-tuning-job"), params, "hyper-parameter-tuning-job")
        fields = (
            "HyperParameterTuningJobName",
            "HyperParameterTuningJobArn",
            "HyperParameterTuningJobStatus",
            "CreationTime",
            "HyperParameterTuningEndTime",
            "LastModifiedTime",
            "TrainingJobStatusCounters",
            "ObjectiveStatusCounters",
        )
        summaries = [
            {k: j[k] for k in fields if k in j}
            | {
                "Strategy": j["HyperParameterTuningJobConfig"].get("Strategy", "Bayesian"),
                "ResourceLimits": j["HyperParameterTuningJobConfig"]["ResourceLimits"],
            }
            for j in jobs
        ]
        return {"HyperParameterTuningJobSummaries": summaries[: params.get("MaxResults", 100)]}

    def op_ListTrainingJobsForHyperParameterTuningJob(self, params: dict) -> dict:
        job = self.backend.describe("hyper-parameter-tuning-job", params["HyperParameterTuningJobName"])
        trials = self.backend.trials(job)
        if params.get("StatusEquals"):
            trials = [t for t in trials if t["TrainingJobStatus"] == params["StatusEquals"]]
        descending = params.get("SortOrder", "Descending") == "Descending"
        if params.get("SortBy") == "FinalObjectiveMetricValue":
            trials.sort(
                key=lambda t: t.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value", -1e30),
                reverse=descending,
            )
        else:
            trials.sort(key=lambda t: t["CreationTime"], reverse=descending)
        return {"TrainingJobSummaries": trials[: params.get("MaxResults", 100)]}

    def op_StopHyperParameterTuningJob(self, params: dict) -> dict:
        self.backend.stop_tuning_job(params["HyperParameterTuningJobName"])
        return {}
