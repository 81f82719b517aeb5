"""A model server for one endpoint (or one transform instance), in the container-side environment:
`GET /ping` and `POST /invocations` as SageMaker's PyTorch inference image answers them. Like TorchServe
in that image, it is a front end and worker processes: this process takes the HTTP requests and hands
each to an idle worker (`model_backend.py`, which serves through the image's own inference toolkit);
a request waits in the job queue while every worker is busy.

  PYTHONPATH=<model dir>/code .venv-container/bin/python -P standin/sagemaker/model_frontend.py \\
      --model-dir <extracted model.tar.gz> --port 8080 [--workers N]

Its limits are TorchServe's, from the properties the image would start TorchServe with
(`server_properties`): the file the image's inference toolkit writes (its own
`_generate_ts_config_properties`, run here in a child process, read as java.util.Properties reads it),
`TS_*` environment variables over it (the toolkit's file sets `enable_envvars_config=true`), and
TorchServe 0.12.0's own defaults for what neither sets (`TS_DEFAULTS`). So a request above
`max_request_size` gets Netty's bare 413, a request that finds `job_queue_size` requests already
waiting gets TorchServe's 503, and a worker that answers nothing within `default_response_timeout`
seconds, or more than `max_response_size` bytes, is killed and replaced and its request answered 500
"Worker died.", as TorchServe's WorkerThread does.

Workers: `default_workers_per_model` (the toolkit writes SAGEMAKER_MODEL_SERVER_WORKERS there), else
one per GPU, else one per logical CPU, as TorchServe's ConfigManager.getDefaultWorkers. Each worker
loads the model itself, as TorchServe's do, so each holds its own memory; inference.py gives each its
share of the cores. The front end answers `/ping` once every worker has loaded the model, and exits
when one fails to, with the worker's traceback in the log. A worker that dies is replaced (retried
with backoff); `/ping` is 500 Unhealthy while no worker lives.

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
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


# -- TorchServe's settings ----------------------------------------------------------------------------
# The image's toolkit writes TorchServe's config file with its own code; run in a child process so
# that this front end imports no toolkit. `-W ignore`: torchserve.py's pkg_resources deprecation warning.
TOOLKIT_CONFIG = (
    "from sagemaker_pytorch_serving_container import torchserve\n"
    "print(torchserve._generate_ts_config_properties(torchserve.DEFAULT_HANDLER_SERVICE), end='')\n"
)
# TorchServe 0.12.0's defaults for what the file sets none of (frontend/.../util/ConfigManager.java:
# getMaxRequestSize, getMaxResponseSize, getDefaultResponseTimeout, getJobQueueSize,
# getConfiguredDefaultWorkersPerModel; docs/configuration.md). number_of_gpu: no limit beyond the GPUs found.
TS_DEFAULTS = {
    "max_request_size": 6553500,
    "max_response_size": 6553500,
    "default_response_timeout": 120,
    "job_queue_size": 100,
    "default_workers_per_model": 0,
    "number_of_gpu": 2**31 - 1,
}


@dataclass(frozen=True)
class ServerLimits:
    max_request_size: int = TS_DEFAULTS["max_request_size"]
    max_response_size: int = TS_DEFAULTS["max_response_size"]
    default_response_timeout: int = TS_DEFAULTS["default_response_timeout"]
    job_queue_size: int = TS_DEFAULTS["job_queue_size"]
    default_workers_per_model: int = TS_DEFAULTS["default_workers_per_model"]
    number_of_gpu: int = TS_DEFAULTS["number_of_gpu"]


def _unescape(text: str) -> str:
    """java.util.Properties' escapes: \\t \\n \\r \\f, \\uXXXX, and a backslash before any other character."""
    controls = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}

    def one(match: re.Match) -> str:
        code = match.group(1)
        return chr(int(code[1:], 16)) if len(code) == 5 else controls.get(code, code)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", one, text, flags=re.DOTALL)


def _key_and_value(line: str) -> tuple[str, str]:
    """A logical line split as Properties.load splits it: the key ends at the first unescaped `=`, `:`
    or white space; white space and one `=` or `:` after it are dropped; the rest is the value."""
    end, escaped = 0, False
    while end < len(line) and (escaped or line[end] not in "=: \t\f"):
        escaped = not escaped and line[end] == "\\"
        end += 1
    rest = line[end:].lstrip(" \t\f")
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(" \t\f")
    return _unescape(line[:end]), _unescape(rest)


def java_properties(text: str) -> dict[str, str]:
    """`text` as java.util.Properties.load reads it, as TorchServe reads its config file: comment lines
    (`#`, `!`), a line ending in an odd number of backslashes continued on the next, the last of a
    repeated key kept. Where a file lacks its last newline, what is appended to it joins its last line."""
    found: dict[str, str] = {}
    lines = iter(re.split(r"\r\n|\r|\n", text))
    for raw in lines:
        line = raw.lstrip(" \t\f")
        if not line or line[0] in "#!":
            continue
        while (len(line) - len(line.rstrip("\\"))) % 2:
            line = line[:-1] + next(lines, "").lstrip(" \t\f")
        key, value = _key_and_value(line)
        found[key] = value
    return found


def toolkit_config(environ: Mapping[str, str]) -> str:
    """The config file the image's inference toolkit writes before it starts TorchServe
    (`torchserve._generate_ts_config_properties`), with the container's environment `environ`."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", TOOLKIT_CONFIG],
        env=dict(environ),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"the inference toolkit did not write TorchServe's config: {done.stderr[-800:]}")
    return done.stdout


def server_properties(environ: Mapping[str, str]) -> dict[str, str]:
    """The properties TorchServe would start with in the image: the toolkit's config file, then, with
    `enable_envvars_config` true (the toolkit's default-ts.properties sets it), a `TS_<NAME>` variable
    over each property the stand-in honours (ConfigManager.setSystemVars reads one per TS_ field)."""
    properties = java_properties(toolkit_config(environ))
    if properties.get("enable_envvars_config", "false").lower() == "true":  # Boolean.parseBoolean
        for key in TS_DEFAULTS:
            if f"TS_{key.upper()}" in environ:
                properties[key] = environ[f"TS_{key.upper()}"]
    return properties


def server_limits(properties: Mapping[str, str]) -> ServerLimits:
    """TorchServe's limits from its properties; what they set none of, TorchServe's defaults. A value
    Integer.parseInt refuses stops TorchServe at its start, so it stops this server."""
    if "models" in properties:  # the toolkit writes it for SAGEMAKER_TS_* (per-model workers, timeout)
        raise SystemExit("SAGEMAKER_TS_* per-model settings are not honoured by the local stand-in")
    values = {}
    for key, default in TS_DEFAULTS.items():
        raw = properties.get(key)
        if raw is not None and not re.fullmatch(r"[+-]?[0-9]+", raw):
            raise SystemExit(f"TorchServe would not start: {key}={raw!r} is not a whole number")
        values[key] = default if raw is None else int(raw)
    return ServerLimits(**values)


def usable_cpus() -> int:
    """The logical CPUs this process may run on, as TorchServe counts them for its default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_gpus(environ: Mapping[str, str]) -> int:
    """GPUs as TorchServe's ConfigManager.getAvailableGpu counts them: CUDA_VISIBLE_DEVICES' entries,
    else nvidia-smi's list, else none."""
    visible = environ.get("CUDA_VISIBLE_DEVICES") or ""
    if visible:
        return len(visible.split(","))
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    lines = listed.stdout.split()
    return len(lines) - 1 if listed.returncode == 0 and lines[:1] == ["index"] else 0


def worker_count(environ: Mapping[str, str], limits: ServerLimits) -> int:
    """Workers for the model, as ConfigManager.getDefaultWorkers: default_workers_per_model, else one
    per GPU, else one per usable logical CPU. SAGEMAKER_MODEL_SERVER_WORKERS that is not a whole number
    of at least one is refused: inference.py, which reads it for its threads, refuses it in the image."""
    raw = environ.get(WORKERS_SETTING) or ""
    if raw and not (raw.isdigit() and int(raw) >= 1):
        raise SystemExit(f"{WORKERS_SETTING}={raw!r}: a model needs a whole number of workers, at least one")
    if limits.default_workers_per_model < 0:
        raise SystemExit(f"default_workers_per_model={limits.default_workers_per_model}: at least one worker")
    return limits.default_workers_per_model or min(available_gpus(environ), limits.number_of_gpu) or usable_cpus()


# -- the workers ----------------------------------------------------------------------------------------
class WorkerDied(RuntimeError):
    pass


class WorkerTimedOut(WorkerDied):
    """No answer within the response timeout."""


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

    def ask(self, body: bytes, headers: list[tuple[str, str]], request_id: str, timeout: float) -> Answer:
        """The worker's (status, phrase, headers, body); WorkerTimedOut when it gave none within
        `timeout` seconds, WorkerDied when it gave none."""
        try:
            self.connection.send((body, headers, request_id))
            if not self.connection.poll(timeout):
                raise WorkerTimedOut(f"no answer within {timeout} s")
            return self.connection.recv()
        except WorkerDied:
            raise
        except Exception as exc:  # a closed socket, or an answer that does not unpickle: the worker is lost
            raise WorkerDied(f"{type(exc).__name__}: {exc}") from exc

    def stop(self) -> None:
        self.connection.close()
        if self.process.poll() is None:
            self.process.terminate()


# TorchServe 0.12.0's answer when the model's job queue is full (ApiUtils.addRESTInferenceJob:
# getStreamingInferenceErrorResponseMessage, no model version on /invocations).
NO_WORKER = (
    "ServiceUnavailableException",
    'Model "model" has no worker to serve inference request. Please use scale workers API to add workers. '
    "If this is a sequence inference, please check if it is closed, or expired; or exceeds maxSequenceJobQueueSize",
)
# WorkerThread's answer to the request of a worker that timed out or whose answer its decoder refused
# (over max_response_size): the worker is killed and restarted, the request gets 500.
WORKER_DIED = ("InternalServerException", "Worker died.")


class Workers:
    """The model's workers; a request takes an idle one and gives it back. A worker that dies is
    replaced, retried with backoff while its model will not load; `/ping` is unhealthy while none lives.
    At most `job_queue_size` requests wait for a worker, as in TorchServe's job queue; more get 503."""

    def __init__(self, model_dir: str, count: int, limits: ServerLimits | None = None) -> None:
        self.model_dir, self.count, self.limits = model_dir, count, limits or ServerLimits()
        self.idle: queue.Queue[Backend] = queue.Queue()
        self.lock = threading.Lock()
        self.waiting = 0
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

    def _take(self) -> Backend | None:
        """An idle worker, waiting for one in the job queue; None when the queue is full."""
        with self.lock:
            if self.waiting >= self.limits.job_queue_size:
                return None
            self.waiting += 1
        try:
            return self.idle.get()
        finally:
            with self.lock:
                self.waiting -= 1

    def answer(self, body: bytes, headers: list[tuple[str, str]], request_id: str) -> Answer:
        backend = self._take()
        if backend is None:
            return ts_error(503, *NO_WORKER)
        try:
            result = backend.ask(body, headers, request_id, self.limits.default_response_timeout)
        except WorkerTimedOut as exc:
            self._lose(backend, str(exc))
            return ts_error(500, *WORKER_DIED)
        except WorkerDied as exc:
            self._lose(backend, f"{exc}, exit status {backend.process.poll()}")
            return ts_error(503, "InternalServerException", "Prediction failed")
        if len(result[3]) > self.limits.max_response_size:
            self._lose(backend, f"its answer is {len(result[3])} bytes, over max_response_size")
            return ts_error(500, *WORKER_DIED)
        self.idle.put(backend)
        return result

    def _lose(self, backend: Backend, why: str) -> None:
        logger.error("a model worker is lost (%s); starting another", why)
        with self.lock:
            self.alive -= 1
        threading.Thread(target=self._replace, args=(backend,), daemon=True).start()

    def _replace(self, dead: Backend) -> None:
        dead.stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            dead.process.wait(timeout=10)
        if dead.process.poll() is None:  # a worker stuck in native code ignores SIGTERM
            dead.process.kill()
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


# -- the HTTP front -------------------------------------------------------------------------------------
def make_handler(
    answer: Callable[[bytes, list[tuple[str, str]], str], Answer],
    healthy: Callable[[], bool] = lambda: True,
    max_request_size: int = TS_DEFAULTS["max_request_size"],
) -> type[BaseHTTPRequestHandler]:
    """The HTTP front; `answer(body, headers, request_id)` is a worker's (status, phrase, headers, body),
    and `healthy()` whether a worker lives (TorchServe's /ping answers 500 Unhealthy while none does).
    A body over `max_request_size` bytes never reaches either (`refuse_too_large`)."""

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

        def refuse_too_large(self, length: int) -> None:
            """Netty's HttpObjectAggregator(max_request_size), before any TorchServe handler, on a
            Content-Length over the limit: `413 Request Entity Too Large` with no body and no
            TorchServe header; the body is read and dropped, and a kept-alive connection stays open
            (netty 4.1.53, HttpObjectAggregator.handleOversizedMessage)."""
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:  # the client went away
                    self.close_connection = True
                    return
                length -= len(chunk)
            self.send_response(413, "Request Entity Too Large")
            self.send_header("content-length", "0")
            if self.close_connection:  # the client asked for it (or HTTP/1.0): Netty's TOO_LARGE_CLOSE
                self.send_header("connection", "close")
            self.end_headers()

        def do_POST(self) -> None:
            request_id = str(uuid.uuid4())
            length = int(self.headers.get("Content-Length", 0))
            if length > max_request_size:
                self.refuse_too_large(length)
                return
            body = self.rfile.read(length)
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
        help="worker processes (default: TorchServe's default_workers_per_model, else one per GPU or CPU)",
    )
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    limits = server_limits(server_properties(os.environ))
    count = args.workers or worker_count(os.environ, limits)
    try:
        workers = Workers(args.model_dir, count, limits)
    except WorkerDied as exc:
        print(f"the model did not load: {exc}", flush=True)
        return 1
    handler = make_handler(workers.answer, workers.healthy, limits.max_request_size)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"serving {args.model_dir} on 127.0.0.1:{args.port} with {count} worker(s); {limits}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
