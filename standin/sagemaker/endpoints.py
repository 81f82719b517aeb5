"""Model servers: `model_frontend.py` processes in the container-side environment, on loopback ports
(each a front end with its worker processes, as TorchServe serves a model).
`serve_model` is how any of them starts (download and extract the model with the model's role,
start the server with the model container's `Environment`, wait for `/ping`) and `invoke` how any of
them is asked, over kept-alive connections, for endpoints and transform jobs alike. `EndpointHost`
keeps the fleets of each endpoint (`InitialInstanceCount` servers, round robin): an update starts the
new fleet beside the old one and switches only once it answers `/ping` (or, in a blue/green update,
shifts a share of the requests to it first), so requests in flight are not dropped and a model that
fails to load leaves the old one serving.
"""

from __future__ import annotations

import http.client
import io
import itertools
import math
import os
import select
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from standin.launch import free_port

FRONTEND = Path(__file__).resolve().parent / "model_frontend.py"
LOAD_TIMEOUT_S = 180.0


class WorkerFailed(RuntimeError):
    """The model did not load; the message carries the end of the worker's log."""


@dataclass
class ModelServer:
    port: int
    process: subprocess.Popen
    model_dir: Path


@dataclass
class Worker(ModelServer):
    config_name: str


def serve_model(
    model_dir: Path,
    model_data_url: str,
    s3,
    python: str,
    environment: dict[str, str] | None = None,
    load_timeout: float = LOAD_TIMEOUT_S,
    started: Callable[[subprocess.Popen], None] | None = None,
) -> ModelServer:
    """Download `model_data_url` with `s3` (a client acting as the model's execution role, as SageMaker
    downloads it) into the new folder `model_dir`, start a worker there with the model container's
    `environment` (SAGEMAKER_PROGRAM, ...) and wait until it answers /ping. `started` learns the
    process as soon as it exists, so that whoever may have to stop it (a stopped transform job, the
    stand-in shutting down) need not wait for the model to load."""
    bucket, _, key = model_data_url[5:].partition("/")
    model_dir.mkdir(parents=True)
    try:
        archive = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise WorkerFailed(f"could not download the model {model_data_url}: {exc}") from exc
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(model_dir, filter="data")
    except tarfile.TarError as exc:
        raise WorkerFailed(f"{model_data_url} is not a model.tar.gz: {exc}") from exc
    port = free_port()
    CONNECTIONS.started(port)
    log_path = model_dir.with_suffix(".log")
    # The image's torchserve.py puts the model's code/ on PYTHONPATH before TorchServe starts; `-P`
    # keeps this folder (the worker script's) off the path, so the model's modules are found first.
    env = {**os.environ, **(environment or {}), "PYTHONPATH": str(model_dir / "code")}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [python, "-P", str(FRONTEND), "--model-dir", str(model_dir), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if started is not None:
        started(process)
    deadline = time.time() + load_timeout
    while time.time() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text()[-800:]
            raise WorkerFailed(f"the model server exited while loading the model: {tail}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return ModelServer(port, process, model_dir)
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise WorkerFailed(f"the model did not answer /ping within {load_timeout:.0f}s")


class Connections:
    """Kept-alive connections to the model servers, as a load balancer keeps them: a new TCP connection
    per request costs the stand-in and the model server's front end a millisecond or two each."""

    def __init__(self) -> None:
        self.idle: dict[int, list[http.client.HTTPConnection]] = {}
        self.stopped: set[int] = set()  # ports whose server stopped: what comes back there is closed
        self.lock = threading.Lock()

    def take(self, port: int, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to `port` and whether it was kept alive; one the server closed meanwhile is dropped."""
        while True:
            with self.lock:
                pool = self.idle.get(port)
                connection = pool.pop() if pool else None
            if connection is None:
                return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), False
            if connection.sock is None or select.select([connection.sock], [], [], 0)[0]:
                connection.close()  # readable while idle: the server closed it (EOF)
                continue
            connection.sock.settimeout(timeout)
            return connection, True

    def give_back(self, port: int, connection: http.client.HTTPConnection) -> None:
        with self.lock:
            if port not in self.stopped:
                self.idle.setdefault(port, []).append(connection)
                return
        connection.close()

    def started(self, port: int) -> None:
        """A new server listens on `port` (a stopped one's port may be handed out again)."""
        with self.lock:
            self.stopped.discard(port)

    def forget(self, port: int) -> None:
        """Close the connections to a model server that stopped, and those still in use when they come back."""
        with self.lock:
            pool = self.idle.pop(port, [])
            self.stopped.add(port)
        for connection in pool:
            connection.close()


CONNECTIONS = Connections()
# A kept-alive connection that the server closed just as it was reused: sent again, once, on a new one.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def invoke(
    port: int, body: bytes, content_type: str | None, accept: str | None, timeout: float = 60.0
) -> tuple[int, bytes, str]:
    """(status, body, content type) as the model server on `port` answered `POST /invocations`;
    OSError (a timeout included) when it did not answer."""
    headers = {"Content-Type": content_type or "application/octet-stream", "Accept": accept or "*/*"}
    connection, reused = CONNECTIONS.take(port, timeout)
    try:
        return _post(port, connection, body, headers)
    except STALE:
        if not reused:
            raise
    return _post(port, http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), body, headers)


def _post(
    port: int, connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes, str]:
    try:
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    except STALE:
        connection.close()
        raise
    except http.client.HTTPException as exc:
        connection.close()
        raise ConnectionError(f"the model server's answer was cut short: {exc}") from exc
    except OSError:
        connection.close()
        raise
    if response.will_close:
        connection.close()
    else:
        CONNECTIONS.give_back(port, connection)
    return response.status, payload, response.headers.get("Content-Type", "")


def model_server_processes(
    state_dir: str | os.PathLike, scripts: tuple[bytes, ...] = (b"model_frontend.py", b"model_backend.py")
) -> list[int]:
    """PIDs of the model servers' processes (front ends and their workers, or the `scripts` named)
    serving from under `state_dir` (Linux /proc): what an endpoint holds, and what must not outlive it."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while we looked
        if any(w.endswith(scripts) for w in words) and any(str(state_dir).encode() in w for w in words):
            found.append(int(cmdline.parent.name))
    return found


class Fleet:
    """One endpoint configuration's instances (a model server each), taking requests round robin, as
    SageMaker's load balancer spreads them over a variant's instances."""

    def __init__(self, config_name: str, instances: list[Worker]) -> None:
        self.config_name, self.instances = config_name, instances
        self.turn = itertools.count()
        # The configuration's DataCaptureConfig and the model's role, which writes the captures
        # (set by the backend once the fleet serves; None: nothing captured).
        self.capture: tuple[dict, str] | None = None

    def next_port(self) -> int:
        return self.instances[next(self.turn) % len(self.instances)].port


class EndpointHost:
    """The fleets behind each endpoint: the one in service (blue) and, during a blue/green update, the
    new one (green) with the share of requests it gets. The split is a weighted round robin, not a
    random draw: with a share p, request i goes to green when floor((i + 1) p) > floor(i p), so that
    exactly p of any run of requests reaches green and a drill can count what clients saw."""

    def __init__(self, root: Path, python: str, s3_factory, load_timeout: float = LOAD_TIMEOUT_S) -> None:
        self.root, self.python, self.s3_factory, self.load_timeout = root, python, s3_factory, load_timeout
        self.live: dict[str, Fleet] = {}
        self.green: dict[str, tuple[Fleet, float]] = {}  # endpoint -> (new fleet, its share of requests)
        self.requests: dict[str, itertools.count] = {}
        self.retiring: list[Worker] = []  # replaced by an update, finishing their requests
        self.lock = threading.Lock()

    def start(
        self,
        endpoint: str,
        config_name: str,
        model_data_url: str,
        role_arn: str,
        environment: dict[str, str] | None = None,
        instances: int = 1,
    ) -> Fleet:
        """`instances` model servers of the model of `config_name`, each loaded and answering /ping
        (started side by side); if one fails, those already up are stopped and WorkerFailed says why."""
        stamp = int(time.time() * 1000)
        started: list[Worker] = []
        failures: list[Exception] = []

        def one(number: int) -> None:
            model_dir = self.root / endpoint / f"{config_name}-{stamp}-{number}"
            try:
                server = serve_model(
                    model_dir,
                    model_data_url,
                    self.s3_factory(role_arn),
                    self.python,
                    environment,
                    self.load_timeout,
                )
            except Exception as exc:  # handed to the caller below, once every instance has ended
                failures.append(exc)
                return
            started.append(Worker(server.port, server.process, server.model_dir, config_name))

        threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(1, instances + 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            for worker in started:
                self._retire(worker)
            raise failures[0]
        return Fleet(config_name, sorted(started, key=lambda w: w.model_dir.name))

    def switch(self, endpoint: str, fleet: Fleet, retire_after: float = 5.0) -> None:
        """`fleet` takes every request; the fleet it replaces (and a green one being given up) is
        stopped `retire_after` seconds later, once the requests it holds have finished."""
        with self.lock:
            old = self.live.get(endpoint)
            self.live[endpoint] = fleet
            green = self.green.pop(endpoint, None)
        for replaced in (old, green[0] if green else None):
            if replaced is not None and replaced is not fleet:
                self._retire_later(replaced, retire_after)

    def resize(self, endpoint: str, count: int, start_more: Callable[[int], Fleet]) -> None:
        """The live fleet to `count` instances: `start_more(n)` starts n more beside the running ones
        (they take requests once each answers /ping), or the last ones stop taking requests and are
        retired once theirs finish. KeyError when nothing serves `endpoint`."""
        with self.lock:
            have = len(self.live[endpoint].instances)
        if count > have:
            extra = start_more(count - have)
            with self.lock:
                fleet = self.live.get(endpoint)
                if fleet is not None:
                    fleet.instances = fleet.instances + extra.instances
            if fleet is None:  # deleted meanwhile
                self._retire_later(extra, 0.0)
                raise KeyError(endpoint)
        elif count < have:
            with self.lock:
                fleet = self.live[endpoint]
                kept, dropped = fleet.instances[:count], fleet.instances[count:]
                fleet.instances = kept
            self._retire_later(Fleet(fleet.config_name, dropped), 5.0)

    def route(self, endpoint: str, fleet: Fleet, share: float) -> None:
        """Send `share` (0 to 1) of `endpoint`'s requests to `fleet`, the rest to the live one."""
        with self.lock:
            self.green[endpoint] = (fleet, share)

    def abandon(self, endpoint: str) -> None:
        """Every request back to the live fleet; the green one is stopped once its requests finish."""
        with self.lock:
            green = self.green.pop(endpoint, None)
        if green is not None:
            self._retire_later(green[0], 5.0)

    def _retire_later(self, fleet: Fleet, delay: float) -> None:
        # The timer thread is a daemon when the update runs in one, so stop_all must know these workers
        # too: a stand-in stopping within these seconds would otherwise leave them running.
        with self.lock:
            self.retiring.extend(fleet.instances)
        for worker in fleet.instances:
            timer = threading.Timer(delay, self._retire, args=(worker,))
            timer.daemon = True
            timer.start()

    def _retire(self, worker: Worker) -> None:
        worker.process.terminate()
        CONNECTIONS.forget(worker.port)
        with self.lock:
            if worker in self.retiring:
                self.retiring.remove(worker)

    def stop(self, endpoint: str) -> None:
        with self.lock:
            fleet = self.live.pop(endpoint, None)
            green = self.green.pop(endpoint, None)
        for stopped in (fleet, green[0] if green else None):
            for worker in stopped.instances if stopped else ():
                worker.process.terminate()
                CONNECTIONS.forget(worker.port)

    def stop_all(self) -> None:
        for name in list(self.live) + list(self.green):
            self.stop(name)
        for worker in list(self.retiring):
            self._retire(worker)

    def pick(self, endpoint: str) -> tuple[Fleet, int]:
        """The fleet and the instance's port that the next request of `endpoint` goes to."""
        with self.lock:
            fleet = self.live.get(endpoint)
            if fleet is None:
                raise KeyError(endpoint)
            green, share = self.green.get(endpoint, (None, 0.0))
            number = next(self.requests.setdefault(endpoint, itertools.count()))
            if green is not None and math.floor((number + 1) * share) > math.floor(number * share):
                fleet = green
            return fleet, fleet.next_port()

    def invoke(
        self, endpoint: str, body: bytes, content_type: str | None, accept: str | None, timeout: float = 60.0
    ) -> tuple[int, bytes, str]:
        """(status, body, content type) as the endpoint's model server answered."""
        _, port = self.pick(endpoint)
        return invoke(port, body, content_type, accept, timeout)
