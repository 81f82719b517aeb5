"""Auxiliary supervision from ABID's metadata: what the product list says the photo must show.

`BIN_FCSKU_DATA` lists every product in the bin with its quantity, dimensions and weight. Training
can ask the network to predict a few summaries of it beside the count (`TARGETS`), through a small
extra head on the same pooled features, so that those features learn "how many different things,
how much of the bin they fill". The metadata is never an input: at serving time a client sends a
photo, and the extra head is dropped from the model (`serving_state`), so the served model is the
plain counter, the same size and speed.

Training-only: not one of the files in the model's `code/` folder.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# What each auxiliary head predicts, per photo: the number of distinct products, the total and the
# largest item volume (cubic inches) and the total weight (pounds); the last three as log1p, since
# they span orders of magnitude.
TARGETS = ("distinct_products", "total_volume", "largest_item_volume", "total_weight")
PREFIX = "auxiliary."  # the extra head's keys in the training model's state dict
DIMENSIONS = ("height", "length", "width")
# The units the mirror's metadata uses (every record seen); another unit makes that value unknown
# rather than silently wrong.
LENGTH_UNIT, WEIGHT_UNIT = "IN", "pounds"


def _measure(item: dict, name: str, unit: str) -> float | None:
    value = item.get(name)
    if not isinstance(value, dict) or value.get("unit") != unit:
        return None
    try:
        number = float(value["value"])
    except (KeyError, TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def targets_from_metadata(metadata: dict) -> list[float]:
    """The raw `TARGETS` of one photo's metadata record; NaN where a product lacks the measure
    (a target with one unknown term is unknown: a partial sum would read as a smaller bin)."""
    items = list((metadata.get("BIN_FCSKU_DATA") or {}).values())
    volumes, weights = [], []
    for item in items:
        try:
            quantity = int(item.get("quantity", 0))
        except (TypeError, ValueError):
            quantity = -1
        sides = [side for name in DIMENSIONS if (side := _measure(item, name, LENGTH_UNIT)) is not None]
        weight = _measure(item, "weight", WEIGHT_UNIT)
        volume = sides[0] * sides[1] * sides[2] if len(sides) == len(DIMENSIONS) else None
        volumes.append((quantity, volume))
        weights.append((quantity, weight))

    def total(pairs: list) -> float:
        if any(q < 0 or v is None for q, v in pairs):
            return math.nan
        return math.log1p(sum(q * v for q, v in pairs))

    known = [v for _, v in volumes if v is not None]
    largest = math.log1p(max(known, default=0.0)) if len(known) == len(volumes) else math.nan
    return [float(len(items)), total(volumes), largest, total(weights)]


def read_targets(keys: list[str], metadata_dirs: list[Path]) -> torch.Tensor:
    """N x len(TARGETS) raw targets for the photos `keys`, from `<dir>/<key>.json` in the first of
    `metadata_dirs` that has it; a row of NaN for a photo without a readable record."""
    rows = []
    for key in keys:
        row = [math.nan] * len(TARGETS)
        for folder in metadata_dirs:
            path = folder / f"{key}.json"
            if path.is_file():
                # An unreadable record leaves the photo without auxiliary targets; it still trains the count.
                with contextlib.suppress(ValueError, AttributeError):
                    row = targets_from_metadata(json.loads(path.read_text()))
                break
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32).view(len(keys), len(TARGETS))


def standardize(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's mean and standard deviation over the training photos that have it, so that
    every head's loss has the same scale whatever its unit."""
    known = ~torch.isnan(train)
    count = known.sum(0).clamp_min(1)
    filled = torch.where(known, train, torch.zeros_like(train))
    mean = filled.sum(0) / count
    var = (torch.where(known, train - mean, torch.zeros_like(train)) ** 2).sum(0) / count
    return mean, var.sqrt().clamp_min(1e-6)


def auxiliary_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Huber loss over the known standardised targets (unknown ones, NaN, count for nothing)."""
    known = ~torch.isnan(targets)
    if not known.any():
        return predicted.sum() * 0.0  # keeps the graph (and every process's gradients) alike
    return F.smooth_l1_loss(predicted.float()[known], targets[known])


class AuxiliaryHeads(nn.Module):
    """One linear output per `TARGETS` entry, on the features the counting head reads. It sits in
    the model as `model.auxiliary` and runs as a pre-hook of the counting head, so the backbone runs
    once and the model's forward returns the count logits as always; `latest` holds this forward's
    auxiliary predictions."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, len(TARGETS))
        self.latest: torch.Tensor | None = None

    def capture(self, module: nn.Module, inputs: tuple) -> None:
        self.latest = self.linear(inputs[0])


def attach(model: nn.Module, head: nn.Module) -> AuxiliaryHeads:
    """Add `AuxiliaryHeads` to `model`, fed with the input of its counting `head`."""
    linear = head if isinstance(head, nn.Linear) else head.get_submodule("score")  # the ordinal head's scorer
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{type(head).__name__}: a counting head is a linear layer or has one as `score`")
    heads = AuxiliaryHeads(linear.in_features)
    model.add_module(PREFIX.rstrip("."), heads)
    head.register_forward_pre_hook(heads.capture)
    return heads


def serving_state(state: dict) -> dict:
    """The counting model's state dict: the training model's without the auxiliary head."""
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}
