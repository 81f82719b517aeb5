"""train.py --ema-decay: the moving average of the weights, and that it is what the model keeps."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.container.conftest import FAST, run_train

import averaging


def test_the_average_follows_the_weights_with_its_warm_up_and_decay():
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(0.0)
    ema = averaging.WeightAverage(net, 0.9)
    expected = torch.zeros(1, 2)
    for step in range(1, 11):
        with torch.no_grad():
            net[0].weight.fill_(1.0)
        net[1].num_batches_tracked += 1
        ema.update(net)
        expected = 0.9 * expected + 0.1
        assert torch.allclose(ema.average["0.weight"], expected)
        assert ema.average["1.num_batches_tracked"] == step  # integer buffers are copied, not averaged
    assert torch.allclose(ema.average["0.weight"], torch.full((1, 2), 1 - 0.9**10))
    assert ema.average["1.running_var"].equal(net[1].running_var)  # unchanged statistics average to themselves
    with pytest.raises(ValueError, match="between 0 and 1"):
        averaging.WeightAverage(net, 1.0)


def test_the_kept_model_is_the_average_and_a_run_resumes_it(split_channels, tmp_path):
    flags = [
        *FAST,
        "--train",
        str(split_channels["train"]),
        "--epochs",
        "2",
        "--ema-decay",
        "0.9",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    run = run_train([*flags, "--model-dir", str(tmp_path / "model")])
    assert run.returncode == 0, run.stderr
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["hyperparameters"]["ema_decay"] == 0.9
    kept = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    checkpoint = torch.load(tmp_path / "ckpt" / "checkpoint.pth", weights_only=False)
    # No validation channel: the last epoch is kept, and what is kept is the average, not the last step.
    assert checkpoint["ema"]["updates"] == 2 * 3  # 20 photos in batches of 8, two epochs
    for key, value in kept.items():
        assert torch.equal(value, checkpoint["ema"]["average"][key]), key
    assert any(not torch.equal(kept[k], checkpoint["model"][k]) for k in kept if kept[k].is_floating_point())
    # Another decay is another recipe: its checkpoint is not resumed.
    other = run_train(
        [
            *flags[:-4],
            "--ema-decay",
            "0.5",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--model-dir",
            str(tmp_path / "other"),
        ]
    )
    assert other.returncode != 0 and "ema_decay" in other.stderr
    invalid = run_train([*FAST, "--train", str(split_channels["train"]), "--ema-decay", "1"])
    assert invalid.returncode != 0 and "--ema-decay must be 0 (off) or between 0 and 1" in invalid.stderr
