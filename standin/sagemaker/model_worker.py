"""A model server for one endpoint (or one transform instance), in the container-side environment:
`GET /ping` and `POST /invocations` as SageMaker's PyTorch inference image answers them. Like TorchServe
in that image, it is a front end and worker processes: this process takes the HTTP requests and hands
each to an idle worker (`model_backend.py`, which serves through the image's own inference toolkit);
a request waits while every worker is busy.

  PYTHONPATH=<model dir>/code .venv-container/bin/python -P standin/sagemaker/model_worker.py \\
      --model-dir <extracted model.tar.gz> --port 8080 [--workers N]

Workers: SAGEMAKER_MODEL_SERVER_WORKERS, the inference toolkit's setting (it becomes TorchServe's
`default_workers_per_model`); unset, TorchServe starts one per logical CPU. Each worker loads the model
itself, as TorchServe's do, so each holds its own memory; inference.py gives each its share of the
cores. The front end answers `/ping` once every worker has loaded the model, and exits when one fails
to, with the worker's traceback in the log. A worker that dies is replaced; its request is answered
as TorchServe answers a failed prediction.

What is ours, in place of TorchServe's Java front end: the HTTP front, and the answer as its
`RestJob` and `NettyUtils` send it: TorchServe's cache headers and `x-request-id` on every answer,
its ErrorResponse JSON for its own errors, and `{"status": "Healthy"}` on `/ping`. The front end
imports neither torch nor the toolkit, so it holds a few MB; the workers hold the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run with -P: the model's code/ (PYTHONPATH) comes first, then this folder
    sys.path.append(str(HERE))

from model_backend import ts_error  # noqa: E402 - after the path is set

BACKEND = HERE / "model_backend.py"
WORKERS_SETTING = "SAGEMAKER_MODEL_SERVER_WORKERS"
# Every answer of TorchServe's front end (NettyUtils.sendHttpResponse) carries these.
CACHE_HEADERS = (("Pragma", "no-cache"), ("Cache-Control", "no-cache; no-store, must-revalidate, private"),
                 ("Expires", "Thu, 01 Jan 1970 00:00:00 UTC"))

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    pass


class Backend:
    """One worker process and the socket to it."""

    def __init__(self, model_dir: str) -> None:
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-P", str(BACKEND), "--model-dir", model_dir,
                                         "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self.connection = Connection(ours.detach())

    def ready(self) -> None:
        """Wait until the worker has loaded the model; WorkerDied when it could not."""
        try:
            if self.connection.recv() != "ready":
                raise WorkerDied("the worker sent something else than ready")
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"the worker exited while loading the model (exit status {self.process.wait()})") from exc

    def ask(self, body: bytes, headers: list[tuple[str, str]], request_id: str) -> tuple:
        try:
            self.connection.send((body, headers, request_id))
            return self.connection.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDied(str(exc)) from exc

    def stop(self) -> None:
        self.connection.close()
        if self.process.poll() is None:
            self.process.terminate()


class Workers:
    """The model's workers; a request takes an idle one and gives it back."""

    def __init__(self, model_dir: str, count: int) -> None:
        self.model_dir = model_dir
        self.idle: queue.Queue[Backend] = queue.Queue()
        started = [Backend(model_dir) for _ in range(count)]
        try:
            for backend in started:  # they load side by side
                backend.ready()
        except WorkerDied:
            for backend in started:
                backend.stop()
            raise
        for backend in started:
            self.idle.put(backend)

    def answer(self, body: bytes, headers: list[tuple[str, str]], request_id: str) -> tuple:
        backend = self.idle.get()
        try:
            result = backend.ask(body, headers, request_id)
        except WorkerDied:
            logger.error("a model worker died (exit status %s); starting another", backend.process.wait())
            threading.Thread(target=self._replace, args=(backend,), daemon=True).start()
            return ts_error(503, "InternalServerException", "Prediction failed")
        self.idle.put(backend)
        return result

    def _replace(self, dead: Backend) -> None:
        dead.stop()
        backend = Backend(self.model_dir)
        try:
            backend.ready()
        except WorkerDied:
            logger.error("the replacement worker could not load the model either")
            return
        self.idle.put(backend)


def worker_count(environ: dict, cpus: int | None = None) -> int:
    raw = environ.get(WORKERS_SETTING) or ""
    if not raw:
        return cpus or os.cpu_count() or 1  # TorchServe: one per logical processor without a GPU
    try:
        count = int(raw)
    except ValueError as exc:
        raise SystemExit(f"{WORKERS_SETTING}={raw!r} is not a whole number of workers") from exc
    if count < 1:
        raise SystemExit(f"{WORKERS_SETTING}={raw!r}: a model needs at least one worker")
    return count


def make_handler(answer: Callable[[bytes, list[tuple[str, str]], str], tuple]):
    """The HTTP front; `answer(body, headers, request_id)` is a worker's (status, phrase, headers, body)."""

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
                body = (json.dumps({"status": "Healthy"}, indent=2) + "\n").encode()
                self._send(200, None, {"content-type": "application/json"}, body, request_id)
            else:
                self._send(*ts_error(404, "ResourceNotFoundException",
                                     "Requested resource is not found, please refer to API document."), request_id)

        def do_POST(self) -> None:
            request_id = str(uuid.uuid4())
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.split("?")[0].rstrip("/") != "/invocations":
                self._send(*ts_error(404, "ResourceNotFoundException",
                                     "Requested resource is not found, please refer to API document."), request_id)
                return
            self._send(*answer(body, list(self.headers.items()), request_id), request_id)

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="the extracted model.tar.gz")
    parser.add_argument("--port", type=int, required=True, help="loopback port to serve on")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"worker processes (default: {WORKERS_SETTING}, else one per logical CPU)")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    count = args.workers or worker_count(os.environ)
    try:
        workers = Workers(args.model_dir, count)
    except WorkerDied as exc:
        print(f"the model did not load: {exc}", flush=True)
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(workers.answer))
    print(f"serving {args.model_dir} on 127.0.0.1:{args.port} with {count} worker(s)", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
