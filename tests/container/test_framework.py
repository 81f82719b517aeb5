"""This environment is the framework image's: the torch, torchvision and Python that AWS's SageMaker
PyTorch images of sagemaker_code/framework.json run, which account.py asks the SDK for."""

from __future__ import annotations

import json
import sys

import torch
import torchvision

from tests.conftest import REPO

FRAMEWORK = json.loads((REPO / "sagemaker_code" / "framework.json").read_text())


def release(version: str) -> str:
    """A version without its local tag: AWS's wheels say 2.6.0+cpu or +cu124, PyPI's 2.6.0."""
    return version.split("+", 1)[0]


def test_torch_and_torchvision_are_the_images():
    assert FRAMEWORK["framework"] == "pytorch"
    assert release(torch.__version__) == FRAMEWORK["framework_version"]
    assert release(torchvision.__version__) == FRAMEWORK["torchvision"]


def test_python_is_the_images():
    assert f"py{sys.version_info.major}{sys.version_info.minor}" == FRAMEWORK["py_version"]
