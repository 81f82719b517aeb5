"""The deployment gate: champion against challenger on the same test images, and the published
model as the champion before anything serves."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest

from bin_counter import gate
from tests.airflow_side.conftest import PUBLISHED
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("metrics", "champion", "metric", "margin", "deploy", "says"),
    [
        ({"test:accuracy": 0.40}, False, "accuracy", 0.0, True, "no model is serving"),
        ({"test:accuracy": 0.40, "champion:accuracy": 0.45}, True, "accuracy", 0.0, False, "worse"),
        ({"test:accuracy": 0.40, "champion:accuracy": 0.45}, True, "accuracy", 0.06, True, "not worse"),
        ({"test:accuracy": 0.45, "champion:accuracy": 0.45}, True, "accuracy", 0.0, True, "not worse"),
        ({"test:rmse": 1.10, "champion:rmse": 1.00}, True, "rmse", 0.05, False, "worse"),
        ({"test:rmse": 0.90, "champion:rmse": 1.00}, True, "rmse", 0.0, True, "not worse"),
        ({"test:accuracy": 0.5}, True, "accuracy", 0.0, False, "could not be scored"),
        ({}, False, "accuracy", 0.0, False, "no test:accuracy"),
    ],
)
def test_deployment_decision(metrics, champion, metric, margin, deploy, says):
    decided, reason = gate.deployment_decision(metrics, champion, metric, margin)
    assert decided is deploy and says in reason


SERVING = {"endpoint": "bin-counter", "model": "bin-counter-aaa-final", "model_data_url": "s3://b/m.tar.gz"}


@pytest.mark.parametrize(
    ("metrics", "champion", "deploy_param", "deploy", "version", "held_back"),
    [
        # A serving model: the usual champion/challenger.
        ({"test:accuracy": 0.40, "champion:accuracy": 0.45}, SERVING, True, None, None, True),
        ({"test:accuracy": 0.46, "champion:accuracy": 0.45}, SERVING, True, "new", "job-final", False),
        # Nothing serves: the better of the new and the published model goes out; nothing is held back.
        ({"test:accuracy": 0.40, "champion:accuracy": 0.45}, PUBLISHED, True, "published", "published-v1", False),
        ({"test:accuracy": 0.46, "champion:accuracy": 0.45}, PUBLISHED, True, "new", "job-final", False),
        ({"test:accuracy": 0.40}, PUBLISHED, True, "new", "job-final", False),  # the published one not scored
        ({"test:accuracy": 0.40}, None, True, "new", "job-final", False),
        # The deploy Param off: nothing goes out, and that is no alert.
        ({"test:accuracy": 0.46, "champion:accuracy": 0.45}, SERVING, False, None, None, False),
        ({"test:accuracy": 0.40, "champion:accuracy": 0.45}, PUBLISHED, False, None, None, False),
    ],
)
def test_choose_deployment(metrics, champion, deploy_param, deploy, version, held_back):
    choice = gate.choose_deployment(metrics, champion, "job-final", "accuracy", 0.0, deploy_param)
    assert (choice["deploy"], choice["model_version"], choice["held_back"]) == (deploy, version, held_back)
    assert choice["reason"]


LIVE = {"test:accuracy": 0.50, "champion:accuracy": 0.48, "champion:live_accuracy": 0.60}


@pytest.mark.parametrize(
    "live_accuracy, live_n, deploy, says",
    [
        # Better on all test photos, but worse on enough live ones by more than the margin: held back.
        (0.50, 40, False, "on the live photos the new model is worse by 0.1000"),
        # The same on too few live photos: shown, not deciding.
        (0.50, 10, True, "fewer than 30: shown, not deciding"),
        # Worse on the live photos within the margin: deploys.
        (0.59, 40, True, "not worse beyond the margin on the live photos"),
    ],
)
def test_the_gate_holds_back_a_model_worse_on_enough_live_photos(live_accuracy, live_n, deploy, says):
    metrics = {**LIVE, "test:live_accuracy": live_accuracy, "test:live_n": live_n}
    ok, reason = gate.deployment_decision(metrics, True, "accuracy", 0.02, live_min_photos=30)
    assert ok is deploy and says in reason, reason


def test_the_initial_champion_is_uploaded_once_by_content(s3, bucket, tmp_path):
    def archive(card: dict | None) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            files = {"model.pth": b"weights", **({"model_card.json": json.dumps(card).encode()} if card else {})}
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    path = tmp_path / "bin-counter.tar.gz"
    path.write_bytes(archive({"model_version": "published-1"}))
    first, again = gate.initial_champion(s3, bucket, str(path)), gate.initial_champion(s3, bucket, str(path))
    assert first == again and first["model_version"] == "published-1" and first["published"] is True
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [first["model_data_url"].removeprefix(f"s3://{bucket}/")]
    assert keys[0].startswith("models/published/")
    assert gate.initial_champion(s3, bucket, first["model_data_url"])["model_version"] == "published-1"
    assert gate.initial_champion(s3, bucket, "none") is None
    with pytest.raises(FileNotFoundError, match="make model"):
        gate.initial_champion(s3, bucket, str(tmp_path / "missing.tar.gz"))
    path.write_bytes(archive(None))
    with pytest.raises(ValueError, match=r"no model_card\.json"):
        gate.initial_champion(s3, bucket, str(path))


def test_the_repository_publishes_a_model_within_its_size_budget():
    assert gate.PUBLISHED_MODEL.is_file(), "models/bin-counter.tar.gz is missing: `make model`"
    assert gate.PUBLISHED_MODEL.stat().st_size <= 20 * 1024 * 1024
    assert gate.model_version_of(gate.PUBLISHED_MODEL.read_bytes())
    assert (gate.PUBLISHED_MODEL.parent / "MODEL_CARD.md").is_file()


def test_the_published_model_serves_with_this_checkouts_code():
    """An endpoint runs the archive's code/, so code/ must be what sagemaker_code/ serves with now."""
    train = (REPO / "sagemaker_code" / "train.py").read_text()
    serving_code = re.findall(r'"([\w.]+)"', re.search(r"^SERVING_CODE = \(([^)]*)\)", train, re.M).group(1))
    with tarfile.open(gate.PUBLISHED_MODEL) as archive:
        packed = {
            m.name.removeprefix("code/"): archive.extractfile(m).read()
            for m in archive.getmembers()
            if m.name.startswith("code/")
        }
    stale = sorted(name for name in serving_code if packed.get(name) != (REPO / "sagemaker_code" / name).read_bytes())
    assert serving_code and not stale, f"models/bin-counter.tar.gz serves with an older {stale}: run `make model-code`"
    assert set(packed) == set(serving_code)
