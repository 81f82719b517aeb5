"""The public counting API: an API Gateway proxy integration in front of the SageMaker endpoint.

Requests (REST API payload 1.0 and HTTP API payload 2.0 alike):
  POST with a binary image/jpeg or image/png body (API Gateway base64-encodes it), or
  POST application/json {"image": "<base64>"} / {"images": ["<base64>", ...]},
  optionally with the count the caller expects: {"expected": 3} (or [3, 1, ...] for a list),
  or ?expected=3 with a binary body.
Answers are JSON. 200: {"count", "probabilities", "confidence", "expected_count", "model_version",
"request_id"} (a list answers {"predictions": [...], ...}); with `expected`, each answer adds
"expected_probability" and a "verdict": match, mismatch or uncertain.
Errors: {"error", "message", "request_id"} with 400 malformed, 413 too large, 415 unsupported type,
429 throttled, 502 the model failed, 503 the endpoint is not in service, 504 it timed out.

Configuration (environment): ENDPOINT_NAME (required), MAX_IMAGE_BYTES (4 MiB), MAX_IMAGES (8),
INVOKE_CONNECT_TIMEOUT_S (2), INVOKE_TIMEOUT_S (8), INVOKE_ATTEMPTS (2), MATCH_THRESHOLD (0.5),
MISMATCH_THRESHOLD (0.1), CORS_ALLOW_ORIGIN (unset: no CORS header). lambda/function.json holds the
values that lambda/template.yaml and the retraining DAG give the function on AWS.
Only the standard library and boto3, both in every Lambda Python runtime.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError
from botocore.retries.standard import ExponentialBackoff

from verdicts import verdict

log = logging.getLogger("bin_counter.api")
log.setLevel(logging.INFO)

SIGNATURES = {"image/jpeg": (b"\xff\xd8\xff",), "image/png": (b"\x89PNG\r\n\x1a\n",)}
_runtime = None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def setting(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def invoke_settings() -> tuple[float, float, int]:
    """(connect timeout s, read timeout s, attempts) for InvokeEndpoint."""
    return (setting("INVOKE_CONNECT_TIMEOUT_S", 2), setting("INVOKE_TIMEOUT_S", 8),
            int(setting("INVOKE_ATTEMPTS", 2)))


def retry_budget_s(connect_s: float, read_s: float, attempts: int) -> float:
    """The longest InvokeEndpoint can take, retries included: every attempt timing out on connect and
    read, and botocore's standard-mode backoff at its longest between them (throttling scale, plus the
    most an x-amz-retry-after header may add). It must fit in the function's timeout, or a slow endpoint
    shows the client Lambda's "Task timed out" and a gateway 5xx instead of our 504."""
    # Older botocores (a Lambda runtime's own) have no retry-after allowance: then it adds nothing.
    retry_after = getattr(ExponentialBackoff, "_RETRY_AFTER_MAX_ADDITIONAL", 0)
    backoff = sum(min(2 ** i, ExponentialBackoff._MAX_BACKOFF) + retry_after for i in range(attempts - 1))
    return attempts * (connect_s + read_s) + backoff


def runtime_client():
    """One client per container: created on the first request, reused while the container is warm."""
    global _runtime
    if _runtime is None:
        connect_s, read_s, attempts = invoke_settings()
        _runtime = boto3.client("sagemaker-runtime", config=Config(
            connect_timeout=connect_s, read_timeout=read_s,
            # Standard mode retries throttling and transient errors with backoff, a bounded number of times.
            retries={"mode": "standard", "total_max_attempts": attempts}))
    return _runtime


def headers_of(event: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in (event.get("headers") or {}).items() if v is not None}


def sniff(data: bytes) -> str | None:
    for content_type, signatures in SIGNATURES.items():
        if data.startswith(signatures):
            return content_type
    return None


def check_image(data: bytes, index: int, max_bytes: int) -> str:
    """The image's content type, after checks that need no image library: size, signature, and an
    intact end (a truncated upload loses its JPEG end marker or PNG end chunk)."""
    if not data:
        raise ApiError(400, "empty_image", f"image {index} is empty")
    if len(data) > max_bytes:
        raise ApiError(413, "too_large", f"image {index} is {len(data)} bytes; the limit is {max_bytes}")
    content_type = sniff(data)
    if content_type is None:
        raise ApiError(415, "unsupported_image", f"image {index} is neither JPEG nor PNG")
    intact = (data.rstrip(b"\x00").endswith(b"\xff\xd9") if content_type == "image/jpeg"
              else b"IEND" in data[-16:])
    if not intact:
        raise ApiError(400, "truncated_image", f"image {index} is cut short (no {content_type} end marker)")
    return content_type


def decode_base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, "malformed_request", f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "malformed_base64", f"{what} is not valid base64: {exc}") from exc


def parse_expected(value: Any, n: int) -> list[int] | None:
    if value in (None, ""):
        return None
    values = value if isinstance(value, list) else [value] * n
    try:
        expected = [int(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "malformed_expected", "expected must be a whole number (or one per image)") from exc
    if len(expected) != n or any(v < 0 for v in expected):
        raise ApiError(400, "malformed_expected", f"expected: give one count of at least 0 per image ({n})")
    return expected


def parse_request(event: dict) -> tuple[list[bytes], bool, list[int] | None]:
    """(images, single, expected counts) from an API Gateway proxy event."""
    method = event.get("httpMethod") or event.get("requestContext", {}).get("http", {}).get("method", "POST")
    if method.upper() != "POST":
        raise ApiError(405, "method_not_allowed", "send the image with POST")
    max_bytes = int(setting("MAX_IMAGE_BYTES", 4 * 1024 * 1024))
    max_images = int(setting("MAX_IMAGES", 8))
    body = event.get("body") or ""
    raw = decode_base64(body, "the body") if event.get("isBase64Encoded") else body.encode()
    if not raw:
        raise ApiError(400, "empty_body", "the request has no body: send an image or JSON with one")
    content_type = headers_of(event).get("content-type", "").split(";")[0].strip().lower()
    query = event.get("queryStringParameters") or {}
    if content_type in SIGNATURES or content_type == "application/x-image":
        images, single, expected = [raw], True, query.get("expected")
    elif content_type == "application/json":
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from exc
        if not isinstance(document, dict) or ("image" in document) == ("images" in document):
            raise ApiError(400, "malformed_request", 'send {"image": "<base64>"} or {"images": ["<base64>", ...]}')
        single = "image" in document
        encoded = [document["image"]] if single else document["images"]
        if not isinstance(encoded, list) or not encoded:
            raise ApiError(400, "malformed_request", '"images" must be a non-empty list')
        if len(encoded) > max_images:
            raise ApiError(413, "too_many_images", f"{len(encoded)} images; at most {max_images} per request")
        images = [decode_base64(text, f"image {i}") for i, text in enumerate(encoded)]
        expected = document.get("expected", query.get("expected"))
    else:
        raise ApiError(415, "unsupported_content_type",
                       f"content type {content_type or '(none)'!r}: send image/jpeg, image/png or application/json")
    for index, data in enumerate(images):
        check_image(data, index, max_bytes)
    return images, single, parse_expected(expected, len(images))


def invoke(images: list[bytes], single: bool) -> dict:
    """The endpoint's answer; its failures as ApiErrors with the status the client should see."""
    endpoint = os.environ.get("ENDPOINT_NAME")
    if not endpoint:
        raise ApiError(503, "not_configured", "the function has no ENDPOINT_NAME")
    if single:
        body, content_type = images[0], sniff(images[0])
    else:
        body = json.dumps({"images": [base64.b64encode(i).decode() for i in images]}).encode()
        content_type = "application/json"
    try:
        response = runtime_client().invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=content_type,
                                                    Accept="application/json")
        return json.loads(response["Body"].read())
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", ""), error.get("Message", "")
        original = exc.response.get("OriginalStatusCode")
        if code == "ModelError" and original and 400 <= int(original) < 500:
            try:
                detail = json.loads(exc.response.get("OriginalMessage") or "{}")
            except json.JSONDecodeError:
                detail = {}
            raise ApiError(int(original), detail.get("error", "rejected_by_model"),
                           detail.get("message", message)) from exc
        if code in ("AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "ExpiredTokenException"):
            # AWS's message names the role and the account: for the function's log, not for clients.
            log.error(json.dumps({"event": "endpoint_forbidden", "code": code, "message": message}))
            raise ApiError(502, "api_misconfigured", "the API may not call its model; this is a fault of the "
                                                     "service, not of the request") from exc
        if code in ("ThrottlingException", "TooManyRequestsException"):
            raise ApiError(429, "throttled", "too many requests; retry with backoff") from exc
        if code == "ValidationException" or code in ("ServiceUnavailable", "ModelNotReadyException"):
            raise ApiError(503, "endpoint_unavailable", f"the model is not in service: {message}") from exc
        raise ApiError(502, "model_error", f"the model failed: {message}") from exc
    except (ReadTimeoutError, ConnectTimeoutError) as exc:
        raise ApiError(504, "endpoint_timeout", "the model did not answer in time") from exc
    except BotoCoreError as exc:
        raise ApiError(502, "endpoint_unreachable", f"the model could not be reached: {exc}") from exc


def respond(status: int, body: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    # With a proxy integration the function, not API Gateway, must send CORS headers on real answers.
    origin = os.environ.get("CORS_ALLOW_ORIGIN")
    if origin:
        headers["Access-Control-Allow-Origin"] = origin
    return {"statusCode": status, "headers": headers, "body": json.dumps(body), "isBase64Encoded": False}


def handler(event: dict, context: Any) -> dict:
    started = time.time()
    request_id = getattr(context, "aws_request_id", "local")
    status, model_version, n = 500, None, 0
    try:
        images, single, expected = parse_request(event)
        n = len(images)
        answer = invoke(images, single)
        model_version = answer.get("model_version")
        predictions = [answer] if single else answer["predictions"]
        if expected is not None:
            for prediction, count in zip(predictions, expected, strict=True):
                prediction.update(verdict(prediction["probabilities"], count))
        body = ({**predictions[0], "model_version": model_version} if single
                else {"predictions": predictions, "model_version": model_version})
        status = 200
        return respond(200, {**body, "request_id": request_id})
    except ApiError as exc:
        status = exc.status
        return respond(exc.status, {"error": exc.code, "message": exc.message, "request_id": request_id})
    except Exception:  # never an unhandled error: the client gets a 500 with the request id to quote
        log.exception("request %s failed", request_id)
        return respond(500, {"error": "internal_error", "message": "unexpected error", "request_id": request_id})
    finally:
        # One line per request for CloudWatch Logs Insights; never the image bytes.
        print(json.dumps({"request_id": request_id, "status": status, "images": n, "model_version": model_version,
                          "latency_ms": round((time.time() - started) * 1000, 1)}))
