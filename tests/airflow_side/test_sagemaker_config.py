"""The training job request builder, validated against botocore's own SageMaker service model."""

from __future__ import annotations

import json
import re

import botocore.session
import pytest
from botocore.validate import ParamValidator

from bin_counter import sagemaker_config


def validate(operation: str, params: dict) -> None:
    model = botocore.session.get_session().get_service_model("sagemaker")
    report = ParamValidator().validate(params, model.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


def build(**overrides) -> dict:
    args = dict(
        job_name="bin-count-retrain-20261124-1",
        image_uri="763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-cpu-py311",
        role_arn="arn:aws:iam::123456789012:role/bin-counter-sagemaker",
        source_s3_uri="s3://bin-counter/code/sourcedir.tar.gz",
        channels={"train": "s3://bin-counter/data/v1/train/", "validation": "s3://bin-counter/data/v1/validation/"},
        output_s3_uri="s3://bin-counter/models/",
        hyperparameters={"epochs": 6, "batch-size": 32, "lr": 0.001, "arch": "mobilenet_v2"},
        region="us-east-1",
    )
    args.update(overrides)
    return sagemaker_config.training_job_config(**args)


def test_training_job_config_is_valid_for_create_training_job():
    validate("CreateTrainingJob", build())
    validate("CreateTrainingJob", build(use_spot=True, checkpoint_s3_uri="s3://bin-counter/ckpt/job/",
                                        tags={"dataset-version": "v1"}))


def test_hyperparameters_are_json_encoded_like_the_sdk_does():
    hps = build()["HyperParameters"]
    assert hps["epochs"] == "6" and hps["arch"] == '"mobilenet_v2"'
    assert json.loads(hps["sagemaker_program"]) == "train.py"
    assert json.loads(hps["sagemaker_submit_directory"]) == "s3://bin-counter/code/sourcedir.tar.gz"


def test_spot_without_checkpoints_is_refused():
    with pytest.raises(ValueError, match="checkpoint"):
        build(use_spot=True)


def test_a_job_needs_training_data():
    with pytest.raises(ValueError, match="train"):
        build(channels={"validation": "s3://x/y/"})


def test_metric_regexes_compile_and_find_one_number_each():
    line = ("epoch=3 train_loss=1.2345 val_loss=1.3012 val_accuracy=0.4512 val_rmse=1.0423 val_mae=0.8 "
            "val_within_1=0.9 lr=0.000100 epoch_time_s=12.0 images_per_s=98.5")
    found = sagemaker_config.parse_metrics(line)
    assert found["validation:accuracy"] == [0.4512]
    assert found["train:loss"] == [1.2345]
    assert "test:accuracy" not in found
    for definition in sagemaker_config.METRIC_DEFINITIONS:
        assert re.compile(definition["Regex"]).groups == 1
    assert set(sagemaker_config.OBJECTIVES) <= {d["Name"] for d in sagemaker_config.METRIC_DEFINITIONS}
