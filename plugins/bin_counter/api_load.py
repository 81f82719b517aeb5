"""A bounded load test of the counting API: a fixed number of clients send the same photos for a
fixed time; every request is accounted for.

  python -m bin_counter.api_load --url http://127.0.0.1:5055/count --api-key local-demo-key \\
      --clients 4 --seconds 30 photo.jpg

Prints one JSON line: requests sent and answered, answers by status, failures (anything but 200
and the statuses passed as --expected-status), throughput and the latency p50/p99 of the 200s.
Works against API Gateway on AWS and the local gateway alike; standard library only. Exit code 1
when a request failed or got no answer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bin_counter.api_client import add_target_arguments, images_in, request_headers

NO_ANSWER = 0  # a request that got no HTTP answer at all: refused, reset, timed out


@dataclass
class LoadResult:
    clients: int
    seconds: float
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # of the 200 answers

    def summary(self, allowed: Sequence[int] = ()) -> dict:
        answered = sum(n for status, n in self.statuses.items() if status != NO_ANSWER)
        ok = sorted(self.latencies_ms)
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "sent": self.sent,
            "answered": answered,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "failed": sum(n for status, n in self.statuses.items() if status != 200 and status not in allowed),
            "ok_per_s": round(len(ok) / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(percentile(ok, 50), 1) if ok else None,
            "p99_ms": round(percentile(ok, 99), 1) if ok else None,
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(0, min(len(ordered), rank) - 1)]


def run_load(send: Callable[[int], int], clients: int, seconds: float) -> LoadResult:
    """`clients` threads call `send(request_number)` (which returns the HTTP status, or NO_ANSWER)
    back to back until `seconds` have passed; every call is counted, its latency kept when 200."""
    result, lock, numbers = LoadResult(clients, seconds), threading.Lock(), itertools.count()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            number = next(numbers)
            started = time.perf_counter()
            try:
                status = send(number)
            except Exception:  # a sender that raised lost its request: that is what this counts
                status = NO_ANSWER
            elapsed_ms = (time.perf_counter() - started) * 1000
            with lock:
                result.sent += 1
                result.statuses[status] += 1
                if status == 200:
                    result.latencies_ms.append(elapsed_ms)

    started = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    return result


def gateway_sender(url: str, api_key: str | None, images: Sequence[Path], timeout: float = 30) -> Callable[[int], int]:
    """POSTs the images in turn to the API; returns the HTTP status (NO_ANSWER when there was none)."""
    bodies = [(p.read_bytes(), request_headers(p, api_key)) for p in images]

    def send(number: int) -> int:
        data, headers = bodies[number % len(bodies)]
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the user's URL
                json.loads(response.read())  # a 200 must carry a whole JSON answer
                return response.status
        except urllib.error.HTTPError as exc:
            exc.read()
            return exc.code
        except (OSError, ValueError):
            return NO_ANSWER

    return send


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_target_arguments(parser, "images, or folders of .jpg/.png images, sent in turn")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients, each sending back to back")
    parser.add_argument("--seconds", type=float, default=30, help="how long to send")
    parser.add_argument(
        "--expected-status",
        type=int,
        action="append",
        default=[],
        help="a status that is not a failure besides 200 (e.g. 429 above the rated load)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    images = images_in(args.paths)
    if not images:
        print("no images to send", file=sys.stderr)
        return 2
    result = run_load(gateway_sender(args.url, args.api_key, images), args.clients, args.seconds)
    summary = result.summary(args.expected_status)
    print(json.dumps(summary))
    return 1 if summary["failed"] or summary["answered"] != summary["sent"] else 0


if __name__ == "__main__":
    sys.exit(main())
