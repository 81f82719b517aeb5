"""sagemaker_code/framework.json is the one place for the framework the jobs and the endpoint run:
the images account.py asks the SDK for (their URIs: test_sagemaker_config.py), the container
environment's requirements and lock, and the stand-in's image all follow it; tests/container/
test_framework.py checks that the container environment has this torch, torchvision and Python."""

from __future__ import annotations

import json
import re

import pytest

from bin_counter import account
from tests.conftest import REPO

FRAMEWORK = json.loads((REPO / "sagemaker_code" / "framework.json").read_text())
VERSION, PY = FRAMEWORK["framework_version"], FRAMEWORK["py_version"]
PYTHON = f"{PY[2]}.{PY[3:]}"  # py312 -> 3.12


def pins(path: str) -> dict[str, str]:
    found = {}
    for line in (REPO / path).read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#", 1)[0].strip()):
            found[match.group(1).lower()] = match.group(2)
    return found


def test_account_reads_the_framework_from_framework_json():
    assert account.FRAMEWORK_FILE == REPO / "sagemaker_code" / "framework.json"
    read = (account.FRAMEWORK, account.FRAMEWORK_VERSION, account.PY_VERSION)
    assert read == (FRAMEWORK["framework"], VERSION, PY)


@pytest.mark.parametrize("path", ["requirements-container.txt", "constraints/container.txt"])
def test_the_container_pins_are_framework_jsons(path):
    found = pins(path)
    assert (found.get("torch"), found.get("torchvision")) == (VERSION, FRAMEWORK["torchvision"]), path


def test_the_standin_image_runs_framework_jsons_python():
    dockerfile = (REPO / "docker" / "standin.Dockerfile").read_text()
    assert re.search(r"^FROM python:(\S+?)-slim$", dockerfile, re.M).group(1) == PYTHON
    assert "requirements-container.txt" in dockerfile
