"""A short smoke test on real bin photos from the local ABID mirror (skipped without it)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.container.conftest import run_train

import datasets
import inference

pytestmark = pytest.mark.real_data


def test_train_and_serve_on_real_bin_images(real_abid, tmp_path):
    samples = [s for s in datasets.list_abid_layout(real_abid) if s.count <= 5]
    # Two separate key ranges: no block of keys on both sides.
    train = [s for s in samples if "01000" <= s.key < "01100"][:60]
    validation = [s for s in samples if "02000" <= s.key < "02100"][:30]
    for name, chosen in (("train", train), ("validation", validation)):
        for s in chosen:
            (tmp_path / name / str(s.count)).mkdir(parents=True, exist_ok=True)
            shutil.copy(s.path, tmp_path / name / str(s.count) / f"{s.key}.jpg")
    run = run_train(
        [
            "--train",
            str(tmp_path / "train"),
            "--validation",
            str(tmp_path / "validation"),
            "--epochs",
            "1",
            "--image-size",
            "96",
            "--workers",
            "2",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["initial_weights"] == "imagenet" and card["backbone"] == "mobilenet_v2"
    assert 0 <= card["metrics"]["validation"]["accuracy"] <= 1

    model = inference.model_fn(str(tmp_path / "model"))
    original = next(s for s in samples if s.key < "01000")  # a full-size original photo
    with open(original.path, "rb") as handle:
        answer = json.loads(
            inference.output_fn(
                inference.predict_fn(inference.input_fn(handle.read(), "image/jpeg"), model), "application/json"
            )[0]
        )
    assert answer["count"] in range(6)
