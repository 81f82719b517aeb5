"""The stand-in's model server (standin/sagemaker/model_frontend.py) as a process: its front end starts the
workers the model asks for, serves through them, and refuses to serve a model that does not load."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from standin.sagemaker.endpoints import model_server_processes
from tests.conftest import REPO, make_bin_image

SERVER = REPO / "standin" / "sagemaker" / "model_frontend.py"


def start(model_dir, workers: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-P", str(SERVER), "--model-dir", str(model_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(model_dir / "code"), "SAGEMAKER_MODEL_SERVER_WORKERS": workers},
    )
    return process, port


def test_the_front_end_serves_through_the_workers_the_model_asks_for(trained_model, tmp_path):
    model_dir, _ = trained_model
    served = tmp_path / "served"
    shutil.copytree(model_dir, served)
    process, port = start(served, "2")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.3)
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
