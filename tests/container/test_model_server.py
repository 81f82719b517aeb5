"""The stand-in's model server (standin/sagemaker/model_frontend.py) as a process: its front end starts the
workers the model asks for, serves through them, refuses to serve a model that does not load, and
keeps TorchServe's limits as the image's inference toolkit configures them."""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from standin.sagemaker import model_frontend
from standin.sagemaker.endpoints import model_server_processes
from tests.conftest import REPO, make_bin_image, png_padded_to

SERVER = REPO / "standin" / "sagemaker" / "model_frontend.py"


def start(model_dir, workers: str, **settings: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-P", str(SERVER), "--model-dir", str(model_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(model_dir / "code"),
            "SAGEMAKER_MODEL_SERVER_WORKERS": workers,
            **settings,
        },
    )
    return process, port


def wait_serving(process: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return
        except OSError:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.3)
    raise AssertionError("the model server did not answer /ping")


def test_the_front_end_serves_through_the_workers_the_model_asks_for(trained_model, tmp_path):
    model_dir, _ = trained_model
    served = tmp_path / "served"
    shutil.copytree(model_dir, served)
    process, port = start(served, "2")
    try:
        wait_serving(process, port)
        assert len(model_server_processes(served, (b"model_backend.py",))) == 2
        image = make_bin_image(1, 1)

        def ask(_):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=image,
                method="POST",
                headers={"Content-Type": "image/jpeg"},
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())["count"]

        with ThreadPoolExecutor(4) as pool:  # more requests than workers: they wait their turn
            counts = list(pool.map(ask, range(8)))
        assert len(set(counts)) == 1  # one model, one answer for one photo
    finally:
        process.terminate()
        process.wait(timeout=20)
    deadline = time.time() + 10  # the workers end with their front end
    while model_server_processes(served) and time.time() < deadline:
        time.sleep(0.2)
    assert model_server_processes(served) == []


def test_a_model_that_does_not_load_is_not_served_and_the_log_says_why(trained_model, tmp_path):
    model_dir, _ = trained_model
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    code = broken / "code" / "inference.py"
    code.write_text(code.read_text() + "\n\ndef model_fn(model_dir):\n    raise RuntimeError('weights missing')\n")
    process, _ = start(broken, "2")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "the model did not load" in output and "RuntimeError: weights missing" in output
    assert model_server_processes(broken) == []


# -- TorchServe's settings, as the image's toolkit writes them ------------------------------------------
TOOLKIT_ETC = Path(importlib.util.find_spec("sagemaker_pytorch_serving_container").origin).parent / "etc"


def test_the_properties_are_the_toolkits_own_file_read_as_torchserve_reads_it():
    properties = model_frontend.server_properties({"PATH": "/usr/bin:/bin"})
    # Every setting of the installed toolkit's default-ts.properties is there...
    shipped = model_frontend.java_properties((TOOLKIT_ETC / "default-ts.properties").read_text())
    assert shipped["enable_envvars_config"] == "true"
    assert {k: v for k, v in properties.items() if k in shipped and k != "enable_model_api"} == {
        k: v for k, v in shipped.items() if k != "enable_model_api"
    }
    assert properties["default_service_handler"] == "sagemaker_pytorch_serving_container.handler_service:handle"
    # ...but the file (2.0.25) lacks its last newline, so the toolkit's first line of its own joins
    # its last one: TorchServe never sees default_response_timeout=60 and keeps its own 120 s.
    assert properties["enable_model_api"] == "truedefault_response_timeout=60"
    limits = model_frontend.server_limits(properties)
    # What the file sets none of: TorchServe 0.12.0's defaults (ConfigManager.java).
    assert (limits.max_request_size, limits.max_response_size) == (6553500, 6553500)
    assert (limits.default_response_timeout, limits.job_queue_size, limits.default_workers_per_model) == (120, 100, 0)


def test_ts_variables_and_the_toolkits_settings_override_the_defaults():
    environ = {"PATH": "/usr/bin:/bin", "TS_MAX_REQUEST_SIZE": "1000", "TS_JOB_QUEUE_SIZE": "7"}
    environ |= {"SAGEMAKER_MODEL_SERVER_WORKERS": "3", "TS_DEFAULT_RESPONSE_TIMEOUT": "9"}
    limits = model_frontend.server_limits(model_frontend.server_properties(environ))
    assert (limits.max_request_size, limits.job_queue_size, limits.default_response_timeout) == (1000, 7, 9)
    assert limits.max_response_size == 6553500
    assert limits.default_workers_per_model == 3  # the toolkit writes SAGEMAKER_MODEL_SERVER_WORKERS there
    assert model_frontend.worker_count(environ, limits) == 3


def test_properties_are_parsed_as_java_util_properties():
    text = "# comment\n! also\n  a = b\\\n    c\nk:v\\\\\nkey\\ x=1\n\\u0041 \\u0042\nempty\nk=again"
    assert model_frontend.java_properties(text) == {"a": "bc", "k": "again", "key x": "1", "A": "B", "empty": ""}


def hold_on_marker(code: Path) -> None:
    """inference.py whose input_fn, given a body starting with HOLD, says so in a file and waits until
    another file exists (or for ever)."""
    code.write_text(
        code.read_text()
        + """

import os as _os
import time as _time

_input_fn = input_fn


def input_fn(request_body, request_content_type):
    if bytes(request_body).startswith(b"HOLD"):
        open(_os.environ["HOLD_STARTED"], "w").close()
        while not _os.path.exists(bytes(request_body)[4:].decode()):
            _time.sleep(0.05)
    return _input_fn(request_body, request_content_type)
"""
    )


def post(port: int, body: bytes, connection: http.client.HTTPConnection | None = None) -> tuple[int, str, bytes]:
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/invocations", body=body, headers={"Content-Type": "application/x-image"})
    answer = connection.getresponse()
    return answer.status, answer.reason, answer.read()


def test_torchserves_limits_from_ts_variables_are_kept(trained_model, tmp_path):
    """TorchServe's max_request_size, job_queue_size and default_response_timeout, set through TS_*
    variables (as a transform job's or a model's Environment sets them), on one worker."""
    model_dir, _ = trained_model
    served = tmp_path / "served"
    shutil.copytree(model_dir, served)
    hold_on_marker(served / "code" / "inference.py")
    started, release = tmp_path / "started", tmp_path / "release"
    limit = 20_000
    settings = {"TS_MAX_REQUEST_SIZE": str(limit), "TS_JOB_QUEUE_SIZE": "1", "TS_DEFAULT_RESPONSE_TIMEOUT": "5"}
    process, port = start(served, "1", HOLD_STARTED=str(started), **settings)
    try:
        wait_serving(process, port)
        # Over max_request_size: Netty's bare 413, and the kept-alive connection serves the next request.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        assert post(port, png_padded_to(limit + 1), connection) == (413, "Request Entity Too Large", b"")
        status, _, body = post(port, png_padded_to(limit), connection)
        assert status == 200 and json.loads(body)["count"] in range(6)

        # The worker held: one request waits in the queue of one, the next gets TorchServe's 503.
        held = ThreadPoolExecutor(3)
        first = held.submit(post, port, b"HOLD" + str(release).encode())
        while not started.exists():
            time.sleep(0.05)
        image = make_bin_image(1, 1)
        queued = [held.submit(post, port, image) for _ in range(2)]
        refused = next(as_completed(queued, timeout=60))  # the one that found the queue full
        status, _, body = refused.result()
        assert (status, json.loads(body)["type"]) == (503, "ServiceUnavailableException")
        assert "has no worker to serve inference request" in json.loads(body)["message"]
        release.touch()
        assert first.result()[0] == 415  # "HOLD..." is no image: the model's own refusal
        assert sorted(f.result()[0] for f in queued) == [200, 503]

        # No answer within default_response_timeout: "Worker died." 500, and the worker is replaced.
        started.unlink()
        status, _, body = post(port, b"HOLD" + str(tmp_path / "never").encode())
        assert (status, json.loads(body)) == (
            500,
            {"code": 500, "type": "InternalServerException", "message": "Worker died."},
        )
        assert post(port, image)[0] == 200
        held.shutdown()
    finally:
        process.terminate()
        process.wait(timeout=20)
