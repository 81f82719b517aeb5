"""HTTP front of the stand-in: SageMaker (AWS JSON 1.1), SageMaker Runtime and Lambda (REST-JSON).

  .venv/bin/python -m standin.server --aws-endpoint http://127.0.0.1:5000 \
      --container-python .venv-container/bin/python [--port 5055] [--state-dir build/standin]

boto3 reaches it with `endpoint_url` (or `AWS_ENDPOINT_URL_SAGEMAKER`); `GET /health` answers 200.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from standin.aws_calls import CallLog, caller
from standin.gateway import ROUTE as GATEWAY_ROUTE
from standin.gateway import Gateway
from standin.lambda_api import LambdaApi
from standin.roles import RoleCheck
from standin.sagemaker_api import AwsError, SageMakerApi, arn, authorizations

log = logging.getLogger("standin")


LAMBDA_PREFIX = "/2015-03-31/functions"


def lambda_operation(method: str, name: str, action: str) -> str:
    """The Lambda API operation a REST route is (its IAM action is lambda:<operation>)."""
    routes = {("POST", False, ""): "CreateFunction", ("GET", True, ""): "GetFunction",
              ("GET", True, "configuration"): "GetFunctionConfiguration", ("PUT", True, "code"): "UpdateFunctionCode",
              ("PUT", True, "configuration"): "UpdateFunctionConfiguration", ("DELETE", True, ""): "DeleteFunction",
              ("POST", True, "invocations"): "InvokeFunction"}
    return routes.get((method, bool(name), action), "")


def make_handler(api: SageMakerApi, lambdas: LambdaApi, gateway: Gateway | None = None,
                 calls: CallLog | None = None):
    calls = calls or CallLog(None)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle's algorithm and delayed ACKs
        # add about 40 ms to every answer.
        disable_nagle_algorithm = True

        def _send_raw(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _lambda(self, method: str, raw: bytes) -> None:
            """Lambda (REST-JSON): /2015-03-31/functions[/<name>[/code|/configuration|/invocations]]."""
            parts = self.path.split("?")[0][len(LAMBDA_PREFIX):].strip("/").split("/")
            name, action = [*parts, "", ""][:2]
            json_type = {"Content-Type": "application/json"}
            try:
                body = json.loads(raw) if raw and action != "invocations" else {}
                operation = lambda_operation(method, name, action)
                if operation:
                    function = name or body.get("FunctionName", "")
                    granted = [(f"lambda:{operation}", lambdas.arn(function))]
                    if body.get("Role"):  # the caller hands the function its role
                        granted.append(("iam:PassRole", body["Role"], {"iam:PassedToService": "lambda.amazonaws.com"}))
                    calls.record(caller(self.headers), granted, "standin")
                if method == "POST" and not name:
                    self._send_raw(201, json.dumps(lambdas.create_function(body)).encode(), json_type)
                elif method == "GET" and action in ("", "configuration"):
                    result = lambdas.get_function(name)
                    payload = result if not action else result["Configuration"]
                    self._send_raw(200, json.dumps(payload).encode(), json_type)
                elif method == "PUT" and action == "code":
                    self._send_raw(200, json.dumps(lambdas.update_code(name, body)).encode(), json_type)
                elif method == "PUT" and action == "configuration":
                    self._send_raw(200, json.dumps(lambdas.update_configuration(name, body)).encode(), json_type)
                elif method == "DELETE" and not action:
                    lambdas.delete_function(name)
                    self._send_raw(204, b"", {})
                elif method == "POST" and action == "invocations":
                    status, payload, headers = lambdas.invoke(name, raw, self.headers.get("X-Amz-Invocation-Type", ""))
                    self._send_raw(status, payload, {**json_type, **headers})
                else:
                    raise AwsError("UnknownOperationException", f"{method} {self.path} is not served", 404)
            except AwsError as exc:
                body = json.dumps({"Type": "User", "message": exc.message}).encode()
                self._send_raw(exc.status, body, {"x-amzn-ErrorType": exc.code, **json_type})
            except Exception as exc:
                log.exception("lambda %s %s failed", method, self.path)
                body = json.dumps({"message": f"{type(exc).__name__}: {exc}"}).encode()
                self._send_raw(500, body, {"x-amzn-ErrorType": "ServiceException", **json_type})

        def do_PUT(self) -> None:
            self._lambda("PUT", self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def do_DELETE(self) -> None:
            self._lambda("DELETE", b"")

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amzn-RequestId", self.headers.get("amz-sdk-invocation-id", "local"))
            self.end_headers()
            self.wfile.write(body)

        def _gateway(self, method: str, raw: bytes) -> None:
            """The local API Gateway: the public API's route, through the Lambda function."""
            status, headers, body = gateway.handle(method, self.path, dict(self.headers.items()), raw)
            self._send_raw(status, body, headers)

        def _is_gateway(self) -> bool:
            return gateway is not None and self.path.split("?")[0].rstrip("/") == GATEWAY_ROUTE

        def do_GET(self) -> None:
            if self._is_gateway():
                self._gateway("GET", b"")
            elif self.path.startswith(LAMBDA_PREFIX):
                self._lambda("GET", b"")
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"__type": "UnknownOperationException", "message": f"no such path {self.path}"})

        def _runtime(self, raw: bytes) -> None:
            """SageMaker Runtime (REST-JSON): POST /endpoints/<name>/invocations."""
            name = self.path.split("/")[2]
            calls.record(caller(self.headers), [("sagemaker:InvokeEndpoint", arn("endpoint", name))], "standin")
            try:
                payload, content_type = api.invoke(name, raw, self.headers.get("Content-Type"),
                                                   self.headers.get("Accept"))
            except AwsError as exc:
                body = json.dumps({"message": exc.message, **exc.extra}).encode()
                self.send_response(exc.status)
                self.send_header("x-amzn-ErrorType", exc.code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("x-Amzn-Invoked-Production-Variant", "AllTraffic")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length) if length else b""
            if self._is_gateway():
                self._gateway("POST", raw)
                return
            if self.path.startswith("/endpoints/") and self.path.endswith("/invocations"):
                self._runtime(raw)
                return
            if self.path.startswith(LAMBDA_PREFIX):
                self._lambda("POST", raw)
                return
            service, _, operation = self.headers.get("X-Amz-Target", "").partition(".")
            try:
                if service != "SageMaker":
                    raise AwsError("UnknownOperationException", f"unknown target {service}.{operation}")
                try:
                    params = json.loads(raw or b"{}")
                except json.JSONDecodeError as exc:
                    raise AwsError("SerializationException", f"request body is not JSON: {exc}") from exc
                calls.record(caller(self.headers), authorizations(operation, params), "standin")
                result = api.call(operation, params)
                log.info("%s %s -> 200", operation, params.get("TrainingJobName", ""))
                self._send(200, result)
            except AwsError as exc:
                log.info("%s -> %s %s", operation, exc.status, exc.code)
                self._send(exc.status, {"__type": exc.code, "message": exc.message, **exc.extra})
            except Exception as exc:  # never let one request take the server down
                log.exception("%s failed", operation)
                self._send(500, {"__type": "InternalFailure", "message": f"{type(exc).__name__}: {exc}"})

        def log_message(self, format: str, *args) -> None:
            log.debug(format, *args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local stand-in for the SageMaker API")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=5055, help="port to listen on")
    parser.add_argument("--state-dir", default="build/standin", help="jobs and their files; kept across restarts")
    parser.add_argument("--aws-endpoint", required=True,
                        help="endpoint of the other AWS services: S3 and CloudWatch Logs (the moto server)")
    parser.add_argument("--container-python", required=True, help="Python of the container-side environment")
    parser.add_argument("--log-file", default=None, help="log here as well as to stderr")
    parser.add_argument("--call-log", default=os.environ.get("BIN_COUNTER_AWS_CALL_LOG"),
                        help="append each request's IAM actions here as JSON lines, as standin.moto_server does "
                             "(default: $BIN_COUNTER_AWS_CALL_LOG; none: no log)")
    parser.add_argument("--api-function", default="bin-counter-api",
                        help="the Lambda function behind the local API Gateway route POST /count")
    parser.add_argument("--api-key", default=os.environ.get("BIN_COUNTER_API_KEY") or None,
                        help="API key the local gateway requires in x-api-key (default: $BIN_COUNTER_API_KEY; "
                             "none: no key needed)")
    parser.add_argument("--api-max-in-flight", type=int, default=8,
                        help="requests the local gateway runs at once; more get 429 (API Gateway's throttling)")
    parser.add_argument("--invoke-rate", type=float, default=0.0,
                        help="InvokeEndpoint calls per second per endpoint before ThrottlingException "
                             "(0: unlimited)")
    parser.add_argument("--invoke-burst", type=int, default=1, help="calls allowed at once above --invoke-rate")
    parser.add_argument("--role-check", choices=("iam", "off"), default="iam",
                        help="iam (default): refuse a job, model or function whose role does not exist in IAM on "
                             "--aws-endpoint or does not trust the service, as AWS does; off: accept any role")
    parser.add_argument("--unhealthy-models", default=None, metavar="REGEX",
                        help="failure drills: endpoints fail to create or update onto models whose name matches "
                             "REGEX, with SageMaker's health-check FailureReason (an update is rolled back)")
    args = parser.parse_args(argv)
    handlers = [logging.StreamHandler()]
    if args.log_file:
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)
    # Functions run here reach SageMaker Runtime (this server) and the other services (moto) the
    # way a Lambda function on AWS reaches them: through the default endpoints of their SDK.
    own = f"http://{args.host}:{args.port}"
    os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = own
    os.environ["AWS_ENDPOINT_URL_SAGEMAKER"] = own
    os.environ.setdefault("AWS_ENDPOINT_URL", args.aws_endpoint)
    # Absolute: jobs run in their own working folders and find /opt/ml through this path.
    roles = RoleCheck(args.aws_endpoint, enabled=args.role_check == "iam")
    api = SageMakerApi(Path(args.state_dir).resolve(), args.aws_endpoint, args.container_python,
                       invoke_rate=args.invoke_rate, invoke_burst=args.invoke_burst,
                       unhealthy_models=args.unhealthy_models, roles=roles)
    lambdas = LambdaApi(Path(args.state_dir).resolve(), roles=roles)
    gateway = Gateway(lambdas, args.api_function, args.api_key, max_in_flight=args.api_max_in_flight)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(api, lambdas, gateway, CallLog(args.call_log)))
    log.info("SageMaker stand-in on http://%s:%d (state in %s)", args.host, args.port, args.state_dir)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    finally:
        # No model server or training process outlives the stand-in (their jobs are marked failed
        # at the next start).
        api.endpoints.stop_all()
        lambdas.stop_all()
        for process in list(api.processes.values()):
            process.terminate()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
