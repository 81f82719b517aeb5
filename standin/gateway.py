"""A local API Gateway (REST API, Lambda proxy integration) in front of the Lambda stand-in.

`POST /count` on the stand-in's port becomes the event API Gateway sends (payload format 1.0),
the function runs through the Lambda stand-in, and its proxy response becomes the HTTP answer,
as on AWS:
- a body over the REST API's 10 MB is refused first, as API Gateway's front end refuses it: 413,
  "HTTP content length exceeded 10485760 bytes." as text;
- an API key in `x-api-key` is required when one is configured (`--api-key`); without it: 403
  {"message": "Forbidden"};
- binary media types (images) arrive base64-encoded with `isBase64Encoded: true`;
- requests beyond the concurrency limit get 429 {"message": "Too Many Requests"} at once;
- an event Lambda refuses as too large (RequestEntityTooLargeException: a body under 10 MB whose
  event, base64 and all, is over Lambda's 6 MB) gets 413 {"message": "Request Too Long"};
- a function that fails (a response over Lambda's limit included) or answers something that is not a
  proxy response gets 502 {"message": "Internal server error"}; one that has not answered after the
  integration timeout (29 s) gets 504 {"message": "Endpoint request timed out"}.
The limits and where they come from are below and in standin/README.md ("Limits").
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from standin.awslambda.exceptions import RequestEntityTooLargeException
from standin.awslambda.models import LambdaBackend
from standin.cloudwatch.metrics import GATEWAY_NAMESPACE, MetricPublisher, gateway_values
from standin.core import Answer, AwsError

ROUTE = "/count"
BINARY_MEDIA_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")
# API Gateway's REST API quotas (https://docs.aws.amazon.com/apigateway/latest/developerguide/
# api-gateway-execution-service-limits-table.html): "Payload size: 10 MB", not adjustable, which is
# 10 MiB: a larger body gets 413 "HTTP content length exceeded 10485760 bytes." as text, and an event
# over Lambda's limit 413 {"message": "Request Too Long"} (both seen on a REST API with a Lambda proxy
# integration: koki-develop/lgtm-generator#10); the latter is the REQUEST_TOO_LARGE gateway response
# (413), which the template's DEFAULT_4XX gives the CORS header. "Integration timeout: 50 milliseconds
# - 29 seconds" for Lambda proxy integrations too (Regional APIs may ask for more since June 2024),
# after which API Gateway answers 504 itself, the function still running.
MAX_PAYLOAD = 10 * 1024 * 1024
INTEGRATION_TIMEOUT_S = 29.0
# The local API's stage: lambda/template.yaml's StageName as the local stack renders it (its metrics'
# Stage dimension, and so its alarms').
LOCAL_STAGE = "local"


@dataclass
class Gateway:
    lambdas: LambdaBackend
    function: str
    api_key: str | None = None
    stage: str = LOCAL_STAGE
    max_in_flight: int = 8
    integration_timeout_s: float = INTEGRATION_TIMEOUT_S
    # API Gateway's metrics (AWS/ApiGateway, dimensions ApiName and Stage: standin.cloudwatch.metrics);
    # the ApiName is the REST API's Name, which lambda/template.yaml gives as the function's name.
    metrics: MetricPublisher | None = None
    api_name: str | None = None
    _in_flight: threading.BoundedSemaphore = field(init=False)
    _integration: threading.local = field(init=False)

    def __post_init__(self) -> None:
        self._in_flight = threading.BoundedSemaphore(self.max_in_flight)
        self._integration = threading.local()  # this request's IntegrationLatency, set by _invoke

    def event(self, method: str, path: str, headers: dict[str, str], body: bytes) -> dict:
        url = urlsplit(path)
        content_type = headers.get("Content-Type", headers.get("content-type", "")).split(";")[0].strip().lower()
        binary = content_type in BINARY_MEDIA_TYPES
        query = dict(parse_qsl(url.query)) or None
        request_id = str(uuid.uuid4())
        return {
            "resource": ROUTE,
            "path": url.path,
            "httpMethod": method,
            "headers": dict(headers),
            "multiValueHeaders": {k: [v] for k, v in headers.items()},
            "queryStringParameters": query,
            "multiValueQueryStringParameters": {k: [v] for k, v in (query or {}).items()} or None,
            "pathParameters": None,
            "stageVariables": None,
            "requestContext": {
                "resourcePath": ROUTE,
                "httpMethod": method,
                "path": f"/{self.stage}{url.path}",
                "stage": self.stage,
                "requestId": request_id,
                "identity": {"apiKey": headers.get("x-api-key"), "sourceIp": "127.0.0.1"},
            },
            "body": base64.b64encode(body).decode() if binary else body.decode("utf-8", errors="replace"),
            "isBase64Encoded": binary,
        }

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        """(status, headers, body) of the HTTP answer, counted in API Gateway's metrics."""
        started = time.perf_counter()
        self._integration.seconds = None
        answer = self._answer(method, path, headers, body)
        if self.metrics is not None:
            values = gateway_values(answer[0], time.perf_counter() - started, self._integration.seconds)
            dimensions = (("ApiName", self.api_name or self.function), ("Stage", self.stage))
            self.metrics.add(GATEWAY_NAMESPACE, dimensions, values)
        return answer

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if len(body) > MAX_PAYLOAD:
            return (
                413,
                {"Content-Type": "text; charset=utf-8"},
                f"HTTP content length exceeded {MAX_PAYLOAD} bytes.".encode(),
            )
        lowered = {k.lower(): v for k, v in headers.items()}
        if self.api_key and lowered.get("x-api-key") != self.api_key:
            return self._message(403, "Forbidden")
        if not self._in_flight.acquire(blocking=False):
            return self._message(429, "Too Many Requests")
        try:
            event = self.event(method, path, headers, body)
            status, payload, response_headers = self._invoke(json.dumps(event).encode())
        except RequestEntityTooLargeException:  # the event is over Lambda's limit
            return self._message(413, "Request Too Long", {"x-amzn-ErrorType": "BadRequestException"})
        except TimeoutError:
            return self._message(504, "Endpoint request timed out")
        except AwsError:  # no such function: API Gateway answers 502
            return self._message(502, "Internal server error")
        finally:
            self._in_flight.release()
        if status != 200 or "X-Amz-Function-Error" in response_headers:
            return self._message(502, "Internal server error")
        try:
            response = json.loads(payload)
            answer = response.get("body") or ""
            data = base64.b64decode(answer) if response.get("isBase64Encoded") else answer.encode()
            return int(response["statusCode"]), dict(response.get("headers") or {}), data
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._message(502, "Internal server error")

    def _invoke(self, event: bytes) -> tuple[int, bytes, dict]:
        """The function's answer to the event (Lambda's Invoke, RequestResponse), or TimeoutError after
        the integration timeout; the function goes on running then, as on AWS."""
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["answer"] = self.lambdas.invoke(self.function, event, "RequestResponse")
            except Exception as exc:  # handed to the request's thread below
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="gateway-integration", daemon=True)
        relayed = time.perf_counter()
        worker.start()
        worker.join(self.integration_timeout_s)
        self._integration.seconds = time.perf_counter() - relayed
        if worker.is_alive():
            raise TimeoutError
        if "error" in outcome:
            raise outcome["error"]
        return outcome["answer"]

    @staticmethod
    def _message(status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
        body = json.dumps({"message": message}).encode()
        return status, {"Content-Type": "application/json", **(headers or {})}, body
