"""HTTP front of the stand-in: reads each request and hands it by its path (or `X-Amz-Target`) to a
service's responses layer, SageMaker's (AWS JSON 1.1, and SageMaker Runtime's REST-JSON) or
Lambda's (REST-JSON), or to the local API Gateway; writes the answer back.

  .venv/bin/python -m standin.server --aws-endpoint http://127.0.0.1:5000 \
      --container-python .venv-container/bin/python [--port 5055] [--state-dir build/standin]

boto3 reaches it with `endpoint_url` (or `AWS_ENDPOINT_URL_SAGEMAKER`); `GET /health` answers 200.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from standin.aws_calls import CallLog
from standin.awslambda.logs import FunctionLogs, role_clients
from standin.awslambda.models import LambdaBackend
from standin.awslambda.responses import PREFIX as LAMBDA_PREFIX
from standin.awslambda.responses import LambdaResponse
from standin.cloudwatch.evaluator import AlarmEvaluator, AlarmLoop
from standin.core import Answer
from standin.forkserver import ForkServer
from standin.gateway import ROUTE as GATEWAY_ROUTE
from standin.gateway import Gateway
from standin.launch import LOCAL_STACK_PARAMETERS
from standin.roles import RoleCheck
from standin.sagemaker.models import SageMakerBackend
from standin.sagemaker.responses import SageMakerResponse, json_answer

log = logging.getLogger("standin")


class StandinHTTPServer(ThreadingHTTPServer):
    """The stand-in's HTTP server. socketserver listens with a backlog of 5: a burst of new connections
    from more clients than that (the API load test's 16, each request a connection of its own) could
    find the queue full and be reset, where API Gateway and SageMaker accept every connection and
    answer 429 or 503 instead."""

    request_queue_size = 128


def make_handler(sagemaker: SageMakerResponse, lambdas: LambdaResponse, gateway: Gateway | None = None):
    """The request handler: each request goes by its path (and target) to one service's responses layer."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle's algorithm and delayed ACKs
        # add about 40 ms to every answer.
        disable_nagle_algorithm = True

        def _write(self, answer: Answer) -> None:
            status, headers, body = answer
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _is_gateway(self) -> bool:
            return gateway is not None and self.path.split("?")[0].rstrip("/") == GATEWAY_ROUTE

        def _gateway(self, method: str, raw: bytes) -> None:
            """The local API Gateway: the public API's route, through the Lambda function."""
            assert gateway is not None  # _is_gateway() said so
            self._write(gateway.handle(method, self.path, dict(self.headers.items()), raw))

        def do_GET(self) -> None:
            request_id = self.headers.get("amz-sdk-invocation-id", "local")
            if self._is_gateway():
                self._gateway("GET", b"")
            elif self.path.startswith(LAMBDA_PREFIX):
                self._write(lambdas.dispatch("GET", self.path, self.headers, b""))
            elif self.path == "/health":
                self._write(json_answer(200, {"status": "ok"}, request_id))
            else:
                self._write(
                    json_answer(
                        404, {"__type": "UnknownOperationException", "message": f"no such path {self.path}"}, request_id
                    )
                )

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length) if length else b""
            if self._is_gateway():
                self._gateway("POST", raw)
            elif self.path.startswith("/endpoints/") and self.path.endswith("/invocations"):
                self._write(sagemaker.invoke_endpoint(self.path, self.headers, raw))
            elif self.path.startswith(LAMBDA_PREFIX):
                self._write(lambdas.dispatch("POST", self.path, self.headers, raw))
            else:
                self._write(sagemaker.dispatch(self.headers, raw))

        # Only Lambda's API has these methods.
        def do_PUT(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._write(lambdas.dispatch("PUT", self.path, self.headers, raw))

        def do_DELETE(self) -> None:
            self._write(lambdas.dispatch("DELETE", self.path, self.headers, b""))

        def log_message(self, format: str, *args) -> None:
            log.debug(format, *args)

    return Handler


SERVERLESS_IDLE_HELP = (
    "a serverless endpoint's model server stops after this many seconds without a request; the next request "
    "starts it again (a cold start). AWS does not say how long it keeps one warm"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local stand-in for the SageMaker API")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=5055, help="port to listen on")
    parser.add_argument("--state-dir", default="build/standin", help="jobs and their files; kept across restarts")
    parser.add_argument(
        "--aws-endpoint",
        required=True,
        help="endpoint of the other AWS services: S3 and CloudWatch Logs (the moto server)",
    )
    parser.add_argument("--container-python", required=True, help="Python of the container-side environment")
    parser.add_argument(
        "--fork-server",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("BIN_COUNTER_FORK_SERVER", "1") != "0",
        help="start jobs and model servers from a container-side process that imported torch once "
        "(standin/forkserver.py; --no-fork-server or BIN_COUNTER_FORK_SERVER=0: a fresh interpreter each, "
        "as for measuring their memory)",
    )
    parser.add_argument("--log-file", default=None, help="log here as well as to stderr")
    parser.add_argument(
        "--call-log",
        default=os.environ.get("BIN_COUNTER_AWS_CALL_LOG"),
        help="append each request's IAM actions here as JSON lines, as standin.moto_server does "
        "(default: $BIN_COUNTER_AWS_CALL_LOG; none: no log)",
    )
    parser.add_argument(
        "--api-function",
        default=LOCAL_STACK_PARAMETERS["FunctionName"],
        help="the Lambda function behind the local API Gateway route POST /count",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BIN_COUNTER_API_KEY") or None,
        help="API key the local gateway requires in x-api-key (default: $BIN_COUNTER_API_KEY; none: no key needed)",
    )
    parser.add_argument(
        "--api-max-in-flight",
        type=int,
        default=8,
        help="requests the local gateway runs at once; more get 429 (API Gateway's throttling)",
    )
    parser.add_argument(
        "--invoke-rate",
        type=float,
        default=0.0,
        help="InvokeEndpoint calls per second per endpoint before ThrottlingException (0: unlimited)",
    )
    parser.add_argument("--invoke-burst", type=int, default=1, help="calls allowed at once above --invoke-rate")
    parser.add_argument("--serverless-idle-s", type=float, default=300.0, help=SERVERLESS_IDLE_HELP)
    parser.add_argument(
        "--role-check",
        choices=("iam", "off"),
        default="iam",
        help="iam (default): refuse a job, model or function whose role does not exist in IAM on "
        "--aws-endpoint or does not trust the service, as AWS does; off: accept any role",
    )
    parser.add_argument(
        "--unhealthy-models",
        default=None,
        metavar="REGEX",
        help="failure drills: endpoints fail to create or update onto models whose name matches "
        "REGEX, with SageMaker's health-check FailureReason (an update is rolled back)",
    )
    parser.add_argument(
        "--alarm-interval",
        type=float,
        default=5.0,
        help="seconds between evaluations of every CloudWatch metric alarm on --aws-endpoint, whose state "
        "changes are sent to the alarms' SNS actions as CloudWatch sends them (0: no evaluation)",
    )
    args = parser.parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
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
    state_dir = Path(args.state_dir).resolve()
    fork_server = ForkServer(args.container_python, state_dir / "forkserver") if args.fork_server else None
    sagemaker = SageMakerBackend(
        state_dir,
        args.aws_endpoint,
        fork_server.python if fork_server else args.container_python,
        invoke_rate=args.invoke_rate,
        invoke_burst=args.invoke_burst,
        unhealthy_models=args.unhealthy_models,
        roles=roles,
        serverless_idle_s=args.serverless_idle_s,
    )
    # One publisher for AWS's own metrics: SageMaker's, Lambda's and API Gateway's (standin.cloudwatch).
    # Functions' output goes to CloudWatch Logs too, as Lambda sends it, signed as their role.
    function_logs = FunctionLogs(role_clients(args.aws_endpoint, sagemaker.region))
    lambdas = LambdaBackend(state_dir, roles=roles, metrics=sagemaker.metrics, logs=function_logs)
    gateway = Gateway(
        lambdas, args.api_function, args.api_key, max_in_flight=args.api_max_in_flight, metrics=sagemaker.metrics
    )
    alarm_loop = _alarm_loop(sagemaker, args.alarm_interval)
    calls = CallLog(args.call_log)
    handler = make_handler(SageMakerResponse(sagemaker, calls), LambdaResponse(lambdas, calls), gateway)
    server = StandinHTTPServer((args.host, args.port), handler)
    log.info("SageMaker stand-in on http://%s:%d (state in %s)", args.host, args.port, args.state_dir)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    finally:
        if alarm_loop is not None:
            alarm_loop.stop()
        sagemaker.shutdown()
        lambdas.stop_all()
        if fork_server:
            fork_server.stop()
    return 0


def _alarm_loop(sagemaker: SageMakerBackend, interval: float) -> AlarmLoop | None:
    """CloudWatch's evaluation of every metric alarm, and its notifications to the alarms' SNS topics:
    AWS's own work, signed as AWS's service (none with interval 0)."""
    if interval <= 0:
        return None
    evaluator = AlarmEvaluator(
        sagemaker._service_client("cloudwatch"), sagemaker._service_client("sns"), region=sagemaker.region
    )
    return AlarmLoop(evaluator, interval, before=sagemaker.metrics.flush)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
