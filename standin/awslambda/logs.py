"""A function's log in CloudWatch Logs, as Lambda keeps it
(https://docs.aws.amazon.com/lambda/latest/dg/monitoring-cloudwatchlogs.html): group
`/aws/lambda/<function>`, one stream per execution environment named
`YYYY/MM/DD/[<version>]<environment id>` ("YYYY/MM/DD[Function version][Execution environment GUID]",
Lambda operator guide, "How CloudWatch structures logs"), every line the function prints an event of
its own, with the START, END and REPORT lines the runtime adds around each invocation (runner.py
writes them). Lambda writes them with the function's execution role, which needs
logs:CreateLogGroup, logs:CreateLogStream and logs:PutLogEvents (AWSLambdaBasicExecutionRole): the
stand-in signs as that role too.

The lines still go to `<state>/lambda/<function>/function.log`. Shipping them is a background
thread's work (standin.batcher): an invocation never waits for CloudWatch Logs, and an unreachable
moto costs a warning, never an invocation.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import boto3
from botocore.config import Config

from standin.aws_calls import role_credentials
from standin.batcher import BackgroundBatcher

# PutLogEvents' limits (the CloudWatch Logs API reference): at most 10,000 events and 1,048,576 bytes
# a request, counting each event's UTF-8 message plus 26 bytes; an event of at most 256 KB.
MAX_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 256 * 1024 - EVENT_OVERHEAD


def log_group(function: str) -> str:
    return f"/aws/lambda/{function}"


def stream_name(version: str = "$LATEST", now: datetime | None = None) -> str:
    """A new execution environment's log stream."""
    return f"{(now or datetime.now(UTC)):%Y/%m/%d}/[{version}]{uuid.uuid4().hex}"


def batches(events: list[dict]) -> list[list[dict]]:
    """`events` cut into PutLogEvents requests within its limits, in time order."""
    out: list[list[dict]] = [[]]
    size = 0
    for event in sorted(events, key=lambda e: e["timestamp"]):
        cost = len(event["message"].encode()) + EVENT_OVERHEAD
        if out[-1] and (len(out[-1]) >= MAX_EVENTS or size + cost > MAX_BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append(event)
        size += cost
    return [b for b in out if b]


def role_clients(aws_endpoint: str, region: str) -> Callable[[str], Any]:
    """CloudWatch Logs clients acting as a function's role; short timeouts and no retries, so that an
    unreachable moto holds up the shipping thread only briefly (what was not sent is sent next turn)."""
    quick = Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})

    def client(role_arn: str) -> Any:
        return boto3.client(
            "logs", endpoint_url=aws_endpoint, region_name=region, config=quick, **role_credentials(role_arn)
        )

    return client


class FunctionLogs:
    """Every function's log lines, shipped by one background thread through `client_factory(role_arn)`
    (a CloudWatch Logs client acting as that role)."""

    def __init__(self, client_factory: Callable[[str], Any], interval: float = 1.0) -> None:
        self.client_factory = client_factory
        self.clients: dict[str, Any] = {}
        self.groups: set[str] = set()  # created already (or found to exist)
        self.streams: set[tuple[str, str]] = set()
        self.batches = BackgroundBatcher("lambda-logs", self._send, interval, max_items=MAX_EVENTS)

    def add(self, role_arn: str, function: str, stream: str, line: str, when_ms: int | None = None) -> None:
        message = line.encode()[:MAX_EVENT_BYTES].decode(errors="ignore")
        event = {"timestamp": when_ms if when_ms is not None else int(time.time() * 1000), "message": message}
        self.batches.add((role_arn, log_group(function), stream), event)

    def follow(self, pipe: IO[bytes], log_file: IO[bytes], role_arn: str, function: str, stream: str) -> None:
        """Copy an environment's output, line by line, to `log_file` and to the log stream, until the
        process ends; then close `log_file`."""

        def pump() -> None:
            try:
                for raw in iter(pipe.readline, b""):
                    log_file.write(raw)
                    log_file.flush()
                    self.add(role_arn, function, stream, raw.decode(errors="replace").rstrip("\n"))
            finally:
                log_file.close()

        threading.Thread(target=pump, daemon=True, name=f"lambda-log-{function}").start()

    def _client(self, role_arn: str) -> Any:
        client = self.clients.get(role_arn)
        if client is None:
            client = self.clients[role_arn] = self.client_factory(role_arn)
        return client

    def _ensure(self, client: Any, group: str, stream: str) -> None:
        if group not in self.groups:
            # It exists when the API stack created it.
            with contextlib.suppress(client.exceptions.ResourceAlreadyExistsException):
                client.create_log_group(logGroupName=group)
            self.groups.add(group)
        if (group, stream) not in self.streams:
            # It exists when a send failed after creating it.
            with contextlib.suppress(client.exceptions.ResourceAlreadyExistsException):
                client.create_log_stream(logGroupName=group, logStreamName=stream)
            self.streams.add((group, stream))

    def _send(self, key: tuple[str, str, str], events: list[dict]) -> None:
        role_arn, group, stream = key
        client = self._client(role_arn)
        self._ensure(client, group, stream)
        for batch in batches(events):
            client.put_log_events(logGroupName=group, logStreamName=stream, logEvents=batch)

    def flush(self) -> None:
        self.batches.flush()

    def stop(self) -> None:
        self.batches.stop()
