"""Fixtures for the container-side suite: running train.py the way SageMaker runs it."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

TRAIN = REPO / "sagemaker_code" / "train.py"
# Small and fast: a 32 px MobileNetV2 from scratch trains an epoch on ~20 images in about a second.
FAST = [
    "--arch",
    "mobilenet_v2",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "1",
    "--eval-batch-size",
    "16",
]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without SageMaker variables, and with the network closed: any
    download attempt fails at once instead of depending on the machine's internet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update(
        {
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "https_proxy": "http://127.0.0.1:9",
            "http_proxy": "http://127.0.0.1:9",
        }
    )
    env.update(extra)
    return env


# A process that has imported torch and torchvision once, and forks for each run: the child takes the
# run's environment, argv and output files and runs train.py as `python train.py` would (runpy, as
# __main__, with its folder first on sys.path), so each run is still a process of its own with its own
# exit status, and none of our modules is imported before its run. What it saves is the ~3 s of heavy
# imports per run. No torch operation runs in it before a fork (so no thread pool is copied).
ZYGOTE_CODE = r"""
import json, os, runpy, sys, traceback
import PIL.Image, torch, torchvision
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = [job["script"], *job["args"]]
        sys.path[0] = os.path.dirname(job["script"])
        code = 0
        try:
            runpy.run_path(job["script"], run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class Zygote:
    """ZYGOTE_CODE's process, started on the first run and kept for the session."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def run(self, script: Path, args: list[str], env: dict[str, str], timeout: float, work: Path) -> Run:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", ZYGOTE_CODE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=clean_env(),
                )
                atexit.register(self.proc.kill)
            out, err = work / "stdout", work / "stderr"
            job = {"script": str(script), "args": args, "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            expired = threading.Event()
            timer = threading.Timer(timeout, lambda: (expired.set(), os.kill(pid, signal.SIGKILL)))
            timer.start()
            try:
                status = json.loads(self.proc.stdout.readline())["status"]
            finally:
                timer.cancel()
            if expired.is_set():
                raise subprocess.TimeoutExpired([str(script), *args], timeout)
            return Run(status, out.read_text(errors="replace"), err.read_text(errors="replace"))


ZYGOTE = Zygote()


def run_train(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> Run:
    """train.py run as SageMaker's toolkit runs an entry point: a process, its argv and its environment.
    A PYTHONPATH (which must act before the first import) gets a fresh interpreter."""
    env = env or clean_env()
    if "PYTHONPATH" in env:
        proc = subprocess.run(
            [sys.executable, str(TRAIN), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)
    with tempfile.TemporaryDirectory(prefix="train-run-") as work:
        return ZYGOTE.run(TRAIN, args, env, timeout, Path(work))


@pytest.fixture(scope="session")
def trained_model(split_channels, tmp_path_factory) -> tuple[Path, Run]:
    """A tiny model trained once through the SageMaker environment contract."""
    work = tmp_path_factory.mktemp("trained")
    env = clean_env(
        SM_CHANNEL_TRAIN=str(split_channels["train"]),
        SM_CHANNEL_VALIDATION=str(split_channels["validation"]),
        SM_CHANNEL_TEST=str(split_channels["test"]),
        SM_MODEL_DIR=str(work / "model"),
        SM_OUTPUT_DATA_DIR=str(work / "output"),
        TRAINING_JOB_NAME="bin-count-test-job",
    )
    run = run_train(
        [
            *FAST,
            "--epochs",
            "2",
            "--max-count",
            "3",
            "--checkpoint-dir",
            str(work / "ckpt"),
            "--failure-file",
            str(work / "failure"),
            "--sagemaker_program",
            "train.py",
        ],
        env=env,
    )
    assert run.returncode == 0, run.stderr
    return work / "model", run


# What makes a test slow here: a training run (train.py, evaluate.py), a model server or the real photos.
# `make check` leaves these modules out; `make test` runs them.
SLOW_MODULES = frozenset(
    {
        "test_train",
        "test_evaluate",
        "test_auxiliary",
        "test_averaging",
        "test_model_server",
        "test_published_model",
        "test_real_images",
    }
)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or item.get_closest_marker("real_data"):
            item.add_marker(pytest.mark.slow)
