"""SageMaker's endpoint metrics (namespace `AWS/SageMaker`), published to CloudWatch (moto) as SageMaker
publishes them for every InvokeEndpoint that reaches a model.

What and in which units, from "Amazon SageMaker AI metrics in Amazon CloudWatch"
(https://docs.aws.amazon.com/sagemaker/latest/dg/monitoring-cloudwatch.html), dimensions EndpointName
and VariantName:
- `Invocations` (None): the requests sent to the model;
- `Invocation4XXErrors`, `Invocation5XXErrors` (None): "the number of requests where the model returned
  a 4xx (5xx) HTTP response code. For each 4xx (5xx) response, 1 is sent; otherwise, 0 is sent", so a
  ModelError counts by the model's own status;
- `InvocationModelErrors` (None): requests that did not end in a 2xx from the model, a model server that
  did not answer included;
- `InvocationsPerInstance` (None): "1/numberOfInstances is sent as the value on each request";
- `ModelLatency`, `OverheadLatency` (Microseconds): the model's time as SageMaker sees it, and the
  rest of the request's time in SageMaker.

Serving speed comes first: `record` only adds to sums in memory; a background thread sends them once a
second, one StatisticSet per metric and second (what CloudWatch keeps of a standard-resolution metric
anyway), and an unreachable CloudWatch costs a warning in the log, never an invocation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("standin")

NAMESPACE = "AWS/SageMaker"
LATENCIES = ("ModelLatency", "OverheadLatency")
MAX_PER_REQUEST = 1000  # PutMetricData's limit on MetricData items


class MetricPublisher:
    """Endpoint metrics, summed per second in memory and sent by a daemon thread every `interval` s
    through a CloudWatch client from `client_factory` (made in that thread, when first needed)."""

    def __init__(self, client_factory: Callable[[], Any], interval: float = 1.0) -> None:
        self.client_factory, self.interval = client_factory, interval
        self.pending: dict[tuple[int, str, str, str], list[float]] = {}  # (second, endpoint, variant, metric)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.client: Any = None
        self.failing = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="cloudwatch-metrics")
        self.thread.start()

    def record(
        self,
        endpoint: str,
        variant: str,
        status: int | None,
        model_latency_s: float,
        overhead_s: float,
        instances: int,
    ) -> None:
        """One request that reached the model: its status (None when the model server did not answer)."""
        second = int(time.time())
        values = {
            "Invocations": 1.0,
            "Invocation4XXErrors": 1.0 if status is not None and 400 <= status < 500 else 0.0,
            "Invocation5XXErrors": 1.0 if status is not None and 500 <= status < 600 else 0.0,
            "InvocationModelErrors": 0.0 if status is not None and 200 <= status < 300 else 1.0,
            "InvocationsPerInstance": 1.0 / max(1, instances),
            "ModelLatency": model_latency_s * 1e6,
            "OverheadLatency": max(0.0, overhead_s) * 1e6,
        }
        with self.lock:
            for metric, value in values.items():
                stats = self.pending.get((second, endpoint, variant, metric))
                if stats is None:
                    self.pending[(second, endpoint, variant, metric)] = [1.0, value, value, value]
                else:  # SampleCount, Sum, Minimum, Maximum
                    stats[0] += 1
                    stats[1] += value
                    stats[2] = min(stats[2], value)
                    stats[3] = max(stats[3], value)

    def flush(self) -> None:
        """Send what has been recorded so far (the thread does so every `interval`)."""
        with self.lock:
            pending, self.pending = self.pending, {}
        if not pending:
            return
        data = [
            {
                "MetricName": metric,
                "Dimensions": [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}],
                "Timestamp": datetime.fromtimestamp(second, UTC),
                "StatisticValues": {"SampleCount": s[0], "Sum": s[1], "Minimum": s[2], "Maximum": s[3]},
                "Unit": "Microseconds" if metric in LATENCIES else "None",
            }
            for (second, endpoint, variant, metric), s in sorted(pending.items())
        ]
        try:
            if self.client is None:
                self.client = self.client_factory()
            for start in range(0, len(data), MAX_PER_REQUEST):
                self.client.put_metric_data(Namespace=NAMESPACE, MetricData=data[start : start + MAX_PER_REQUEST])
        except Exception as exc:  # CloudWatch unreachable: these datapoints are lost, serving goes on
            if not self.failing:
                log.warning("could not publish endpoint metrics to CloudWatch: %s", exc)
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
