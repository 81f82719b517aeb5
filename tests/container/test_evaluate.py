"""evaluate.py on both data layouts, on a model directory and on model.tar.gz."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import REPO, write_abid_dir

EVALUATE = REPO / "sagemaker_code" / "evaluate.py"
EXPECTED_KEYS = {"n", "accuracy", "rmse", "mae", "within_1", "per_class_accuracy", "confusion_matrix"}


def run_evaluate(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(EVALUATE), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_split_layout_with_max_count(trained_model, split_channels):
    model_dir, _ = trained_model
    result = run_evaluate("--model", str(model_dir), "--data", str(split_channels["test"]), "--max-count", "3")
    assert set(result) >= EXPECTED_KEYS
    assert result["n"] == 20  # the 7s are left out
    assert sum(map(sum, result["confusion_matrix"])) == 20
    assert set(result["per_class_accuracy"]) == {"0", "1", "2", "3"}
    # The monitor's baseline: the predicted counts are the confusion matrix's column sums.
    assert result["predicted_histogram"] == [sum(column) for column in zip(*result["confusion_matrix"], strict=True)]
    assert len(result["confidence_histogram"]) == 10 and sum(result["confidence_histogram"]) == 20


def test_results_agree_with_the_training_scripts_own_test_metrics(trained_model, split_channels):
    model_dir, _ = trained_model
    card = json.loads((model_dir / "model_card.json").read_text())
    result = run_evaluate("--model", str(model_dir), "--data", str(split_channels["test"]), "--max-count", "3")
    assert result["n"] == card["metrics"]["test"]["n"]
    assert sum(card["metrics"]["test"]["confidence_histogram"]) == result["n"]  # the model card carries it
    # Serving decodes in float32 while training evaluated under bf16 autocast where the CPU has it.
    assert abs(result["accuracy"] - card["metrics"]["test"]["accuracy"]) <= 0.1


def test_abid_layout_and_model_tarball(trained_model, tmp_path):
    model_dir, _ = trained_model
    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        for item in model_dir.iterdir():
            archive.add(item, arcname=item.name)
    abid = write_abid_dir(tmp_path / "abid", {"00001": 0, "00002": 2, "00003": 3, "00004": 9})
    output = tmp_path / "metrics.json"
    result = run_evaluate("--model", str(tarball), "--data", str(abid), "--output", str(output), "--show", "2")
    assert result["n"] == 4  # without --max-count the 9 counts, and can never be right
    assert json.loads(output.read_text())["n"] == 4
    result = run_evaluate("--model", str(tarball), "--data", str(abid), "--max-count", "3")
    assert result["n"] == 3


def test_show_prints_predictions_next_to_the_truth(trained_model, split_channels):
    model_dir, _ = trained_model
    proc = subprocess.run(
        [
            sys.executable,
            str(EVALUATE),
            "--model",
            str(model_dir),
            "--data",
            str(split_channels["test"]),
            "--show",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    shown = [line for line in proc.stdout.splitlines() if line.startswith("image ")]
    assert len(shown) == 3 and "true count" in shown[0] and "predicted" in shown[0]


@pytest.mark.parametrize("bad", ["missing", "empty"])
def test_unusable_data_folder_is_a_clear_error(trained_model, tmp_path, bad):
    model_dir, _ = trained_model
    data = tmp_path / "data"
    if bad == "empty":
        data.mkdir()
    proc = subprocess.run(
        [sys.executable, str(EVALUATE), "--model", str(model_dir), "--data", str(data)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert str(data) in proc.stderr
