"""The public counting API: an API Gateway proxy integration in front of the SageMaker endpoint.

Requests (REST API payload 1.0 and HTTP API payload 2.0 alike):
  POST with a binary image/jpeg or image/png body (API Gateway base64-encodes it), or
  POST application/json {"image": "<base64>"} / {"images": ["<base64>", ...]},
  optionally with the count the caller expects: {"expected": 3} (or [3, 1, ...] for a list),
  or ?expected=3 with a binary body.
Answers are JSON. 200: {"count", "probabilities", "confidence", "expected_count", "model_version",
"request_id"} (a list answers {"predictions": [...], ...}); with `expected`, each answer adds
"expected_probability" and a "verdict": match, mismatch or uncertain.
Errors: {"error", "message", "request_id"}: the code, its status and message are
sagemaker_code/api_contract.json's (lambda/README.md tabulates it), the table the model's serving code
uses as well, so a fault has one code whether this function or the model finds it; its limits
(request and image bytes, images per request, pixels) are that file's too. The function checks the
request and each image's size, signature and intact end with api_contract.py (the model's own
checks, shipped from sagemaker_code/ beside the table) before it calls the model; the model's
refusals come back with the model's code, and nothing else the endpoint says (tracebacks, account
ids, ARNs) reaches the client.

Configuration (environment): ENDPOINT_NAME (required), INVOKE_CONNECT_TIMEOUT_S (2),
INVOKE_TIMEOUT_S (8), INVOKE_ATTEMPTS (2), MATCH_THRESHOLD (0.5), MISMATCH_THRESHOLD (0.1),
CORS_ALLOW_ORIGIN (unset: no CORS header), ENDPOINT_KIND (instances; serverless: the table's smaller
request limit for a serverless endpoint, set by bin_count_deploy). lambda/function.json holds the values that
lambda/template.yaml and the retraining DAG give the function on AWS.
Only the standard library and boto3, both in every Lambda Python runtime.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError
from botocore.retries.standard import ExponentialBackoff

from api_contract import ApiError, decode_base64, identify, limits_for, parse_body
from model_answer import model_refusal
from verdicts import verdict

log = logging.getLogger("bin_counter.api")
log.setLevel(logging.INFO)

_runtime = None


def setting(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def invoke_settings() -> tuple[float, float, int]:
    """(connect timeout s, read timeout s, attempts) for InvokeEndpoint."""
    return (setting("INVOKE_CONNECT_TIMEOUT_S", 2), setting("INVOKE_TIMEOUT_S", 8), int(setting("INVOKE_ATTEMPTS", 2)))


def retry_budget_s(connect_s: float, read_s: float, attempts: int) -> float:
    """The longest InvokeEndpoint can take, retries included: every attempt timing out on connect and
    read, and botocore's standard-mode backoff at its longest between them (throttling scale, plus the
    most an x-amz-retry-after header may add). It must fit in the function's timeout, or a slow endpoint
    shows the client Lambda's "Task timed out" and a gateway 5xx instead of our 504."""
    # Older botocores (a Lambda runtime's own) have no retry-after allowance: then it adds nothing.
    retry_after = getattr(ExponentialBackoff, "_RETRY_AFTER_MAX_ADDITIONAL", 0)
    backoff = sum(min(2**i, ExponentialBackoff._MAX_BACKOFF) + retry_after for i in range(attempts - 1))
    return attempts * (connect_s + read_s) + backoff


def runtime_client():
    """One client per container: created on the first request, reused while the container is warm."""
    global _runtime
    if _runtime is None:
        connect_s, read_s, attempts = invoke_settings()
        _runtime = boto3.client(
            "sagemaker-runtime",
            config=Config(
                connect_timeout=connect_s,
                read_timeout=read_s,
                # Standard mode retries throttling and transient errors with backoff, a bounded number of times.
                retries={"mode": "standard", "total_max_attempts": attempts},
            ),
        )
    return _runtime


def headers_of(event: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in (event.get("headers") or {}).items() if v is not None}


def parse_expected(value: Any, n: int) -> list[int] | None:
    if value in (None, ""):
        return None
    values = value if isinstance(value, list) else [value] * n
    try:
        expected = [int(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ApiError("malformed_expected", count=n) from exc
    if len(expected) != n or any(v < 0 for v in expected):
        raise ApiError("malformed_expected", count=n)
    return expected


def parse_request(event: dict) -> tuple[list[bytes], bool, list[int] | None]:
    """(images, single, expected counts) from an API Gateway proxy event."""
    method = event.get("httpMethod") or event.get("requestContext", {}).get("http", {}).get("method", "POST")
    if method.upper() != "POST":
        raise ApiError("method_not_allowed")
    body = event.get("body") or ""
    raw = decode_base64(body, "the body") if event.get("isBase64Encoded") else body.encode()
    # A serverless endpoint takes a smaller body (ENDPOINT_KIND, set by bin_count_deploy): refused here, with our 413.
    limits = limits_for(os.environ.get("ENDPOINT_KIND"))
    images, single, document = parse_body(raw, headers_of(event).get("content-type"), limits)
    query = event.get("queryStringParameters") or {}
    expected = document.get("expected", query.get("expected")) if document is not None else query.get("expected")
    return images, single, parse_expected(expected, len(images))


def first_line(text: str | None, limit: int = 500) -> str:
    return (text or "").split("\n", 1)[0][:limit]


def invoke(images: list[bytes], single: bool, request_id: str | None = None) -> dict:
    """The endpoint's answer; its failures as ApiErrors with the table's code and message. What AWS or
    the model says goes to the function's log only: AWS's messages name the account, the role and the
    endpoint's log group, and a model's error body carries its traceback. `request_id` goes with the
    request as its InferenceId, which SageMaker writes into the endpoint's data capture: the key that
    joins a captured photo to this function's log line (the expected count and the verdict)."""
    endpoint = os.environ.get("ENDPOINT_NAME")
    if not endpoint:
        raise ApiError("not_configured")
    if single:
        # parse_body has checked every image already (a photo the function sends is one it identified).
        image_format = identify(images[0])
        if image_format is None:
            raise ApiError("not_an_image", index=0)
        body, content_type = images[0], image_format["content_type"]
    else:
        body = json.dumps({"images": [base64.b64encode(i).decode() for i in images]}).encode()
        content_type = "application/json"
    try:
        extra = {"InferenceId": request_id} if request_id else {}
        response = runtime_client().invoke_endpoint(
            EndpointName=endpoint, Body=body, ContentType=content_type, Accept="application/json", **extra
        )
        return json.loads(response["Body"].read())
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", ""), error.get("Message", "")
        if code == "ModelError":
            original = int(exc.response.get("OriginalStatusCode") or 0)
            said = first_line(exc.response.get("OriginalMessage"))
            refusal = model_refusal(original, said) if 400 <= original < 500 else ApiError("model_error")
            log.warning(json.dumps({"event": "model_error", "status": original, "said": said, "code": refusal.code}))
            raise refusal from exc
        log.error(json.dumps({"event": "endpoint_error", "code": code, "message": message}))
        if code in ("AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "ExpiredTokenException"):
            raise ApiError("api_misconfigured") from exc
        if code in ("ThrottlingException", "TooManyRequestsException"):
            raise ApiError("throttled") from exc
        # ValidationError: SageMaker Runtime's answer for an endpoint that does not exist or is not in service.
        if code in ("ValidationError", "ServiceUnavailable", "ModelNotReadyException"):
            raise ApiError("endpoint_unavailable") from exc
        raise ApiError("model_error") from exc
    except (ReadTimeoutError, ConnectTimeoutError) as exc:
        raise ApiError("endpoint_timeout") from exc
    except BotoCoreError as exc:
        log.error(json.dumps({"event": "endpoint_unreachable", "message": str(exc)}))
        raise ApiError("endpoint_unreachable") from exc


def respond(status: int, body: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    # With a proxy integration the function, not API Gateway, must send CORS headers on real answers.
    origin = os.environ.get("CORS_ALLOW_ORIGIN")
    if origin:
        headers["Access-Control-Allow-Origin"] = origin
    return {"statusCode": status, "headers": headers, "body": json.dumps(body), "isBase64Encoded": False}


def answer_line(
    request_id: str, status: int, n: int, model_version: str | None, started: float, predictions: list
) -> str:
    """The request's log line (docs/operations.md, "The API's log"): what was answered, per photo the
    count, its confidence, the count the client expected and the verdict (None without one); never
    the photo. bin_counter.capture.read_verdicts reads it back."""
    answers = [
        {k: p.get(k) for k in ("count", "confidence", "expected", "verdict")} for p in predictions if "count" in p
    ]
    return json.dumps(
        {
            "event": "answer",
            "request_id": request_id,
            "status": status,
            "images": n,
            "model_version": model_version,
            "latency_ms": round((time.time() - started) * 1000, 1),
            "answers": answers if status == 200 else [],
        }
    )


def handler(event: dict, context: Any) -> dict:
    started = time.time()
    request_id = getattr(context, "aws_request_id", "local")
    status, model_version, n = 500, None, 0
    predictions: list[dict] = []
    try:
        images, single, expected = parse_request(event)
        n = len(images)
        answer = invoke(images, single, request_id)
        model_version = answer.get("model_version")
        predictions = [answer] if single else answer["predictions"]
        if expected is not None:
            for prediction, count in zip(predictions, expected, strict=True):
                prediction.update(verdict(prediction["probabilities"], count))
        body = (
            {**predictions[0], "model_version": model_version}
            if single
            else {"predictions": predictions, "model_version": model_version}
        )
        status = 200
        return respond(200, {**body, "request_id": request_id})
    except ApiError as exc:
        status = exc.status
        return respond(exc.status, {"error": exc.code, "message": exc.message, "request_id": request_id})
    except Exception:  # never an unhandled error: the client gets a 500 with the request id to quote
        log.exception("request %s failed", request_id)
        error = ApiError("internal_error")
        return respond(error.status, {"error": error.code, "message": error.message, "request_id": request_id})
    finally:
        # One line per request for CloudWatch Logs Insights and the monitor; never the image bytes.
        print(answer_line(request_id, status, n, model_version, started, predictions))
