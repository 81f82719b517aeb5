"""SageMaker request builders for training `sagemaker_code/train.py`, and its metric regexes.

The metric definitions live here, next to the job config that carries them, and a test runs the
real training script and checks that every regex finds its value in the script's output.
Standard library only: this module is imported by DAG tasks and by tests in both environments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

ENTRY_POINT = "train.py"
# SageMaker's names are "<channel>:<metric>"; train.py prints "<prefix>_<metric>=<value>".
_NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": "train:loss", "Regex": rf"\btrain_loss={_NUMBER}"},
    {"Name": "validation:loss", "Regex": rf"\bval_loss={_NUMBER}"},
    {"Name": "validation:accuracy", "Regex": rf"\bval_accuracy={_NUMBER}"},
    {"Name": "validation:rmse", "Regex": rf"\bval_rmse={_NUMBER}"},
    {"Name": "validation:mae", "Regex": rf"\bval_mae={_NUMBER}"},
    {"Name": "validation:within_1", "Regex": rf"\bval_within_1={_NUMBER}"},
    {"Name": "test:loss", "Regex": rf"\btest_loss={_NUMBER}"},
    {"Name": "test:accuracy", "Regex": rf"\btest_accuracy={_NUMBER}"},
    {"Name": "test:rmse", "Regex": rf"\btest_rmse={_NUMBER}"},
    {"Name": "test:mae", "Regex": rf"\btest_mae={_NUMBER}"},
    {"Name": "test:within_1", "Regex": rf"\btest_within_1={_NUMBER}"},
    {"Name": "train:images_per_s", "Regex": rf"\bimages_per_s={_NUMBER}"},
]
# Tuning objectives that make sense for the counter, with their direction.
OBJECTIVES = {"validation:accuracy": "Maximize", "validation:rmse": "Minimize", "validation:loss": "Minimize"}


def parse_metrics(log_text: str, definitions: list[dict[str, str]] = METRIC_DEFINITIONS) -> dict[str, list[float]]:
    """Every value each definition finds in a log, in order (how SageMaker reads metrics)."""
    found: dict[str, list[float]] = {}
    for definition in definitions:
        values = [float(m) for m in re.findall(definition["Regex"], log_text)]
        if values:
            found[definition["Name"]] = values
    return found


def encode_hyperparameters(hyperparameters: Mapping[str, object]) -> dict[str, str]:
    """SageMaker takes string values; like the SageMaker SDK, each value is JSON-encoded and the
    training toolkit decodes it before passing `--name value` to the script."""
    return {str(k): json.dumps(v) for k, v in hyperparameters.items()}


def training_job_config(
    job_name: str,
    image_uri: str,
    role_arn: str,
    source_s3_uri: str,
    channels: Mapping[str, str],
    output_s3_uri: str,
    hyperparameters: Mapping[str, object],
    region: str,
    instance_type: str = "ml.m5.xlarge",
    instance_count: int = 1,
    volume_gb: int = 30,
    max_runtime_s: int = 4 * 3600,
    checkpoint_s3_uri: str | None = None,
    use_spot: bool = False,
    max_wait_s: int | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict:
    """A CreateTrainingJob request that runs train.py in script mode.

    channels: channel name (train, validation, test) -> S3 prefix in the `<count>/<key>.jpg` layout.
    source_s3_uri: the sourcedir.tar.gz holding sagemaker_code/.
    """
    if not channels.get("train"):
        raise ValueError("a training job needs a 'train' channel")
    if use_spot and not checkpoint_s3_uri:
        raise ValueError("spot training needs checkpoint_s3_uri, or an interruption loses the run")
    script_mode = {
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": source_s3_uri,
        "sagemaker_region": region,
        "sagemaker_container_log_level": 20,
    }
    config: dict = {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {
            "TrainingImage": image_uri,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
        },
        "RoleArn": role_arn,
        "HyperParameters": encode_hyperparameters({**hyperparameters, **script_mode}),
        "InputDataConfig": [
            {
                "ChannelName": name,
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                                "S3DataDistributionType": "FullyReplicated"}},
                "ContentType": "application/x-image",
                "InputMode": "File",
            }
            for name, uri in channels.items() if uri
        ],
        "OutputDataConfig": {"S3OutputPath": output_s3_uri},
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": instance_count,
                           "VolumeSizeInGB": volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_s},
        "EnableManagedSpotTraining": use_spot,
        "Tags": [{"Key": k, "Value": v} for k, v in (tags or {}).items()],
    }
    if checkpoint_s3_uri:
        config["CheckpointConfig"] = {"S3Uri": checkpoint_s3_uri, "LocalPath": "/opt/ml/checkpoints"}
    if use_spot:
        config["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_wait_s or 2 * max_runtime_s
    return config
