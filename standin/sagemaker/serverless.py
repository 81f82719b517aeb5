"""Serverless endpoints, as SageMaker Serverless Inference serves them: no model server while idle, one
started by the first request after idle (the cold start), at most `MaxConcurrency` requests at once,
and a smaller request body.

From SageMaker's guide (https://docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints.html and
serverless-endpoints-invoke.html): "The maximum request and response payload size for serverless
invocations is 4 MB"; "The model must download and the server must respond successfully to /ping within
3 minutes"; compute "scales down to zero" without traffic, and a request then meets a cold start;
MaxConcurrency is "the maximum number of concurrent invocations your serverless endpoint can process".
How long an endpoint stays warm after its last request AWS does not say: here it is the stand-in's
`--serverless-idle-s`.

What SageMaker answers a request over MaxConcurrency: ThrottlingException (the error botocore retries as
throttling, and the one the SageMaker SDK's users report for a serverless endpoint at its concurrency);
its message here is the stand-in's. The 4 MB body limit answers as the 6 MB one does (`Request <id> has
oversize body.`, aws/sagemaker-python-sdk#4271 shows it for a serverless endpoint).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from standin.sagemaker.exceptions import RuntimeValidationError, ThrottlingException

MAX_BODY_BYTES = 4 * 1024 * 1024  # "4 MB", in the MiB that the 6 MB real-time limit is (6,291,456)
IDLE_S = 300.0


@dataclass
class _Endpoint:
    max_concurrency: int
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    starting: threading.Lock = field(default_factory=threading.Lock)


class ServerlessPool:
    """The serverless endpoints' concurrency and idleness. `warm(name)` makes sure a model server runs
    (starting one: the cold start) and `stop(name)` stops it; both are the backend's."""

    def __init__(self, warm: Callable[[str], None], stop: Callable[[str], None], idle_s: float = IDLE_S) -> None:
        self.warm, self.stop, self.idle_s = warm, stop, idle_s
        self.endpoints: dict[str, _Endpoint] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        threading.Thread(target=self._reap, daemon=True, name="serverless-idle").start()

    def serve(self, name: str, max_concurrency: int) -> None:
        """`name` is (now) a serverless endpoint taking `max_concurrency` requests at once."""
        with self.lock:
            found = self.endpoints.get(name)
            if found is None:
                self.endpoints[name] = _Endpoint(max_concurrency)
            else:
                found.max_concurrency, found.last_used = max_concurrency, time.monotonic()

    def forget(self, name: str) -> None:
        with self.lock:
            self.endpoints.pop(name, None)

    def is_serverless(self, name: str) -> bool:
        with self.lock:
            return name in self.endpoints

    @contextmanager
    def admitted(self, name: str, request_id: str, size: int) -> Iterator[None]:
        """One request of a serverless endpoint: refused over the body limit or MaxConcurrency, else
        served by a model server that runs (started now after idle)."""
        with self.lock:
            endpoint = self.endpoints.get(name)
            if endpoint is not None:
                if size > MAX_BODY_BYTES:
                    raise RuntimeValidationError.oversize_body(request_id)
                if endpoint.in_flight >= endpoint.max_concurrency:
                    raise ThrottlingException(
                        f"Endpoint {name} is serving its MaxConcurrency of {endpoint.max_concurrency} requests; "
                        "retry later. (stand-in's wording)"
                    )
                endpoint.in_flight += 1
        if endpoint is None:  # an instance endpoint
            yield
            return
        try:
            with endpoint.starting:  # one cold start at a time; the others wait for it
                self.warm(name)
            yield
        finally:
            with self.lock:
                endpoint.in_flight -= 1
                endpoint.last_used = time.monotonic()

    def close(self) -> None:
        self.closing.set()

    def _reap(self) -> None:
        # Scale to zero: a model server idle for idle_s is stopped (checked a few times per idle_s).
        while not self.closing.wait(max(0.2, min(5.0, self.idle_s / 4))):
            now = time.monotonic()
            with self.lock:
                idle = [n for n, e in self.endpoints.items() if not e.in_flight and now - e.last_used > self.idle_s]
            for name in idle:
                endpoint = self.endpoints.get(name)
                if endpoint is None or not endpoint.starting.acquire(blocking=False):
                    continue
                try:
                    with self.lock:
                        busy = endpoint.in_flight or time.monotonic() - endpoint.last_used <= self.idle_s
                    if not busy:
                        self.stop(name)
                finally:
                    endpoint.starting.release()
