"""Fixtures for the container-side suite: running train.py the way SageMaker runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

TRAIN = REPO / "sagemaker_code" / "train.py"
# Small and fast: a 32 px MobileNetV2 from scratch trains an epoch on ~20 images in about a second.
FAST = ["--arch", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--workers", "1", "--eval-batch-size", "16"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without SageMaker variables, and with the network closed: any
    download attempt fails at once instead of depending on the machine's internet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"})
    env.update(extra)
    return env


def run_train(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> Run:
    proc = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


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
    run = run_train([*FAST, "--epochs", "2", "--max-count", "3", "--checkpoint-dir", str(work / "ckpt"),
                     "--failure-file", str(work / "failure"), "--sagemaker_program", "train.py"], env=env)
    assert run.returncode == 0, run.stderr
    return work / "model", run
