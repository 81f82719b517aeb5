"""A model server for one endpoint (or one transform instance), in the container-side environment:
`GET /ping` and `POST /invocations` as SageMaker's PyTorch inference image answers them. Like TorchServe
in that image, it is a front end and worker processes: this process takes the HTTP requests and hands
each to an idle worker (`model_backend.py`, which serves through the image's own inference toolkit);
a request waits while every worker is busy.

  PYTHONPATH=<model dir>/code .venv-container/bin/python -P standin/sagemaker/model_frontend.py \\
      --model-dir <extracted model.tar.gz> --port 8080 [--workers N]

Workers: SAGEMAKER_MODEL_SERVER_WORKERS, the inference toolkit's setting (it becomes TorchServe's
`default_workers_per_model`); unset, TorchServe starts one per logical CPU. Each worker loads the model
itself, as TorchServe's do, so each holds its own memory; inference.py gives each its share of the
cores. The front end answers `/ping` once every worker has loaded the model, and exits when one fails
to, with the worker's traceback in the log. A worker that dies is replaced (retried with backoff);
its request is answered as TorchServe answers a failed prediction, `/ping` is 500 Unhealthy while no
worker lives, and a request that finds no idle worker within 60 s gets TorchServe's 503.

What is ours, in place of TorchServe's Java front end: the HTTP front, and the answer as its
`RestJob` and `NettyUtils` send it: TorchServe's cache headers and `x-request-id` on every answer,
its ErrorResponse JSON for its own errors, and `{"status": "Healthy"}` on `/ping`. The front end
imports neither torch nor the toolkit, so it holds a few MB; the workers hold the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run with -P: the model's code/ (PYTHONPATH) comes first, then this folder
    sys.path.append(str(HERE))

if TYPE_CHECKING:  # the type checker reads the worker by its package path; this process imports it by file name
    from standin.sagemaker.model_backend import ts_error
else:
    from model_backend import ts_error  # after the path is set

BACKEND = HERE / "model_backend.py"
WORKERS_SETTING = "SAGEMAKER_MODEL_SERVER_WORKERS"
# Every answer of TorchServe's front end (NettyUtils.sendHttpResponse) carries these.
CACHE_HEADERS = (
    ("Pragma", "no-cache"),
    ("Cache-Control", "no-cache; no-store, must-revalidate, private"),
    ("Expires", "Thu, 01 Jan 1970 00:00:00 UTC"),
)

# A worker's answer: (status, reason phrase, response headers, body).
Answer = tuple[int, str | None, dict, bytes]

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    pass


class Backend:
    """One worker process and the socket to it."""

    def __init__(self, model_dir: str, count: int) -> None:
        ours, theirs = socket.socketpair()
        # The worker count travels in the environment, so that each worker's inference.py takes its share
        # of the cores however the count was chosen.
        self.process = subprocess.Popen(
            [sys.executable, "-P", str(BACKEND), "--model-dir", model_dir, "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env={**os.environ, WORKERS_SETTING: str(count)},
        )
        theirs.close()
        self.connection = Connection(ours.detach())

    def ready(self) -> None:
        """Wait until the worker has loaded the model; WorkerDied when it could not."""
        try:
            if self.connection.recv() != "ready":
                raise WorkerDied("the worker sent something else than ready")
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"the worker exited while loading the model (exit status {self.process.wait()})") from exc

    def ask(self, body: bytes, headers: list[tuple[str, str]], request_id: str) -> Answer:
        """The worker's (status, phrase, headers, body); WorkerDied when it gave none."""
        try:
            self.connection.send((body, headers, request_id))
            return self.connection.recv()
        except Exception as exc:  # a closed socket, or an answer that does not unpickle: the worker is lost
            raise WorkerDied(f"{type(exc).__name__}: {exc}") from exc

    def stop(self) -> None:
        self.connection.close()
        if self.process.poll() is None:
            self.process.terminate()


# TorchServe's answer when a model has no worker to take a request.
NO_WORKER = (
    "ServiceUnavailableException",
    'Model "model" has no worker to serve inference request. Please use scale workers API to add workers.',
)


class Workers:
    """The model's workers; a request takes an idle one and gives it back. A worker that dies is
    replaced, retried with backoff while its model will not load; `/ping` is unhealthy while none lives."""

    def __init__(self, model_dir: str, count: int, queue_timeout_s: float = 60.0) -> None:
        self.model_dir, self.count, self.queue_timeout_s = model_dir, count, queue_timeout_s
        self.idle: queue.Queue[Backend] = queue.Queue()
        self.lock = threading.Lock()
        started = [Backend(model_dir, count) for _ in range(count)]
        try:
            for backend in started:  # they load side by side
                backend.ready()
        except WorkerDied:
            for backend in started:
                backend.stop()
            raise
        self.alive = count
        for backend in started:
            self.idle.put(backend)

    def healthy(self) -> bool:
        with self.lock:
            return self.alive > 0

    def answer(self, body: bytes, headers: list[tuple[str, str]], request_id: str) -> Answer:
        try:
            backend = self.idle.get(timeout=self.queue_timeout_s)
        except queue.Empty:
            return ts_error(503, *NO_WORKER)
        try:
            result = backend.ask(body, headers, request_id)
        except WorkerDied as exc:
            logger.error("a model worker died (%s, exit status %s); starting another", exc, backend.process.poll())
            with self.lock:
                self.alive -= 1
            threading.Thread(target=self._replace, args=(backend,), daemon=True).start()
            return ts_error(503, "InternalServerException", "Prediction failed")
        self.idle.put(backend)
        return result

    def _replace(self, dead: Backend) -> None:
        dead.stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            dead.process.wait(timeout=10)
        delay = 1.0
        while True:
            backend = Backend(self.model_dir, self.count)
            try:
                backend.ready()
            except WorkerDied as exc:
                logger.error("the replacement worker could not load the model (%s); again in %.0f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            with self.lock:
                self.alive += 1
            self.idle.put(backend)
            return


def usable_cpus() -> int:
    """The logical CPUs this process may run on, as TorchServe counts them for its default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(environ: Mapping[str, str]) -> int:
    """Workers for the model: SAGEMAKER_MODEL_SERVER_WORKERS, else one per usable logical CPU (TorchServe's
    default without a GPU). inference.py reads the same setting to give each worker its threads."""
    raw = environ.get(WORKERS_SETTING) or ""
    if not raw:
        return usable_cpus()
    try:
        count = int(raw)
    except ValueError as exc:
        raise SystemExit(f"{WORKERS_SETTING}={raw!r} is not a whole number of workers") from exc
    if count < 1:
        raise SystemExit(f"{WORKERS_SETTING}={raw!r}: a model needs at least one worker")
    return count


def make_handler(
    answer: Callable[[bytes, list[tuple[str, str]], str], Answer], healthy: Callable[[], bool] = lambda: True
) -> type[BaseHTTPRequestHandler]:
    """The HTTP front; `answer(body, headers, request_id)` is a worker's (status, phrase, headers, body),
    and `healthy()` whether a worker lives (TorchServe's /ping answers 500 Unhealthy while none does)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle's algorithm and delayed ACKs
        # add about 40 ms to every answer.
        disable_nagle_algorithm = True

        def _send(self, status: int, phrase: str | None, headers: dict, body: bytes, request_id: str) -> None:
            self.send_response(status, phrase)  # None: the status's standard phrase
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("x-request-id", request_id)
            for name, value in CACHE_HEADERS:
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.send_header("connection", "close" if status >= 400 else "keep-alive")
            self.close_connection = status >= 400
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            request_id = str(uuid.uuid4())
            if self.path.split("?")[0].rstrip("/") == "/ping":
                status, word = (200, "Healthy") if healthy() else (500, "Unhealthy")
                body = (json.dumps({"status": word}, indent=2) + "\n").encode()
                self._send(status, None, {"content-type": "application/json"}, body, request_id)
            else:
                self._send(
                    *ts_error(
                        404,
                        "ResourceNotFoundException",
                        "Requested resource is not found, please refer to API document.",
                    ),
                    request_id,
                )

        def do_POST(self) -> None:
            request_id = str(uuid.uuid4())
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.split("?")[0].rstrip("/") != "/invocations":
                self._send(
                    *ts_error(
                        404,
                        "ResourceNotFoundException",
                        "Requested resource is not found, please refer to API document.",
                    ),
                    request_id,
                )
                return
            self._send(*answer(body, list(self.headers.items()), request_id), request_id)

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="the extracted model.tar.gz")
    parser.add_argument("--port", type=int, required=True, help="loopback port to serve on")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"worker processes (default: {WORKERS_SETTING}, else one per logical CPU)",
    )
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    count = args.workers or worker_count(os.environ)
    try:
        workers = Workers(args.model_dir, count)
    except WorkerDied as exc:
        print(f"the model did not load: {exc}", flush=True)
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(workers.answer, workers.healthy))
    print(f"serving {args.model_dir} on 127.0.0.1:{args.port} with {count} worker(s)", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
