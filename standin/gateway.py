"""A local API Gateway (REST API, Lambda proxy integration) in front of the Lambda stand-in.

`POST /count` on the stand-in's port becomes the event API Gateway sends (payload format 1.0),
the function runs through the Lambda stand-in, and its proxy response becomes the HTTP answer,
as on AWS:
- an API key in `x-api-key` is required when one is configured (`--api-key`); without it: 403
  {"message": "Forbidden"};
- binary media types (images) arrive base64-encoded with `isBase64Encoded: true`;
- requests beyond the concurrency limit get 429 {"message": "Too Many Requests"} at once;
- a body over 10 MB gets 413; a function that fails or answers something that is not a proxy
  response gets 502 {"message": "Internal server error"}.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from standin.awslambda.models import LambdaBackend
from standin.core import Answer, AwsError

ROUTE = "/count"
BINARY_MEDIA_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")
MAX_PAYLOAD = 10 * 1024 * 1024  # API Gateway's limit


@dataclass
class Gateway:
    lambdas: LambdaBackend
    function: str = "bin-counter-api"
    api_key: str | None = None
    stage: str = "local"
    max_in_flight: int = 8
    _in_flight: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self._in_flight = threading.BoundedSemaphore(self.max_in_flight)

    def event(self, method: str, path: str, headers: dict[str, str], body: bytes) -> dict:
        url = urlsplit(path)
        content_type = headers.get("Content-Type", headers.get("content-type", "")).split(";")[0].strip().lower()
        binary = content_type in BINARY_MEDIA_TYPES
        query = dict(parse_qsl(url.query)) or None
        request_id = str(uuid.uuid4())
        return {
            "resource": ROUTE, "path": url.path, "httpMethod": method, "headers": dict(headers),
            "multiValueHeaders": {k: [v] for k, v in headers.items()}, "queryStringParameters": query,
            "multiValueQueryStringParameters": {k: [v] for k, v in (query or {}).items()} or None,
            "pathParameters": None, "stageVariables": None,
            "requestContext": {"resourcePath": ROUTE, "httpMethod": method, "path": f"/{self.stage}{url.path}",
                               "stage": self.stage, "requestId": request_id,
                               "identity": {"apiKey": headers.get("x-api-key"), "sourceIp": "127.0.0.1"}},
            "body": base64.b64encode(body).decode() if binary else body.decode("utf-8", errors="replace"),
            "isBase64Encoded": binary,
        }

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        """(status, headers, body) of the HTTP answer."""
        lowered = {k.lower(): v for k, v in headers.items()}
        if self.api_key and lowered.get("x-api-key") != self.api_key:
            return self._message(403, "Forbidden")
        if len(body) > MAX_PAYLOAD:
            return self._message(413, "Request Too Long")
        if not self._in_flight.acquire(blocking=False):
            return self._message(429, "Too Many Requests")
        try:
            event = self.event(method, path, headers, body)
            status, payload, response_headers = self.lambdas.invoke(self.function, json.dumps(event).encode(),
                                                                    "RequestResponse")
        except AwsError:  # no such function, a payload Lambda refuses: API Gateway answers 502
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

    @staticmethod
    def _message(status: int, message: str) -> Answer:
        return status, {"Content-Type": "application/json"}, json.dumps({"message": message}).encode()
