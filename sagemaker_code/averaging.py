"""An exponential moving average of a model's weights during training (`train.py --ema-decay`).

The average of the last few hundred steps' weights sits nearer the middle of the minimum the
optimiser is wandering around than any single step's, which often generalises a little better for
free: one extra copy of the weights, updated after each step. With `--ema-decay`, validation scores
and the kept model are the averaged weights. Training-only: not one of the files in `code/`.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    """avg = decay * avg + (1 - decay) * weights, after every optimiser step, over every floating
    tensor of `model`'s state dict (batch-norm running statistics included, so the averaged model
    normalises as the averaged weights expect); integer buffers follow the model's. Only the keys
    that `keep(key)` accepts are averaged (the served model's, not a training-only head's)."""

    def __init__(self, model: nn.Module, decay: float, keep=lambda key: True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"an average's decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.keep = keep
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if keep(k)}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # No warm-up (as torch.optim.swa_utils' EMA): from ImageNet weights, their share of the
        # average after a 6-epoch run's 822 steps at 0.995 is 1.6%, and the best epoch is a late one.
        self.updates += 1
        decay = self.decay
        for key, value in model.state_dict().items():
            if key not in self.average:
                continue
            if value.is_floating_point():
                self.average[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                self.average[key].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for key, value in state["average"].items():
            self.average[key].copy_(value)
