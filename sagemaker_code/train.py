"""Train the bin item counter: SageMaker script mode, and plain `python train.py` elsewhere.

SageMaker contract (and the flag that overrides each part outside SageMaker):
  SM_CHANNEL_TRAIN / _VALIDATION / _TEST   --train / --validation / --test
  SM_CHANNEL_CHAMPION                      --champion         (the serving model, scored on the same test)
  SM_CHANNEL_WEIGHTS                       --weights-channel  (the backbone's ImageNet weights file)
  SM_MODEL_DIR                             --model-dir        (model.pth, model_card.json, code/)
  SM_OUTPUT_DATA_DIR                       --output-data-dir  (metrics.json)
  /opt/ml/checkpoints                      --checkpoint-dir   (resume after a kill or spot stop; partial
                                                              files go to its sibling checkpoints-partial)
  /opt/ml/output/failure                   --failure-file     (becomes the job's FailureReason)
Hyperparameters arrive as `--name value`.

Channels use ABID's layout (`bin-images/` with `labels/*.csv` or `metadata/`) or `<count>/<key>.jpg`.
Counts above --max-count are dropped by default
(`--above-max drop`, the published "counts 0 to 5" task); `--above-max clip` keeps them in the
top class, which then means "max-count or more".

Each epoch prints one line that SageMaker metric definitions parse, e.g.
  epoch=3 train_loss=1.2345 val_loss=1.3012 val_accuracy=0.4512 val_rmse=1.0423 ...
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

import auxiliary
import averaging
import backbones
import datasets
import distributed
import inference
import metrics
import preprocessing
import serving_graph

# SageMaker's fixed paths. Outside a container they are rooted where SAGEMAKER_BASE_DIR says, the
# training toolkit's own setting (the local stand-in sets it to the job's folder); on SageMaker it is unset.
OPT_ML = os.environ.get("SAGEMAKER_BASE_DIR", "/opt/ml")
SAGEMAKER_CHECKPOINT_DIR = f"{OPT_ML}/checkpoints"
SAGEMAKER_FAILURE_FILE = f"{OPT_ML}/output/failure"
CHECKPOINT_NAME = "checkpoint.pth"
# save_atomic's partial files go to a sibling of the checkpoint folder: /opt/ml/checkpoints-partial.
SCRATCH_SUFFIX = "-partial"
DIVERGED_LOSS_FACTOR = 20
SMOOTHING_TARGETS = ("all", "neighbours")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
CLASS_WEIGHTINGS = ("none", "balanced")
# Files that make up the model's `code/` folder in model.tar.gz (what the serving container imports).
# api_contract.py and .json: the API's request checks and error table, which the Lambda function uses too.
SERVING_CODE = (
    "inference.py",
    "serving_graph.py",
    "backbones.py",
    "efficientnet_lite.py",
    "preprocessing.py",
    "api_contract.py",
    "api_contract.json",
)


def in_sagemaker() -> bool:
    return "SM_MODEL_DIR" in os.environ or "SM_TRAINING_ENV" in os.environ


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Exit with the message as the exit value, so run() can hand it to SageMaker as the reason.
        self.print_usage(sys.stderr)
        raise SystemExit(f"train.py: error: {message}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Train the ABID bin item counter", add_help=add_help)
    _add_path_arguments(parser)
    _add_model_arguments(parser)
    _add_optimisation_arguments(parser)
    _add_serving_arguments(parser)
    _add_runtime_arguments(parser)
    return parser


def _add_path_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    paths = parser.add_argument_group("paths (default to SageMaker's environment)")
    paths.add_argument(
        "--train",
        default=env("SM_CHANNEL_TRAIN"),
        help="training images: bin-images/ with labels/ or metadata/, or <count>/<key>.jpg",
    )
    paths.add_argument(
        "--validation",
        default=env("SM_CHANNEL_VALIDATION"),
        help="validation images; picks the best epoch. Optional (then the last epoch is kept)",
    )
    paths.add_argument(
        "--test", default=env("SM_CHANNEL_TEST"), help="test images, evaluated once with the final model. Optional"
    )
    paths.add_argument(
        "--champion",
        default=env("SM_CHANNEL_CHAMPION"),
        help="the model serving now (model.tar.gz, or a folder holding one or a model dir), "
        "scored on the test images through the serving code after training, so the "
        "deployment gate compares both models on the same images. Optional",
    )
    paths.add_argument("--model-dir", default=env("SM_MODEL_DIR", "model"), help="where the model is written")
    paths.add_argument(
        "--output-data-dir",
        default=env("SM_OUTPUT_DATA_DIR"),
        help="where metrics.json is written (default: the model dir)",
    )
    paths.add_argument(
        "--checkpoint-dir",
        default=SAGEMAKER_CHECKPOINT_DIR if in_sagemaker() else "",
        help="per-epoch checkpoints; a run restarted with the same dir resumes. Empty: none",
    )
    paths.add_argument(
        "--failure-file",
        default=SAGEMAKER_FAILURE_FILE if in_sagemaker() else "",
        help="on failure the reason is written here (SageMaker's FailureReason). Empty: none",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    model = parser.add_argument_group("model")
    model.add_argument(
        "--arch", default="mobilenet_v2", choices=sorted(backbones.ARCHITECTURES), help="torchvision backbone"
    )
    model.add_argument(
        "--mode",
        default="finetune",
        choices=backbones.MODES,
        help="head: train only a new last layer (the seed's recipe); partial: freeze the first "
        "half of the backbone; finetune: all layers",
    )
    model.add_argument(
        "--head",
        default="linear",
        choices=backbones.HEADS,
        help="linear: one logit per count; ordinal: one score and ordered thresholds "
        "(cumulative-link, CORAL-style: 'more than k?' answers that cannot contradict)",
    )
    model.add_argument(
        "--weights",
        default="imagenet",
        help="backbone init: imagenet (torchvision's ImageNet weights: from --weights-channel, "
        "the torch hub cache, the offline package, else a download), none, or a state dict path",
    )
    model.add_argument(
        "--weights-channel",
        default=env("SM_CHANNEL_WEIGHTS", f"{OPT_ML}/input/data/weights"),
        help="folder holding torchvision's ImageNet weights file for --arch (the job's 'weights' "
        "input channel), checked against the hash in its name; looked in first for "
        "--weights imagenet",
    )
    model.add_argument("--max-count", type=int, default=5, help="top count class; classes are 0..max-count")
    model.add_argument(
        "--above-max",
        default="drop",
        choices=datasets.ABOVE_MAX_POLICIES,
        help="images with more items than --max-count: drop them, or clip into the top class",
    )
    model.add_argument("--image-size", type=int, default=224, help="square input size in pixels")
    model.add_argument(
        "--model-version",
        default=env("TRAINING_JOB_NAME", ""),
        help="version string served with every prediction (default: the SageMaker job name, "
        "else derived from the architecture, data and time)",
    )


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=6, help="passes over the training data")
    optim.add_argument("--batch-size", type=int, default=32, help="images per step")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    optim.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warm-up before the cosine decay")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    optim.add_argument(
        "--smooth-to",
        default="all",
        choices=SMOOTHING_TARGETS,
        help="where the smoothed mass goes: all classes (plain label smoothing) or only the "
        "counts one either side of the true count (neighbour-aware, counts are ordered)",
    )
    optim.add_argument(
        "--class-weights",
        default="none",
        choices=CLASS_WEIGHTINGS,
        help="none, or balanced: weight each count's loss by the inverse of its share of the training images",
    )
    optim.add_argument(
        "--augment",
        type=str2bool,
        default=True,
        help="count-preserving augmentation: flips, brightness and contrast jitter",
    )
    optim.add_argument(
        "--rotate",
        type=float,
        default=0.0,
        help="with --augment: random rotation up to this many degrees either way (0: none)",
    )
    optim.add_argument(
        "--zoom",
        type=float,
        default=1.0,
        help="with --augment: random zoom into the centre down to this share of the side "
        "(1: none; 0.9 keeps at least 90%% of the bin in view)",
    )
    optim.add_argument(
        "--train-on-validation",
        type=str2bool,
        default=False,
        help="add the validation images to the training set and keep the last epoch: the "
        "final retraining once tuning has chosen the hyperparameters",
    )
    optim.add_argument(
        "--select-metric",
        default="val_accuracy",
        choices=("val_accuracy", "val_loss", "last"),
        help="which epoch's weights are kept",
    )
    optim.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")
    optim.add_argument(
        "--aux-weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary metadata loss beside the count loss: extra heads predict "
        "the number of distinct products, the total and largest item volume and the total "
        "weight from BIN_FCSKU_DATA (training only; the served model has no such head). "
        "0: off",
    )
    optim.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights with this decay per step "
        "(0.995: about the last 200 steps); validation then scores, and the model keeps, "
        "the averaged weights. 0: off",
    )
    optim.add_argument(
        "--aux-metadata",
        default=env("SM_CHANNEL_METADATA", ""),
        help="with --aux-weight: a folder of ABID metadata records (<key>.json), looked in "
        "before each training channel's own metadata/ folder (the job's 'metadata' "
        "input channel on SageMaker)",
    )


def _add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    serving = parser.add_argument_group("serving (recorded in the model card; inference.py follows it)")
    serving.add_argument(
        "--tta",
        default="flips",
        choices=sorted(inference.TTA_VIEWS),
        help="test-time augmentation: class probabilities averaged over mirrored copies "
        "(flips: the photo and its three mirror images)",
    )
    serving.add_argument(
        "--decoding",
        default="median",
        choices=inference.DECODINGS,
        help="argmax: the most likely count; median: the count where the cumulative "
        "probability reaches one half; expected: the expected count, rounded",
    )


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    runtime.add_argument(
        "--amp",
        default="auto",
        choices=AMP_CHOICES,
        help="mixed precision: auto is bf16 where the hardware has it natively (CUDA 8.0+, CPUs with "
        "AVX512_BF16 or AMX), fp16 with a gradient scaler on older CUDA GPUs (T4), otherwise off (fp32)",
    )
    runtime.add_argument(
        "--cache",
        default="memory",
        choices=("memory", "none"),
        help="memory: decode each image once for the whole run; none: decode every epoch",
    )
    runtime.add_argument(
        "--workers",
        type=int,
        default=int(env("SM_NUM_CPUS", os.cpu_count() or 1)),
        help="processes decoding images on the instance (its vCPUs); training processes under torchrun share them",
    )
    runtime.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    runtime.add_argument("--eval-batch-size", type=int, default=64, help="images per evaluation step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(without_sagemaker_entries(argv))
    check_args(args)
    return args


def without_sagemaker_entries(argv: list[str]) -> list[str]:
    """The SageMaker SDK's own entries (sagemaker_program ...) are not ours; everything else must parse."""
    cleaned, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item.startswith("--sagemaker_"):
            skip = "=" not in item
            continue
        cleaned.append(item)
    return cleaned


def check_args(args: argparse.Namespace) -> None:
    """Values argparse's types let through but training cannot use: refused before any image is read."""
    if not args.train:
        raise SystemExit("train.py: no training data: set SM_CHANNEL_TRAIN or pass --train")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"train.py: --{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        raise SystemExit("train.py: --lr must be positive")
    if not 0 < args.zoom <= 1 or not 0 <= args.rotate <= 45:
        raise SystemExit("train.py: --zoom must be in (0, 1] and --rotate between 0 and 45 degrees")
    if args.max_count < 1:
        raise SystemExit("train.py: --max-count must be at least 1")
    if args.aux_weight < 0:
        raise SystemExit("train.py: --aux-weight must be 0 (off) or positive")
    if not 0 <= args.ema_decay < 1:
        raise SystemExit("train.py: --ema-decay must be 0 (off) or between 0 and 1")
    if args.aux_weight and args.cache != "memory":
        raise SystemExit("train.py: --aux-weight needs --cache memory (the targets follow the decoded photos)")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: --device cuda but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(
    amp: str, device_type: str, cuda_capability: tuple[int, int] | None = None, cpu_native_bf16: bool = False
) -> torch.dtype | None:
    """The dtype --amp autocasts to on this hardware; None: fp32 throughout.

    auto takes bf16 only where it is computed natively: CUDA compute capability 8.0 or more (A10G is
    8.6) and CPUs with AVX512_BF16 or AMX. torch's own checks say yes to emulation too: in torch 2.6
    torch.cuda.is_bf16_supported() is True on a T4 (7.5, the default ml.g4dn.xlarge) once a bf16
    tensor can be allocated, and torch.ops.mkldnn._is_mkldnn_bf16_supported() on any AVX-512 CPU
    (oneDNN emulates bf16 there: m5, c5). Older CUDA GPUs get fp16 with a gradient scaler, as
    torchvision's reference classification train.py does for --amp (a T4 has fp16 tensor cores);
    CPUs without native bf16 stay in fp32 (fp16 is no better on them)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device_type != "cuda":
            raise SystemExit("train.py: --amp fp16 needs a CUDA device; use --amp bf16 or off on a CPU")
        return torch.float16
    if device_type == "cuda":
        return torch.bfloat16 if cuda_capability is not None and cuda_capability >= (8, 0) else torch.float16
    return torch.bfloat16 if cpu_native_bf16 else None


def detect_autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """autocast_dtype for this process's device, asking torch what the hardware has."""
    if device.type == "cuda":
        return autocast_dtype(amp, "cuda", cuda_capability=torch.cuda.get_device_capability(device))
    return autocast_dtype(amp, device.type, cpu_native_bf16=cpu_has_native_bf16())


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes bf16 itself (AVX512_BF16: Cooper Lake, Zen 4; AMX: Sapphire Rapids)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # not an x86 build of torch
        return False


def precision_name(dtype: torch.dtype | None) -> str:
    """--amp's name for an autocast dtype (what the log and the model card say)."""
    names: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, "off")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# A channel's images: decoded into memory (--cache memory), or their labelled files (--cache none).
Channel = datasets.DecodedSet | list[tuple[datasets.Sample, int]]


@dataclass(frozen=True)
class Runtime:
    """Where this process computes, and beside which others."""

    device: torch.device
    amp: torch.dtype | None  # what autocast computes in (autocast_dtype); None: fp32
    group: distributed.Group


@dataclass
class Data:
    """The channels this process holds, and what the run knows of the whole training set."""

    sets: dict[str, Channel]  # "train" (this process's share); "validation" and "test" on the main process
    sizes: dict[str, int]  # images per channel; "train" counts every process's
    fingerprint: str
    train_labels: torch.Tensor  # every process's
    per_process: int  # training images each process takes per epoch


@dataclass
class TrainingSet:
    """What an epoch trains on: this process's share of the training set and what its loss needs."""

    data: Channel
    length: int  # images per epoch: a smaller share wraps around, so every process takes as many steps
    images: int  # every process's images together
    class_weights: torch.Tensor | None
    aux_targets: torch.Tensor | None  # with --aux-weight: one standardised row per photo of `data`


@dataclass
class Learner:
    """The model in training and what updates it."""

    model: nn.Module  # the weights that train (what a checkpoint holds)
    trainer: nn.Module  # `model`, or with several processes `model` wrapped to average the gradients
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: averaging.WeightAverage | None
    scored: nn.Module  # the weights that validation scores and the model keeps: `model` or the average
    aux_heads: auxiliary.AuxiliaryHeads | None
    scaler: torch.amp.GradScaler | None = None  # with fp16: keeps small gradients from flushing to zero


@dataclass
class Progress:
    """How far training got: what a checkpoint keeps beside the weights."""

    epoch: int = 0  # the last finished epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": None, "epoch": 0, "state": None, "validation": None})


@dataclass(frozen=True)
class Checkpoint:
    """Where each epoch's progress is saved (--checkpoint-dir), for a restarted run to resume."""

    path: Path
    signature: dict[str, Any]  # what must match for a restarted run to resume from it


def load_channel(paths: list[str], args: argparse.Namespace, group: distributed.Group | None = None) -> Channel:
    """One or more channels' images decoded into memory, or (with --cache none) their labelled files;
    with a `group` of training processes, only this process's share of them."""
    labelled: list[tuple[datasets.Sample, int]] = []
    for path in paths:
        labelled += datasets.apply_count_policy(datasets.list_samples(path), args.max_count, args.above_max)
    if not labelled:
        raise datasets.DataError(f"{', '.join(paths)}: no images with a count of at most {args.max_count}")
    if group is not None:
        labelled = distributed.share(labelled, group)
    if args.cache == "none":
        return labelled
    return datasets.decode_all(labelled, args.image_size, args.workers)


def iterate_batches(
    data: Channel, batch_size: int, shuffle: bool, seed: int, workers: int, size: int, length: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """uint8 image batches with their labels and their positions in `data` (None when decoding as
    it goes), from the memory cache or decoding as it goes. With `length` above the set's size, the
    order wraps around to that many images: a process whose share is smaller takes as many steps as
    the others."""
    n = set_size(data)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if length is not None and length > n:
        order = order.repeat(-(-length // n))[:length]
    if isinstance(data, datasets.DecodedSet):
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield data.images[index], data.labels[index], index
    else:
        loader = torch.utils.data.DataLoader(
            datasets.LazyImageDataset(data, size),
            batch_size=batch_size,
            sampler=order.tolist(),
            num_workers=workers,
            persistent_workers=False,
        )
        for images, labels in loader:
            yield images, labels, None


def set_size(data: Channel) -> int:
    return len(data.labels) if isinstance(data, datasets.DecodedSet) else len(data)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Count-preserving augmentation on a float batch in [0, 1]: flips and photometric jitter.

    Flips and brightness/contrast never add or remove an item; crops and large rotations can
    cut one off at the bin's edge, so they are left out.
    """
    n = images.shape[0]
    # Random numbers come from a CPU generator so a run is reproducible on any device.
    draws = torch.rand(n, 4, generator=generator).to(images.device)
    flip_h, flip_v = (draws[:, 0] < 0.5).view(n, 1, 1, 1), (draws[:, 1] < 0.5).view(n, 1, 1, 1)
    images = torch.where(flip_h, images.flip(3), images)
    images = torch.where(flip_v, images.flip(2), images)
    brightness = (1 + (draws[:, 2] - 0.5) * 0.4).view(n, 1, 1, 1)
    contrast = (1 + (draws[:, 3] - 0.5) * 0.4).view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean) * brightness
    return images.clamp(0, 1)


def rotate_and_zoom(images: torch.Tensor, generator: torch.Generator, degrees: float, zoom: float) -> torch.Tensor:
    """Small random rotations and zooms towards the centre, one per image. Items sit inside the bin,
    away from the photo's edges, so mild ones keep the count; the corners are filled from the edge."""
    n = images.shape[0]
    draws = torch.rand(n, 2, generator=generator)
    angle = torch.deg2rad((draws[:, 0] * 2 - 1) * degrees)
    scale = 1 - draws[:, 1] * (1 - zoom)  # the share of the side kept in view
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def prepare(
    images_u8: torch.Tensor,
    device: torch.device,
    augment_with: torch.Generator | None,
    degrees: float = 0.0,
    zoom: float = 1.0,
) -> torch.Tensor:
    images = images_u8.to(device, non_blocking=True).float().div_(255)
    if augment_with is not None:
        images = augment(images, augment_with)
        if degrees > 0 or zoom < 1:
            images = rotate_and_zoom(images, augment_with, degrees, zoom)
    return preprocessing.normalize(images).contiguous(memory_format=torch.channels_last)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TrainingDiverged(RuntimeError):
    pass


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float, smooth_to: str) -> torch.Tensor:
    """Target distributions: 1 - smoothing on the true count, the rest spread over all classes
    (as cross_entropy's label_smoothing does) or only over the true count's neighbours, so that
    calling 3 a 4 costs less than calling it a 0."""
    if smooth_to not in SMOOTHING_TARGETS:
        raise ValueError(f"unknown smoothing target {smooth_to!r}; choose one of {SMOOTHING_TARGETS}")
    if smooth_to == "all":
        targets = torch.full((len(labels), num_classes), smoothing / num_classes)
        targets[torch.arange(len(labels)), labels.cpu()] += 1.0 - smoothing
        return targets.to(labels.device)
    classes = torch.arange(num_classes)
    neighbours = ((classes[None, :] - labels.cpu()[:, None]).abs() == 1).float()
    targets = smoothing * neighbours / neighbours.sum(1, keepdim=True)
    targets[torch.arange(len(labels)), labels.cpu()] = 1.0 - smoothing
    return targets.to(labels.device)


def class_weights(labels: torch.Tensor, num_classes: int, weighting: str) -> torch.Tensor | None:
    """Per-class loss weights: None for plain averaging, or inverse class frequency scaled so that
    a balanced set would get weight 1 everywhere. A class with no training images gets weight 0."""
    if weighting not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting {weighting!r}; choose one of {CLASS_WEIGHTINGS}")
    if weighting == "none":
        return None
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def count_loss(
    logits: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, weights: torch.Tensor | None
) -> torch.Tensor:
    """The training loss: cross-entropy against `soft_targets`, optionally class-weighted."""
    targets = soft_targets(labels, logits.shape[1], args.label_smoothing, args.smooth_to)
    per_image = -(targets * F.log_softmax(logits, dim=1)).sum(1)
    if weights is None:
        return per_image.mean()
    w = weights.to(logits.device)[labels]
    return (per_image * w).sum() / w.sum()


def training_labels(data: Channel) -> torch.Tensor:
    if isinstance(data, datasets.DecodedSet):
        return data.labels
    return torch.tensor([label for _, label in data], dtype=torch.int64)


def train_one_epoch(
    learner: Learner, train: TrainingSet, args: argparse.Namespace, epoch: int, runtime: Runtime
) -> float:
    """One pass over this process's share of the training set; the mean training loss over every
    process. With auxiliary targets the loss adds --aux-weight times the auxiliary heads' loss; the
    weight average, if any, is updated after every step."""
    net, device = learner.model, runtime.device
    set_training_mode(net, args.mode, args.arch)
    # Each process draws its own augmentations (one process: the seed as it always was).
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch + 7919 * runtime.group.rank)
    total_loss, seen = 0.0, 0
    for images_u8, labels, index in iterate_batches(
        train.data, args.batch_size, True, args.seed * 1000 + epoch, args.workers, args.image_size, train.length
    ):
        images = prepare(images_u8, device, generator if args.augment else None, args.rotate, args.zoom)
        labels = labels.to(device)
        with autocast(device, runtime.amp):
            logits = learner.trainer(images)
        loss = count_loss(logits.float(), labels, args, train.class_weights)
        if learner.aux_heads is not None and train.aux_targets is not None:
            predicted = learner.aux_heads.latest
            assert predicted is not None  # set by the forward above: the heads hook the counting head's input
            loss = loss + args.aux_weight * auxiliary.auxiliary_loss(predicted, train.aux_targets[index].to(device))
        if not torch.isfinite(loss):
            # Nothing useful comes after a non-finite loss: stop now and say what to change.
            raise TrainingDiverged(
                f"training diverged: the loss became {loss.item()} in epoch {epoch}; lower --lr (was {args.lr:g})"
            )
        step(learner, loss)
        if learner.ema is not None:
            learner.ema.update(net)
        total_loss += loss.item() * len(labels)
        seen += len(labels)
    loss_sum, count = distributed.sum_floats([total_loss, seen], runtime.group)  # every process decides alike
    mean_loss = loss_sum / count
    stop_if_diverged(mean_loss, epoch, args)
    return mean_loss


def step(learner: Learner, loss: torch.Tensor) -> None:
    """One optimiser and learning-rate step on `loss`; through the gradient scaler with fp16, which
    skips the step (and lowers its scale) when the scaled gradients overflowed."""
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.scaler is None:
        loss.backward()
        learner.optimizer.step()
    else:
        learner.scaler.scale(loss).backward()
        learner.scaler.step(learner.optimizer)
        learner.scaler.update()
    learner.scheduler.step()


def set_training_mode(model: nn.Module, mode: str, arch: str) -> None:
    """Training mode for the layers that train; frozen ones keep their batch-norm statistics as they are."""
    if mode == "head":
        model.eval()  # frozen backbone
    else:
        model.train()
        if mode == "partial":
            for stage in backbones.early_stages(model, arch):
                stage.eval()


def stop_if_diverged(mean_loss: float, epoch: int, args: argparse.Namespace) -> None:
    """TrainingDiverged when an epoch's mean loss says the weights were thrown away."""
    # A model guessing at random scores ln(classes); tens of times that only comes from a learning
    # rate that threw the weights away, and the epochs after it would be wasted.
    limit = DIVERGED_LOSS_FACTOR * math.log(args.max_count + 1)
    if mean_loss > limit:
        raise TrainingDiverged(
            f"training diverged: the mean loss of epoch {epoch} is {mean_loss:.1f} (a random "
            f"guess scores {math.log(args.max_count + 1):.2f}); lower --lr (was {args.lr:g})"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Channel,
    args: argparse.Namespace,
    device: torch.device,
    amp: torch.dtype | None,
    num_classes: int,
) -> dict[str, Any]:
    """Loss and counting metrics of `model` on one channel."""
    model.eval()
    truths, predictions, total_loss = [], [], 0.0
    for images_u8, labels, _ in iterate_batches(data, args.eval_batch_size, False, 0, args.workers, args.image_size):
        images = prepare(images_u8, device, None)
        with autocast(device, amp):
            logits = model(images).float()
        labels = labels.to(device)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        truths += labels.tolist()
        predictions += logits.argmax(1).tolist()
    result = metrics.count_metrics(truths, predictions, num_classes)
    result["loss"] = round(total_loss / len(truths), 4)
    return result


def metric_line(prefix: str, result: dict) -> str:
    keys = ("loss", "accuracy", "rmse", "mae", "within_1")
    return " ".join(f"{prefix}_{k}={result[k]:.4f}" for k in keys if k in result)


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to `path` through a whole file renamed into place: a kill mid-write leaves the
    previous checkpoint intact. The partial file is written beside the folder, not in it: SageMaker
    uploads everything under the checkpoint folder (CheckpointConfig.LocalPath), temporary files too,
    so one written there would be uploaded beside every checkpoint and restored on resume."""
    try:
        write_then_rename(obj, path, scratch_folder(path.parent))
    except OSError as exc:
        if exc.errno not in NO_SCRATCH_ERRORS:
            raise
        # A sibling that cannot be written, or a folder mounted on its own (a rename cannot cross
        # mounts): the partial file goes in the folder after all, the one place left to rename from.
        write_then_rename(obj, path, path.parent)


# What makes the sibling of a checkpoint folder unusable for its partial files.
NO_SCRATCH_ERRORS = (errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS)


def scratch_folder(folder: Path) -> Path:
    """Where save_atomic writes partial files for `folder`: its sibling `<name>-partial` (/opt/ml's
    checkpoints-partial), on the same file system as long as both are in the same mount."""
    folder = folder.resolve()
    return folder.with_name(folder.name + SCRATCH_SUFFIX) if folder.parent != folder else folder


def write_then_rename(obj: object, path: Path, scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / (path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed try leaves nothing behind


def config_signature(args: argparse.Namespace, fingerprint: str, processes: int = 1) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the recipe, the data and, with several
    training processes, their number (it sets the steps per epoch)."""
    keys = (
        "arch",
        "mode",
        "head",
        "weights",
        "max_count",
        "above_max",
        "image_size",
        "epochs",
        "batch_size",
        "lr",
        "label_smoothing",
        "smooth_to",
        "class_weights",
    )
    signature = {**{k: getattr(args, k) for k in keys}, "data": fingerprint}
    if processes > 1:  # absent for one, so that checkpoints written before distribution existed still resume
        signature["processes"] = processes
    for key in ("aux_weight", "ema_decay"):  # absent when off, for the same reason
        if getattr(args, key):
            signature[key] = getattr(args, key)
    return signature


def auxiliary_targets(
    train: datasets.DecodedSet, paths: list[str], metadata: str, group: distributed.Group = distributed.SINGLE
) -> tuple[torch.Tensor, dict]:
    """The training photos' standardised auxiliary targets (one row per photo of this process's
    share; NaN where unknown) and what the model card records of them. Every process standardises
    with the whole training set's statistics."""
    folders = ([Path(metadata)] if metadata else []) + [Path(p) / "metadata" for p in paths]
    raw = auxiliary.read_targets([sample.key for sample in train.samples], folders)
    every = torch.tensor(
        [row for part in distributed.gather(raw.tolist(), group) for row in part], dtype=torch.float32
    ).view(-1, len(auxiliary.TARGETS))
    known = (~torch.isnan(every)).all(1)
    if not known.any():
        raise datasets.DataError(
            f"--aux-weight: none of the {len(every)} training photos has a usable metadata record; looked for "
            f"<key>.json in {', '.join(map(str, folders))}. Pass --aux-metadata, or --aux-weight 0"
        )
    mean, std = auxiliary.standardize(every)
    summary = {
        "targets": list(auxiliary.TARGETS),
        "photos_with_all": int(known.sum()),
        "photos": len(every),
        "mean": [round(v, 4) for v in mean.tolist()],
        "std": [round(v, 4) for v in std.tolist()],
    }
    return (raw - mean) / std, summary


def load_checkpoint(
    path: Path,
    signature: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["signature"] != signature:
        differs = sorted(
            k for k in {**state["signature"], **signature} if state["signature"].get(k) != signature.get(k)
        )
        raise SystemExit(
            f"train.py: {path} was written by another configuration or other data (differs in: "
            f"{', '.join(differs)}). Remove it or use another --checkpoint-dir."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def write_model(model_dir: Path, best_state: dict, card: dict, graph: torch.jit.ScriptModule | None = None) -> None:
    """model.pth, model_card.json, the serving graph model.pt (when given) and code/."""
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, model_dir / "model.pth")
    if graph is not None:
        serving_graph.save(graph, model_dir)
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    code_dir = model_dir / "code"
    code_dir.mkdir(exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in SERVING_CODE:
        shutil.copy2(here / name, code_dir / name)


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    group, device = distributed.setup(select_device(args.device))
    # --workers counts an instance's decoding processes (SM_NUM_CPUS by default): under torchrun the
    # instance's training processes share them, or four GPUs' processes would start four times the CPUs.
    args.workers = max(1, args.workers // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    runtime = Runtime(device, detect_autocast_dtype(args.amp, device), group)

    channels = choose_channels(args, group)
    data = load_data(channels, args, group, started)
    aux_targets, aux_summary = load_auxiliary_targets(data.sets["train"], channels["train"], args, group)
    if "validation" not in data.sets and args.select_metric != "last":
        say("no validation channel: keeping the last epoch", group)
        args.select_metric = "last"

    model, aux_heads = build_model(args, data.train_labels, device)
    optimizer, scheduler = build_optimizer(model, args, steps_per_epoch=math.ceil(data.per_process / args.batch_size))
    ema, scored = build_average(model, args, device)
    signature = config_signature(args, data.fingerprint, group.world)
    checkpoint = Checkpoint(Path(args.checkpoint_dir) / CHECKPOINT_NAME, signature) if args.checkpoint_dir else None
    scaler = torch.amp.GradScaler(device.type) if runtime.amp == torch.float16 else None
    progress = resume(checkpoint, model, optimizer, scheduler, ema, group, scaler)
    say(
        f"training {args.arch} ({args.mode}, weights={args.weights}) on {device}, amp={precision_name(runtime.amp)}, "
        f"epochs {progress.epoch + 1}..{args.epochs}",
        group,
    )
    learner = Learner(
        model, distributed.wrap(model, group, device), optimizer, scheduler, ema, scored, aux_heads, scaler
    )
    weights = class_weights(data.train_labels, args.max_count + 1, args.class_weights)
    train = TrainingSet(data.sets["train"], data.per_process, data.sizes["train"], weights, aux_targets)
    train_epochs(learner, train, data.sets.get("validation"), args, runtime, progress, checkpoint)

    distributed.check_in_step(model, group)
    if not group.main:  # the main process writes the model; the others wait for it to finish
        distributed.teardown(group)
        return {}
    card = write_outputs(model, progress, data, aux_summary, args, runtime, started)
    distributed.teardown(group)
    return card


def say(line: str, group: distributed.Group) -> None:
    """A metric line or a log line, printed once: by the main process."""
    if group.main:
        print(line, flush=True)


def choose_channels(args: argparse.Namespace, group: distributed.Group) -> dict[str, list[str]]:
    """The folders each channel reads. --train-on-validation trains on both and keeps the last epoch."""
    if args.train_on_validation and args.validation:
        say("training on train + validation: keeping the last epoch", group)
        args.select_metric = "last"
        return {"train": [args.train, args.validation], "test": [args.test]}
    return {"train": [args.train], "validation": [args.validation], "test": [args.test]}


def load_data(
    channels: dict[str, list[str]], args: argparse.Namespace, group: distributed.Group, started: float
) -> Data:
    """The channels given, read, and what every process's share of the training set adds up to."""
    # Each process decodes its share of the training photos; the main process alone evaluates.
    sets = {
        name: load_channel(paths, args, group) if name == "train" else load_channel(paths, args)
        for name, paths in channels.items()
        if all(paths) and (name == "train" or group.main)
    }
    rows = datasets.fingerprint_rows(sets)
    fingerprint = datasets.digest_rows([row for part in distributed.gather(rows, group) for row in part])
    train_labels = torch.tensor(
        [label for part in distributed.gather(training_labels(sets["train"]).tolist(), group) for label in part],
        dtype=torch.int64,
    )
    sizes = {name: set_size(d) for name, d in sets.items()}
    sizes["train"] = len(train_labels)
    per_process = distributed.share_length(sizes["train"], group)  # images per process per epoch
    say(
        f"data: {json.dumps(sizes)} classes=0..{args.max_count} above_max={args.above_max} "
        f"cache={args.cache} decode_s={time.time() - started:.1f}"
        + (f" processes={group.world} images_per_process={per_process}" if group.active else ""),
        group,
    )
    return Data(sets, sizes, fingerprint, train_labels, per_process)


def load_auxiliary_targets(
    train: Channel, paths: list[str], args: argparse.Namespace, group: distributed.Group
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """With --aux-weight, `auxiliary_targets` of the training photos; (None, None) without."""
    if not args.aux_weight:
        return None, None
    assert isinstance(train, datasets.DecodedSet)  # check_args: --aux-weight needs --cache memory
    targets, summary = auxiliary_targets(train, paths, args.aux_metadata, group)
    say(
        f"auxiliary targets: {summary['photos_with_all']} of {summary['photos']} training photos "
        f"have all of {', '.join(auxiliary.TARGETS)}; weight {args.aux_weight:g}",
        group,
    )
    return targets, summary


def build_model(
    args: argparse.Namespace, train_labels: torch.Tensor, device: torch.device
) -> tuple[nn.Module, auxiliary.AuxiliaryHeads | None]:
    """The backbone with its counting head and, with --aux-weight, the auxiliary heads it feeds."""
    num_classes = args.max_count + 1
    model = backbones.build_model(
        args.arch, num_classes, args.weights, args.mode, args.head, weights_channel=args.weights_channel
    )
    head = backbones.head_module(model, args.arch)
    if isinstance(head, backbones.OrdinalHead):
        head.start_from_prior(torch.bincount(train_labels, minlength=num_classes))
    aux_heads = auxiliary.attach(model, head) if args.aux_weight else None
    return to_device(model, device), aux_heads


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`, channels-last (the layout the convolutions run fastest in)."""
    # Module.to takes memory_format at run time; torch's type hints leave it out of every overload.
    return model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def build_optimizer(
    model: nn.Module, args: argparse.Namespace, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters that train, and its learning rate per step: a linear warm-up, then
    a cosine decay to zero at the last step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    return optimizer, scheduler


def build_average(
    model: nn.Module, args: argparse.Namespace, device: torch.device
) -> tuple[averaging.WeightAverage | None, nn.Module]:
    """With --ema-decay, the weight average and a model to score it in; otherwise None and `model`."""
    if not args.ema_decay:
        return None, model
    ema = averaging.WeightAverage(model, args.ema_decay, keep=lambda key: not key.startswith(auxiliary.PREFIX))
    return ema, to_device(backbones.build_model(args.arch, args.max_count + 1, head=args.head), device)


def resume(
    checkpoint: Checkpoint | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: averaging.WeightAverage | None,
    group: distributed.Group,
    scaler: torch.amp.GradScaler | None = None,
) -> Progress:
    """The progress a restarted run goes on from, its weights and optimiser state loaded; a fresh
    start without a checkpoint."""
    if checkpoint is None:
        return Progress()
    checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
    # Every process resumes from the main process's checkpoint (the same file on one instance;
    # SageMaker restores the same S3Uri into every instance's folder).
    resumed = load_checkpoint(checkpoint.path, checkpoint.signature, model, optimizer, scheduler)
    if not resumed:
        return Progress()
    if ema is not None:
        ema.load_state_dict(resumed["ema"])
    if scaler is not None and "scaler" in resumed:  # absent when the run that wrote it was not in fp16
        scaler.load_state_dict(resumed["scaler"])
    say(f"resumed from {checkpoint.path} after epoch {resumed['epoch']}", group)
    return Progress(resumed["epoch"], resumed["history"], resumed["best"])


def train_epochs(
    learner: Learner,
    train: TrainingSet,
    validation: Channel | None,
    args: argparse.Namespace,
    runtime: Runtime,
    progress: Progress,
    checkpoint: Checkpoint | None,
) -> None:
    """The epochs after `progress` up to --epochs. After each, the main process scores the weights
    on `validation`, keeps them in `progress` if they are the best so far, and saves a checkpoint."""
    num_classes = args.max_count + 1
    for epoch in range(progress.epoch + 1, args.epochs + 1):
        epoch_start = time.time()
        train_loss = train_one_epoch(learner, train, args, epoch, runtime)
        distributed.average_statistics(learner.model, runtime.group)
        if not runtime.group.main:
            continue
        record: dict[str, Any] = {"epoch": epoch, "train_loss": round(train_loss, 4)}
        line = f"epoch={epoch} train_loss={train_loss:.4f}"
        if learner.ema is not None:
            learner.scored.load_state_dict(learner.ema.average)
        if validation is not None:
            record["validation"] = evaluate(learner.scored, validation, args, runtime.device, runtime.amp, num_classes)
            line += " " + metric_line("val", record["validation"])
        seconds = time.time() - epoch_start
        line += (
            f" lr={learner.scheduler.get_last_lr()[0]:.6f} epoch_time_s={seconds:.1f}"
            f" images_per_s={train.images / seconds:.1f}"
        )
        say(line, runtime.group)
        progress.epoch = epoch
        progress.history.append(record)
        progress.best = best_so_far(progress.best, record, learner.scored, args.select_metric)
        if checkpoint is not None:
            save_checkpoint(checkpoint, learner, progress)


def best_so_far(best: dict[str, Any], record: dict[str, Any], scored: nn.Module, select_metric: str) -> dict[str, Any]:
    """`best`, or this epoch's score, validation and weights when they beat it."""
    score = epoch_score(record, select_metric)
    if best["score"] is not None and not score > best["score"]:
        return best
    # The serving model's weights: without the auxiliary head, which only training reads.
    state = auxiliary.serving_state(scored.state_dict())
    return {
        "score": score,
        "epoch": record["epoch"],
        "validation": record.get("validation"),
        "state": {k: v.detach().cpu().clone() for k, v in state.items()},
    }


def save_checkpoint(checkpoint: Checkpoint, learner: Learner, progress: Progress) -> None:
    save_atomic(
        {
            "epoch": progress.epoch,
            "signature": checkpoint.signature,
            "model": learner.model.state_dict(),
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "history": progress.history,
            "best": progress.best,
            **({"ema": learner.ema.state_dict()} if learner.ema is not None else {}),
            **({"scaler": learner.scaler.state_dict()} if learner.scaler is not None else {}),
        },
        checkpoint.path,
    )


def write_outputs(
    model: nn.Module,
    progress: Progress,
    data: Data,
    aux_summary: dict[str, Any] | None,
    args: argparse.Namespace,
    runtime: Runtime,
    started: float,
) -> dict[str, Any]:
    """The main process's last steps: the best epoch's weights written as the model, scored on the
    test channel as clients will be served, and metrics.json. The model card."""
    best = progress.best
    model.load_state_dict(best["state"], strict=not args.aux_weight)
    result: dict[str, Any] = {"best_epoch": best["epoch"], "validation": best["validation"]}
    card = model_card(args, result, progress.history, data.sizes, data.fingerprint, time.time() - started, runtime)
    if aux_summary:
        card["auxiliary_supervision"] = {
            **aux_summary,
            "weight": args.aux_weight,
            "source": "BIN_FCSKU_DATA of each training photo's metadata record",
            "served": False,
        }
    write_model(Path(args.model_dir), best["state"], card, trace_serving_graph(best["state"], args))
    if "test" in data.sets:
        result.update(score_test(model, data.sets["test"], args, runtime))
        card["metrics"] = result
        write_model(Path(args.model_dir), best["state"], card)

    out_dir = Path(args.output_data_dir or args.model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    say(
        f"model {card['model_version']} written to {args.model_dir} (best epoch {best['epoch']}) "
        f"in {time.time() - started:.1f}s",
        runtime.group,
    )
    return card


def trace_serving_graph(state: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.jit.ScriptModule:
    """The serving graph of the weights `state`."""
    # Traced from a CPU copy: the model itself stays on its device for the test evaluation.
    serving_net = backbones.build_model(args.arch, args.max_count + 1, weights="none", head=args.head)
    serving_net.load_state_dict(state)
    return serving_graph.export(serving_net, args.image_size, len(inference.TTA_VIEWS[args.tta]))


def score_test(model: nn.Module, test: Channel, args: argparse.Namespace, runtime: Runtime) -> dict[str, Any]:
    """The written model's test metrics ("test") and, with --champion, the serving model's ("champion")."""
    # Scored as clients will be served: the written model through the serving handlers (fp32),
    # and the serving model, if any, the same way on the same images. The loss comes from the
    # training-time evaluation.
    loss = evaluate(model, test, args, runtime.device, runtime.amp, args.max_count + 1)["loss"]
    scores: dict[str, Any] = {
        "test": {**score_model(args.model_dir, args.test, args.max_count, args.eval_batch_size), "loss": loss}
    }
    say(metric_line("test", scores["test"]), runtime.group)
    say(f"test_per_class_accuracy={json.dumps(scores['test']['per_class_accuracy'])}", runtime.group)
    if "live" in scores["test"]:
        say(live_metric_line("live_test", scores["test"]["live"]), runtime.group)
    if args.champion:
        scores["champion"] = score_champion(args.champion, args.test, args.max_count, args.eval_batch_size)
    return scores


def find_model(path: str) -> Path:
    """A champion channel holds model.tar.gz (as SageMaker downloads an S3 object); a path may also
    name the archive or an unpacked model folder."""
    candidate = Path(path)
    if candidate.is_dir() and not (candidate / "model_card.json").is_file():
        archives = sorted(candidate.rglob("*.tar.gz"))
        if len(archives) != 1:
            raise datasets.DataError(f"--champion {path}: expected one model.tar.gz there, found {len(archives)}")
        return archives[0]
    if not candidate.exists():
        raise datasets.DataError(f"--champion {path} does not exist")
    return candidate


def score_model(path: str, test_dir: str, max_count: int, batch_size: int) -> dict:
    """A written model's metrics on labelled images, through the serving handlers."""
    import evaluate  # the serving path; only needed here

    return evaluate.evaluate(path, test_dir, max_count, batch_size)


def score_champion(path: str, test_dir: str, max_count: int, batch_size: int) -> dict | None:
    """The serving model's metrics on the same test images; None (and why, in the log) when it cannot
    be scored: the new model is not lost for it, the deployment gate decides what that means."""
    try:
        champion = score_model(str(find_model(path)), test_dir, max_count, batch_size)
    except (Exception, SystemExit) as exc:  # whatever is wrong with the old model, keep the new one
        print(f"champion could not be scored: {type(exc).__name__}: {exc}", flush=True)
        return None
    print(f"champion={champion['model_version']} " + metric_line("champion_test", champion), flush=True)
    if "live" in champion:
        print(live_metric_line("champion_live_test", champion["live"]), flush=True)
    return champion


def live_metric_line(prefix: str, result: dict) -> str:
    """The scores on the live photos alone, with how many there were (few photos, wide error bars)."""
    return f"{metric_line(prefix, result)} {prefix}_n={result['n']}"


def epoch_score(record: dict[str, Any], select_metric: str) -> float | tuple[float, float]:
    """Higher is better: which epoch's weights become the model."""
    if select_metric == "last":
        return record["epoch"]
    if select_metric == "val_loss":
        return -record["validation"]["loss"]
    return (record["validation"]["accuracy"], -record["validation"]["loss"])


def model_card(
    args: argparse.Namespace,
    result: dict[str, Any],
    history: list[dict[str, Any]],
    sizes: dict[str, int],
    fingerprint: str,
    seconds: float,
    runtime: Runtime,
) -> dict[str, Any]:
    """model_card.json: what the model is, how it was made, from what data, and how good it is."""
    created = datetime.now(UTC)
    num_classes = args.max_count + 1
    version = args.model_version or f"{args.arch}-{args.mode}-{fingerprint[:8]}-{created:%Y%m%dT%H%M%SZ}"
    return {
        "format_version": 1,
        "model_version": version,
        "task": "count the items in an Amazon Bin Image Dataset photo",
        "backbone": args.arch,
        "mode": args.mode,
        "head": args.head,
        "initial_weights": args.weights,
        "classes": list(range(num_classes)),
        "max_count": args.max_count,
        "above_max": args.above_max,
        "top_class_meaning": (
            f"{args.max_count} or more items"
            if args.above_max == "clip"
            else f"{args.max_count} items (trained without larger counts)"
        ),
        "preprocessing": preprocessing.describe(args.image_size),
        "test_time_augmentation": args.tta,
        "decoding": args.decoding,
        "hyperparameters": {
            k: v
            for k, v in vars(args).items()
            if k
            not in (
                "train",
                "validation",
                "test",
                "champion",
                "weights_channel",
                "aux_metadata",
                "model_dir",
                "output_data_dir",
                "checkpoint_dir",
                "failure_file",
                "model_version",
            )
        },
        "metrics": result,
        "history": history,
        "data": {"images": sizes, "fingerprint": fingerprint},
        "training": {
            "seconds": round(seconds, 1),
            "device": str(runtime.device),
            "bf16": runtime.amp == torch.bfloat16,
            "amp": precision_name(runtime.amp),
            "torch": torch.__version__,
            "processes": runtime.group.world,
        },
        "created_at": created.isoformat(timespec="seconds"),
        "data_credit": "Amazon Bin Image Dataset, Amazon.com, CC BY-NC-SA 3.0 US",
    }


def write_failure(path: str, reason: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(reason[:1000])  # SageMaker keeps the first 1024 characters


def failure_file_from(argv: list[str]) -> str:
    """--failure-file before the arguments are parsed, so a parse error is reported too."""
    for i, item in enumerate(argv):
        if item == "--failure-file" and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith("--failure-file="):
            return item.split("=", 1)[1]
    return SAGEMAKER_FAILURE_FILE if in_sagemaker() else ""


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    failure_file = failure_file_from(argv)
    try:
        args = parse_args(argv)
        main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            write_failure(failure_file, str(exc.code))
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        print(f"training failed: {reason}", file=sys.stderr, flush=True)
        traceback.print_exc()
        write_failure(failure_file, reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
