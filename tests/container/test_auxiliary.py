"""Auxiliary supervision from the metadata's product list: its targets, its head, and that the
served model is the plain counter."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import torch

from tests.conftest import write_abid_dir
from tests.container.conftest import FAST, clean_env, run_train
from tests.container.test_train import SERVE_FROM_CODE_DIR

import auxiliary
import backbones


def product(quantity: int, sides=(2.0, 3.0, 4.0), pounds: float | None = 0.5) -> dict:
    height, length, width = sides
    item = {
        "quantity": quantity,
        "height": {"unit": "IN", "value": height},
        "length": {"unit": "IN", "value": length},
        "width": {"unit": "IN", "value": width},
    }
    if pounds is not None:
        item["weight"] = {"unit": "pounds", "value": pounds}
    return item


def test_targets_summarise_the_product_list():
    record = {"EXPECTED_QUANTITY": 3, "BIN_FCSKU_DATA": {"A": product(1), "B": product(2, (1.0, 1.0, 10.0), 2.0)}}
    distinct, total_volume, largest, total_weight = auxiliary.targets_from_metadata(record)
    assert distinct == 2
    assert total_volume == math.log1p(1 * 24 + 2 * 10)
    assert largest == math.log1p(24)
    assert total_weight == math.log1p(0.5 + 2 * 2.0)
    # An empty bin has no products: every target is zero, and known.
    assert auxiliary.targets_from_metadata({"EXPECTED_QUANTITY": 0, "BIN_FCSKU_DATA": {}}) == [0.0, 0.0, 0.0, 0.0]


def test_a_missing_or_foreign_measure_makes_only_its_targets_unknown():
    no_weight = {"BIN_FCSKU_DATA": {"A": product(1), "B": product(1, pounds=None)}}
    targets = auxiliary.targets_from_metadata(no_weight)
    assert targets[:3] == [2.0, math.log1p(48), math.log1p(24)] and math.isnan(targets[3])
    centimetres = product(1)
    centimetres["height"]["unit"] = "CM"  # never seen in the mirror: unknown, not silently wrong
    targets = auxiliary.targets_from_metadata({"BIN_FCSKU_DATA": {"A": centimetres}})
    assert targets[0] == 1 and math.isnan(targets[1]) and math.isnan(targets[2]) and targets[3] == math.log1p(0.5)


def test_standardisation_and_loss_ignore_unknown_targets(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"BIN_FCSKU_DATA": {"A": product(1)}}))
    (tmp_path / "b.json").write_text(json.dumps({"BIN_FCSKU_DATA": {"A": product(3), "B": product(1)}}))
    (tmp_path / "broken.json").write_text("{not json")
    raw = auxiliary.read_targets(["a", "b", "broken", "absent"], [tmp_path])
    assert raw.shape == (4, len(auxiliary.TARGETS))
    assert torch.isnan(raw[2:]).all() and not torch.isnan(raw[:2]).any()
    mean, std = auxiliary.standardize(raw)
    assert torch.allclose(mean, raw[:2].mean(0)) and torch.allclose(std, raw[:2].std(0, unbiased=False).clamp_min(1e-6))
    predicted = torch.zeros(4, len(auxiliary.TARGETS), requires_grad=True)
    loss = auxiliary.auxiliary_loss(predicted, (raw - mean) / std)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert (predicted.grad[2:] == 0).all() and (predicted.grad[:2] != 0).any()


def test_the_auxiliary_head_trains_the_backbone_and_is_left_out_of_the_served_weights():
    torch.manual_seed(0)
    model = backbones.build_model("mobilenet_v2", 6)
    plain_keys = set(model.state_dict())
    heads = auxiliary.attach(model, backbones.head_module(model, "mobilenet_v2"))
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 6)  # the model's own output is still the count logits
    assert heads.latest.shape == (3, len(auxiliary.TARGETS))
    auxiliary.auxiliary_loss(heads.latest, torch.ones(3, len(auxiliary.TARGETS))).backward()
    # The auxiliary loss alone reaches the backbone: that is what it is for.
    assert model.features[0][0].weight.grad.abs().sum() > 0
    assert backbones.head_module(model, "mobilenet_v2").weight.grad is None
    served = auxiliary.serving_state(model.state_dict())
    assert set(served) == plain_keys
    backbones.build_model("mobilenet_v2", 6).load_state_dict(served)  # strict: the plain counter


def abid_channel(root, counts: dict[str, int]):
    """An ABID-layout channel whose metadata lists products: `count` items as one or two products."""
    write_abid_dir(root, counts)
    for key, count in counts.items():
        products = (
            {}
            if count == 0
            else {f"P{key}": product(count)}
            if count < 2
            else {f"P{key}": product(count - 1), f"Q{key}": product(1, (5.0, 5.0, 5.0), 1.5)}
        )
        (root / "metadata" / f"{key}.json").write_text(
            json.dumps({"EXPECTED_QUANTITY": count, "BIN_FCSKU_DATA": products})
        )
    return root


def test_a_run_with_auxiliary_heads_serves_the_plain_counter(tmp_path):
    train = abid_channel(tmp_path / "train", {f"{i:05d}": i % 4 for i in range(1, 25)})
    flags = [
        *FAST,
        "--train",
        str(train),
        "--epochs",
        "2",
        "--max-count",
        "3",
        "--aux-weight",
        "0.5",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    run = run_train([*flags, "--model-dir", str(tmp_path / "model")])
    assert run.returncode == 0, run.stderr
    assert "auxiliary targets: 24 of 24 training photos have all of distinct_products" in run.stdout
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["auxiliary_supervision"]["weight"] == 0.5 and card["auxiliary_supervision"]["served"] is False
    assert card["hyperparameters"]["aux_weight"] == 0.5
    state = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    assert not any(key.startswith(auxiliary.PREFIX) for key in state)
    # The checkpoint keeps the auxiliary head (a resumed run goes on training it) and records the weight.
    checkpoint = torch.load(tmp_path / "ckpt" / "checkpoint.pth", weights_only=False)
    assert any(key.startswith(auxiliary.PREFIX) for key in checkpoint["model"])
    refused = run_train([*flags[:-4], "--checkpoint-dir", str(tmp_path / "ckpt"), "--model-dir", str(tmp_path / "b")])
    assert refused.returncode != 0 and "aux_weight" in refused.stderr
    image = next((train / "bin-images").glob("*.jpg"))
    served = subprocess.run(
        [sys.executable, "-c", SERVE_FROM_CODE_DIR, str(tmp_path / "model"), str(image)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        check=False,
    )
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout)["count"] in range(4)


def test_auxiliary_heads_without_metadata_fail_with_where_they_looked(split_channels, tmp_path):
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--aux-weight",
            "0.3",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode != 0
    assert "none of the 20 training photos has a usable metadata record" in run.stderr
    assert "--aux-metadata" in run.stderr and not (tmp_path / "model").exists()
    lazy = run_train([*FAST, "--train", str(split_channels["train"]), "--aux-weight", "0.3", "--cache", "none"])
    assert lazy.returncode != 0 and "--aux-weight needs --cache memory" in lazy.stderr


def test_a_metadata_folder_beside_a_split_layout_channel_supplies_the_targets(split_channels, tmp_path):
    keys = sorted(p.stem for p in split_channels["train"].rglob("*.jpg"))
    (tmp_path / "metadata").mkdir()
    for key in keys[:12]:  # some photos without a record: they train the count only
        (tmp_path / "metadata" / f"{key}.json").write_text(json.dumps({"BIN_FCSKU_DATA": {"A": product(1)}}))
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--aux-weight",
            "0.3",
            "--aux-metadata",
            str(tmp_path / "metadata"),
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    with_records = len([k for k in keys[:12] if not (split_channels["train"] / "7" / f"{k}.jpg").exists()])
    assert f"auxiliary targets: {with_records} of 20 training photos" in run.stdout
