"""Lambda's wire format (REST-JSON): `/2015-03-31/functions[/<name>[/code|/configuration|/invocations]]`.

Each request is parsed (a zip's base64 decoded), written to the call log as IAM would authorise it
(before it runs, so that what the function does comes after it in the log), validated against
botocore's service model and handed to the backend; each answer and error goes back as Lambda
sends it."""

from __future__ import annotations

import base64
import json
import logging

import botocore.session
from botocore.validate import ParamValidator

from standin import constraints, sar
from standin.aws_calls import CallLog, caller
from standin.awslambda.exceptions import (
    InvalidParameterValueException,
    LambdaError,
    ServiceException,
    UnknownOperationException,
    ValidationException,
)
from standin.awslambda.models import LambdaBackend
from standin.core import ACCOUNT, Answer, Headers

log = logging.getLogger("standin")
PREFIX = "/2015-03-31/functions"
JSON_TYPE = {"Content-Type": "application/json"}
# (method, names a function, action) -> the operation, whose IAM action is lambda:<operation>.
OPERATIONS = {
    ("POST", False, ""): "CreateFunction",
    ("GET", True, ""): "GetFunction",
    ("GET", True, "configuration"): "GetFunctionConfiguration",
    ("PUT", True, "code"): "UpdateFunctionCode",
    ("PUT", True, "configuration"): "UpdateFunctionConfiguration",
    ("DELETE", True, ""): "DeleteFunction",
    ("POST", True, "invocations"): "InvokeFunction",
}


def authorizations(operation: str, function: str, body: dict, region: str) -> list[tuple]:
    """The IAM actions (and resources) AWS checks for one Lambda API call, as AWS's Service Authorization
    Reference lists them (`standin.sar`): lambda:<operation> on every resource type it marks required
    (the function, named by the path or by CreateFunction's FunctionName), and iam:PassRole for the role
    a request hands the function (CreateFunction, and UpdateFunctionConfiguration that changes it)."""
    action = f"lambda:{operation}"
    resources = sar.request_arns(action, {"FunctionName": function}, region, ACCOUNT)
    found: list[tuple] = [(action, resource) for _, resource in resources]
    if body.get("Role"):
        found.append(("iam:PassRole", body["Role"], {"iam:PassedToService": "lambda.amazonaws.com"}))
    return found


def _json(status: int, payload: dict, headers: dict[str, str] | None = None) -> Answer:
    return status, {**(headers or {}), **JSON_TYPE}, json.dumps(payload).encode()


class LambdaResponse:
    """Requests to the Lambda API in, answers out."""

    def __init__(self, backend: LambdaBackend, calls: CallLog | None = None) -> None:
        self.backend = backend
        self.calls = calls or CallLog(None)
        self.model = botocore.session.get_session().get_service_model("lambda")

    def dispatch(self, method: str, path: str, headers: Headers, raw: bytes) -> Answer:
        """One Lambda API request and its answer."""
        parts = path.split("?")[0][len(PREFIX) :].strip("/").split("/")
        name, action = [*parts, "", ""][:2]
        try:
            body = json.loads(raw) if raw and action != "invocations" else {}
            operation = OPERATIONS.get((method, bool(name), action), "")
            if operation:
                function = name or body.get("FunctionName", "")
                self.calls.record(
                    caller(headers), lambda: authorizations(operation, function, body, self.backend.region), "standin"
                )
            if method == "POST" and not name:
                return _json(201, self._create_function(body))
            if method == "GET" and action in ("", "configuration"):
                result = self.backend.get_function(name)
                return _json(200, result if not action else result["Configuration"])
            if method == "PUT" and action == "code":
                zip_file = base64.b64decode(body["ZipFile"]) if "ZipFile" in body else None
                return _json(200, self.backend.update_code(name, zip_file))
            if method == "PUT" and action == "configuration":
                self._validate("UpdateFunctionConfiguration", {**body, "FunctionName": name})
                return _json(200, self.backend.update_configuration(name, body))
            if method == "DELETE" and not action:
                self.backend.delete_function(name)
                return 204, {}, b""
            if method == "POST" and action == "invocations":
                status, payload, invoked = self.backend.invoke(name, raw, headers.get("X-Amz-Invocation-Type", ""))
                return status, {**JSON_TYPE, **invoked}, payload
            raise UnknownOperationException(f"{method} {path} is not served")
        except LambdaError as exc:
            return _json(exc.status, exc.body(), {"x-amzn-ErrorType": exc.code})
        except Exception as exc:  # never let one request take the server down
            log.exception("lambda %s %s failed", method, path)
            failure = ServiceException(f"{type(exc).__name__}: {exc}")
            return _json(failure.status, failure.body(), {"x-amzn-ErrorType": failure.code})

    def _create_function(self, body: dict) -> dict:
        code = dict(body.get("Code", {}))
        if "ZipFile" in code:
            code["ZipFile"] = base64.b64decode(code["ZipFile"])
        params = {**body, "Code": code}
        self._validate("CreateFunction", params)
        return self.backend.create_function(params)

    def _validate(self, operation: str, params: dict) -> None:
        shape = self.model.operation_model(operation).input_shape
        report = ParamValidator().validate(params, shape)
        if report.has_errors():
            raise InvalidParameterValueException(report.generate_report())
        refusal = constraints.report(params, shape)  # what AWS checks beyond botocore
        if refusal:
            raise ValidationException(refusal)
