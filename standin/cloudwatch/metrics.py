"""AWS's own metrics, published to CloudWatch (moto) by one background publisher, as the services
publish them on AWS: SageMaker for every InvokeEndpoint that reaches a model, Lambda for every
invocation (`standin.awslambda.models`), API Gateway for every request (`standin.gateway`). Each
service's names, units and dimensions are beside its `*_values` function below, with the page they
come from.

Serving speed comes first: `add` only adds to sums in memory; a background thread sends them once a
second, one StatisticSet per metric, dimension set and second (what CloudWatch keeps of a
standard-resolution metric anyway), and an unreachable CloudWatch costs a warning in the log, never a
request. None of this is a call of the account's: on AWS the services publish their metrics
themselves, and nobody needs cloudwatch:PutMetricData for them (the client signs as AWS's service,
`standin.aws_calls.SERVICE_ACCESS_KEY_ID`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("standin")

MAX_PER_REQUEST = 1000  # PutMetricData's limit on MetricData items
Dimensions = tuple[tuple[str, str], ...]  # (name, value) pairs, in the order AWS lists them

# SageMaker's endpoint metrics, from "Amazon SageMaker AI metrics in Amazon CloudWatch"
# (https://docs.aws.amazon.com/sagemaker/latest/dg/monitoring-cloudwatch.html), dimensions EndpointName
# and VariantName:
# - `Invocations` (None): the requests sent to the model;
# - `Invocation4XXErrors`, `Invocation5XXErrors` (None): "the number of requests where the model returned
#   a 4xx (5xx) HTTP response code. For each 4xx (5xx) response, 1 is sent; otherwise, 0 is sent", so a
#   ModelError counts by the model's own status;
# - `InvocationModelErrors` (None): requests that did not end in a 2xx from the model, a model server
#   that did not answer included;
# - `InvocationsPerInstance` (None): "1/numberOfInstances is sent as the value on each request";
# - `ModelLatency`, `OverheadLatency` (Microseconds): the model's time as SageMaker sees it, and the
#   rest of the request's time in SageMaker.
NAMESPACE = "AWS/SageMaker"

# Lambda's function metrics, from "Types of metrics for Lambda functions"
# (https://docs.aws.amazon.com/lambda/latest/dg/monitoring-metrics-types.html), dimension FunctionName
# (Resource and ExecutedVersion name a version or an alias: the stand-in serves $LATEST only):
# - `Invocations` (Count): every invocation of the function's code, failed ones included; not a
#   throttled request;
# - `Errors` (Count): invocations that ended in a function error (the handler raised, an import
#   failed, a timeout, out of memory);
# - `Throttles` (Count): requests refused for want of concurrency, which the stand-in never refuses;
# - `Duration` (Milliseconds): the time the function's code ran;
# - `ConcurrentExecutions` (Count): environments processing events at once (read as its Maximum).
LAMBDA_NAMESPACE = "AWS/Lambda"

# API Gateway's REST API metrics, from "Amazon API Gateway dimensions and metrics"
# (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-metrics-and-dimensions.html),
# dimensions ApiName and Stage:
# - `Count` (Count): requests in the period;
# - `4XXError`, `5XXError` (Count): client- and server-side errors; 1 or 0 per request, so that the
#   Average is the error rate;
# - `Latency` (Milliseconds): from the request's arrival to the answer, API Gateway's own work included;
# - `IntegrationLatency` (Milliseconds): from relaying the request to the backend (the function) to its
#   answer; none when API Gateway answers itself (403, 429, 413).
GATEWAY_NAMESPACE = "AWS/ApiGateway"


def sagemaker_values(status: int | None, model_latency_s: float, overhead_s: float, instances: int) -> dict:
    """metric -> (value, unit) for one request that reached the model (status None: no answer)."""
    return {
        "Invocations": (1.0, "None"),
        "Invocation4XXErrors": (1.0 if status is not None and 400 <= status < 500 else 0.0, "None"),
        "Invocation5XXErrors": (1.0 if status is not None and 500 <= status < 600 else 0.0, "None"),
        "InvocationModelErrors": (0.0 if status is not None and 200 <= status < 300 else 1.0, "None"),
        "InvocationsPerInstance": (1.0 / max(1, instances), "None"),
        "ModelLatency": (model_latency_s * 1e6, "Microseconds"),
        "OverheadLatency": (max(0.0, overhead_s) * 1e6, "Microseconds"),
    }


def lambda_values(failed: bool, duration_s: float, concurrent: int) -> dict:
    """metric -> (value, unit) for one invocation of a function's code."""
    return {
        "Invocations": (1.0, "Count"),
        "Errors": (1.0 if failed else 0.0, "Count"),
        "Duration": (duration_s * 1000.0, "Milliseconds"),
        "ConcurrentExecutions": (float(concurrent), "Count"),
    }


def gateway_values(status: int, latency_s: float, integration_s: float | None) -> dict:
    """metric -> (value, unit) for one request the API answered with `status`."""
    values = {
        "Count": (1.0, "Count"),
        "4XXError": (1.0 if 400 <= status < 500 else 0.0, "Count"),
        "5XXError": (1.0 if 500 <= status < 600 else 0.0, "Count"),
        "Latency": (latency_s * 1000.0, "Milliseconds"),
    }
    if integration_s is not None:
        values["IntegrationLatency"] = (integration_s * 1000.0, "Milliseconds")
    return values


class MetricPublisher:
    """Metrics of any namespace, summed per second in memory and sent by a daemon thread every
    `interval` s through a CloudWatch client from `client_factory` (made in that thread, when first
    needed)."""

    def __init__(self, client_factory: Callable[[], Any], interval: float = 1.0) -> None:
        self.client_factory, self.interval = client_factory, interval
        # (second, namespace, dimensions, metric, unit) -> [SampleCount, Sum, Minimum, Maximum]
        self.pending: dict[tuple[int, str, Dimensions, str, str], list[float]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.client: Any = None
        self.failing = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="cloudwatch-metrics")
        self.thread.start()

    def add(self, namespace: str, dimensions: Dimensions, values: Mapping[str, tuple[float, str]]) -> None:
        """One event's datapoints: metric -> (value, unit), all with the same dimensions."""
        second = int(time.time())
        with self.lock:
            for metric, (value, unit) in values.items():
                key = (second, namespace, dimensions, metric, unit)
                stats = self.pending.get(key)
                if stats is None:
                    self.pending[key] = [1.0, value, value, value]
                else:  # SampleCount, Sum, Minimum, Maximum
                    stats[0] += 1
                    stats[1] += value
                    stats[2] = min(stats[2], value)
                    stats[3] = max(stats[3], value)

    def record(
        self,
        endpoint: str,
        variant: str,
        status: int | None,
        model_latency_s: float,
        overhead_s: float,
        instances: int,
    ) -> None:
        """One request that reached an endpoint's model: its status (None when the model server did not answer)."""
        dimensions = (("EndpointName", endpoint), ("VariantName", variant))
        self.add(NAMESPACE, dimensions, sagemaker_values(status, model_latency_s, overhead_s, instances))

    def flush(self) -> None:
        """Send what has been recorded so far (the thread does so every `interval`)."""
        with self.lock:
            pending, self.pending = self.pending, {}
        if not pending:
            return
        by_namespace: dict[str, list[dict]] = {}
        for (second, namespace, dimensions, metric, unit), s in sorted(pending.items()):
            by_namespace.setdefault(namespace, []).append(
                {
                    "MetricName": metric,
                    "Dimensions": [{"Name": name, "Value": value} for name, value in dimensions],
                    "Timestamp": datetime.fromtimestamp(second, UTC),
                    "StatisticValues": {"SampleCount": s[0], "Sum": s[1], "Minimum": s[2], "Maximum": s[3]},
                    "Unit": unit,
                }
            )
        try:
            if self.client is None:
                self.client = self.client_factory()
            for namespace, data in by_namespace.items():
                for start in range(0, len(data), MAX_PER_REQUEST):
                    self.client.put_metric_data(Namespace=namespace, MetricData=data[start : start + MAX_PER_REQUEST])
        except Exception as exc:  # CloudWatch unreachable: these datapoints are lost, serving goes on
            if not self.failing:
                log.warning("could not publish metrics to CloudWatch: %s", exc)
            self.failing = True
            return
        self.failing = False

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.flush()
