"""The training job request builder, validated against botocore's own SageMaker service model."""

from __future__ import annotations

import io
import json
import re
import tarfile

import botocore.session
import pytest
from botocore.validate import ParamValidator

from bin_counter import sagemaker_config
from bin_counter.retrain import code_archive
from standin import constraints
from tests.conftest import REPO


def validate(operation: str, params: dict) -> None:
    """The request as SageMaker would take it: botocore's checks, and the service's own constraints
    (lengths, patterns, enums) that botocore leaves to the server."""
    shape = botocore.session.get_session().get_service_model("sagemaker").operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    refusal = constraints.report(params, shape)
    assert refusal is None, refusal


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
    validate(
        "CreateTrainingJob",
        build(use_spot=True, checkpoint_s3_uri="s3://bin-counter/ckpt/job/", tags={"dataset-version": "v1"}),
    )


def test_hyperparameters_are_json_encoded_like_the_sdk_does():
    hps = build()["HyperParameters"]
    assert hps["epochs"] == "6" and hps["arch"] == '"mobilenet_v2"'
    assert json.loads(hps["sagemaker_program"]) == "train.py"
    assert json.loads(hps["sagemaker_submit_directory"]) == "s3://bin-counter/code/sourcedir.tar.gz"


def test_spot_without_checkpoints_is_refused():
    with pytest.raises(ValueError, match="checkpoint"):
        build(use_spot=True)


def test_a_datasets_manifests_are_manifest_file_channels_and_folders_prefixes():
    config = build(
        channels={
            "train": "s3://bin-counter/datasets/v1/train.manifest",
            "validation": "s3://bin-counter/datasets/v1/validation/",
        }
    )
    validate("CreateTrainingJob", config)
    sources = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in config["InputDataConfig"]}
    assert sources["train"] == {
        "S3DataType": "ManifestFile",
        "S3Uri": "s3://bin-counter/datasets/v1/train.manifest",
        "S3DataDistributionType": "FullyReplicated",
    }
    assert sources["validation"]["S3DataType"] == "S3Prefix"


def test_a_job_needs_training_data():
    with pytest.raises(ValueError, match="train"):
        build(channels={"validation": "s3://x/y/"})


def test_metric_regexes_compile_and_find_one_number_each():
    line = (
        "epoch=3 train_loss=1.2345 val_loss=1.3012 val_accuracy=0.4512 val_rmse=1.0423 val_mae=0.8 "
        "val_within_1=0.9 lr=0.000100 epoch_time_s=12.0 images_per_s=98.5"
    )
    found = sagemaker_config.parse_metrics(line)
    assert found["validation:accuracy"] == [0.4512]
    assert found["train:loss"] == [1.2345]
    assert "test:accuracy" not in found
    for definition in sagemaker_config.METRIC_DEFINITIONS:
        assert re.compile(definition["Regex"]).groups == 1
    assert set(sagemaker_config.OBJECTIVES) <= {d["Name"] for d in sagemaker_config.METRIC_DEFINITIONS}


# -- the retraining DAG's builders -----------------------------------------------------------------
PARAMS = {
    "bucket": "bin-counter",
    "arch": "mobilenet_v2",
    "mode": "finetune",
    "max_count": 5,
    "epochs_min": 4,
    "epochs_max": 8,
    "batch_sizes": [16, 32],
    "lr_min": 3e-4,
    "lr_max": 3e-3,
    "objective": "validation:accuracy",
    "strategy": "Bayesian",
    "max_jobs": 4,
    "max_parallel_jobs": 2,
    "extra_hyperparameters": {"image-size": 160},
    "training_instance_type": "ml.g4dn.xlarge",
    "endpoint_instance_type": "ml.m5.large",
    "endpoint_name": "bin-counter",
}
DATA = {
    "version": "v-0123456789ab",
    "channels": {s: f"s3://bin-counter/datasets/v-0123456789ab/{s}.manifest" for s in ("train", "validation", "test")},
}
ACCOUNT = {
    "region": "eu-west-1",
    "role_arn": "arn:aws:iam::123456789012:role/bin-counter-sagemaker",
    "training_image": "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6.0-cpu-py312",
    "inference_image": "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312",
}
CODE = "s3://bin-counter/code/0123456789abcdef/sourcedir.tar.gz"
BEST = {
    "training_job": "bc-tune-0123456789ab-002-deadbeef",
    "hyperparameters": {"epochs": 6, "batch-size": 32, "lr": 0.0011},
}
WEIGHTS = "s3://bin-counter/weights/b03531047ffacf1e/mobilenet_v2-b0353104.pth"


def weights_channel(channels: list[dict]) -> dict | None:
    return next((c for c in channels if c["ChannelName"] == "weights"), None)


def test_run_job_names_are_stable_per_run_and_within_sagemakers_limits():
    names = sagemaker_config.run_job_names("bin_count_retrain", "manual__2026-11-24T10:00:00+00:00")
    assert names == sagemaker_config.run_job_names("bin_count_retrain", "manual__2026-11-24T10:00:00+00:00")
    assert names != sagemaker_config.run_job_names("bin_count_retrain", "manual__2026-11-24T10:00:01+00:00")
    assert len(names["tuning_job"]) <= 32 and len(names["training_job"]) <= 63
    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31}", names["tuning_job"])


def test_tuning_request_is_valid_and_tunes_the_three_hyperparameters():
    from bin_counter.retrain import tuning_request

    config = tuning_request(PARAMS, DATA, ACCOUNT, CODE, "bin_count_retrain", "manual__1")
    validate("CreateHyperParameterTuningJob", config)
    ranges = config["HyperParameterTuningJobConfig"]["ParameterRanges"]
    assert sagemaker_config.tuned_names(ranges) == {"epochs", "batch-size", "lr"}
    assert ranges["ContinuousParameterRanges"][0]["ScalingType"] == "Logarithmic"
    static = config["TrainingJobDefinition"]["StaticHyperParameters"]
    assert "lr" not in static and json.loads(static["image-size"]) == 160
    assert json.loads(static["arch"]) == "mobilenet_v2"
    assert config["HyperParameterTuningJobConfig"]["TrainingJobEarlyStoppingType"] == "Auto"
    channels = {c["ChannelName"] for c in config["TrainingJobDefinition"]["InputDataConfig"]}
    assert channels == {"train", "validation"}  # the trials never see the test images


def test_every_job_gets_the_imagenet_weights_file_as_its_weights_channel():
    from bin_counter.retrain import final_training_request, tuning_request

    tuning = tuning_request(PARAMS, DATA, ACCOUNT, CODE, "bin_count_retrain", "manual__1", WEIGHTS)
    final = final_training_request(PARAMS, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1", WEIGHTS)
    validate("CreateHyperParameterTuningJob", tuning)
    validate("CreateTrainingJob", final)
    for channels in (tuning["TrainingJobDefinition"]["InputDataConfig"], final["InputDataConfig"]):
        # The one object, downloaded whole before the script starts (train.py finds it by name).
        channel = weights_channel(channels)
        assert channel["DataSource"]["S3DataSource"] == {
            "S3DataType": "S3Prefix",
            "S3Uri": WEIGHTS,
            "S3DataDistributionType": "FullyReplicated",
        }
        assert channel["InputMode"] == "File"
    assert {c["ChannelName"] for c in tuning["TrainingJobDefinition"]["InputDataConfig"]} == {
        "train",
        "validation",
        "weights",
    }
    # Without the file (not found on the worker, or --weights none) the jobs have no such channel.
    assert (
        weights_channel(
            tuning_request(PARAMS, DATA, ACCOUNT, CODE, "bin_count_retrain", "manual__1")["TrainingJobDefinition"][
                "InputDataConfig"
            ]
        )
        is None
    )


def test_distributed_training_launches_the_images_torch_distributed_for_trials_and_the_final_job():
    from bin_counter.retrain import final_training_request, tuning_request

    params = {**PARAMS, "distributed_training": True, "processes_per_instance": 4}
    tuning = tuning_request(params, DATA, ACCOUNT, CODE, "bin_count_retrain", "manual__1")
    final = final_training_request(params, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1")
    validate("CreateHyperParameterTuningJob", tuning)
    validate("CreateTrainingJob", final)
    for hyperparameters in (tuning["TrainingJobDefinition"]["StaticHyperParameters"], final["HyperParameters"]):
        assert json.loads(hyperparameters["sagemaker_torch_distributed_enabled"]) is True
        assert json.loads(hyperparameters["sagemaker_mpi_num_of_processes_per_host"]) == 4
    # Without a count the toolkit starts one process per GPU; without the Param, no torchrun at all.
    per_gpu = final_training_request(
        {**PARAMS, "distributed_training": True}, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1"
    )["HyperParameters"]
    assert "sagemaker_mpi_num_of_processes_per_host" not in per_gpu
    plain = final_training_request(
        {**PARAMS, "processes_per_instance": 4}, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1"
    )["HyperParameters"]
    assert not {"sagemaker_torch_distributed_enabled", "sagemaker_mpi_num_of_processes_per_host"} & set(plain)
    with pytest.raises(ValueError, match="processes_per_host"):
        build(processes_per_host=2)


def test_instances_storage_and_time_limit_come_from_the_params_for_trials_and_the_final_job():
    from bin_counter.retrain import final_training_request, tuning_request

    params = {
        **PARAMS,
        "distributed_training": True,
        "training_instance_count": 2,
        "training_volume_gb": 100,
        "training_max_hours": 12,
    }
    tuning = tuning_request(params, DATA, ACCOUNT, CODE, "bin_count_retrain", "manual__1")
    final = final_training_request(params, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1")
    validate("CreateHyperParameterTuningJob", tuning)
    validate("CreateTrainingJob", final)
    for request in (tuning["TrainingJobDefinition"], final):
        assert request["ResourceConfig"] == {
            "InstanceType": "ml.g4dn.xlarge",
            "InstanceCount": 2,
            "VolumeSizeInGB": 100,
        }
        assert request["StoppingCondition"]["MaxRuntimeInSeconds"] == 12 * 3600
    # Without the Params: one instance, 30 GB, four hours.
    plain = final_training_request(PARAMS, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1")
    assert plain["ResourceConfig"]["InstanceCount"] == 1 and plain["ResourceConfig"]["VolumeSizeInGB"] == 30
    assert plain["StoppingCondition"]["MaxRuntimeInSeconds"] == 4 * 3600
    with pytest.raises(ValueError, match="2 instances without distributed training would each train alone"):
        final_training_request(
            {**PARAMS, "training_instance_count": 2}, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1"
        )


def test_fixed_values_become_one_value_ranges():
    ranges = sagemaker_config.search_ranges((3, 3), [8], (0.002, 0.002))
    assert ranges["IntegerParameterRanges"] == [] and ranges["ContinuousParameterRanges"] == []
    assert {r["Name"]: r["Values"] for r in ranges["CategoricalParameterRanges"]} == {
        "epochs": ["3"],
        "lr": ["0.002"],
        "batch-size": ["8"],
    }
    with pytest.raises(ValueError, match="epochs"):
        sagemaker_config.search_ranges((5, 3), [8], (0.001, 0.01))
    with pytest.raises(ValueError, match="learning rate"):
        sagemaker_config.search_ranges((1, 3), [8], (0, 0.01))


def test_final_training_request_scores_the_champion_on_the_test_images():
    from bin_counter.retrain import final_training_request

    champion = {"model_data_url": "s3://bin-counter/models/old-final/output/model.tar.gz"}
    config = final_training_request(PARAMS, DATA, ACCOUNT, CODE, BEST, champion, "bin_count_retrain", "manual__1")
    validate("CreateTrainingJob", config)
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in config["InputDataConfig"]}
    assert channels["champion"] == champion["model_data_url"] and set(channels) == {
        "train",
        "validation",
        "test",
        "champion",
    }
    hps = config["HyperParameters"]
    assert json.loads(hps["train-on-validation"]) is True and json.loads(hps["lr"]) == 0.0011
    assert config["CheckpointConfig"]["S3Uri"].endswith(f"/{config['TrainingJobName']}/")
    first = final_training_request(PARAMS, DATA, ACCOUNT, CODE, BEST, None, "bin_count_retrain", "manual__1")
    assert "champion" not in {c["ChannelName"] for c in first["InputDataConfig"]}


def test_best_trial_decodes_hyperparameters_and_explains_a_tuning_job_without_one():
    described = {
        "HyperParameterTuningJobName": "t",
        "BestTrainingJob": {
            "TrainingJobName": "t-001-x",
            "TunedHyperParameters": {"lr": "0.002", "batch-size": "32", "epochs": "5"},
            "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "validation:accuracy", "Value": 0.41},
        },
    }
    best = sagemaker_config.best_trial(described)
    assert best["hyperparameters"] == {"lr": 0.002, "batch-size": 32, "epochs": 5}
    assert best["objective"] == {"name": "validation:accuracy", "value": 0.41}
    with pytest.raises(ValueError, match="no successful trial"):
        sagemaker_config.best_trial(
            {"HyperParameterTuningJobName": "t", "TrainingJobStatusCounters": {"NonRetryableError": 4}}
        )


def test_account_settings_need_both_roles():
    from bin_counter.account import SettingsError, sagemaker_settings

    with pytest.raises(SettingsError, match="bin_counter_sagemaker lacks role_arn and lambda_role_arn"):
        sagemaker_settings(None, "eu-west-1")
    # Lambda refuses a role that does not trust lambda.amazonaws.com: the SageMaker role is no fallback.
    with pytest.raises(SettingsError, match=r"lacks lambda_role_arn: set it to the stack output SageMakerVariable"):
        sagemaker_settings({"role_arn": ACCOUNT["role_arn"]}, "eu-west-1")
    lambda_role = "arn:aws:iam::123456789012:role/bin-counter-api"
    settings = sagemaker_settings({"role_arn": ACCOUNT["role_arn"], "lambda_role_arn": lambda_role}, "eu-west-1")
    assert settings["training_image"].startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training")
    assert settings["lambda_role_arn"] == lambda_role


ROLES = {"role_arn": ACCOUNT["role_arn"], "lambda_role_arn": "arn:aws:iam::123456789012:role/bin-counter-api"}


# The images carry the version and Python of sagemaker_code/framework.json, the container env's.
FRAMEWORK = json.loads((REPO / "sagemaker_code" / "framework.json").read_text())
V, PY = FRAMEWORK["framework_version"], FRAMEWORK["py_version"]


@pytest.mark.parametrize(
    ("region", "training", "endpoint", "expected"),
    [
        (
            "us-east-1",
            "ml.m5.xlarge",
            "ml.m5.large",
            (
                f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:{V}-cpu-{PY}",
                f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:{V}-cpu-{PY}",
            ),
        ),
        # A GPU instance gets the GPU image (it trained on its CPU before), the endpoint still a CPU one.
        (
            "us-east-1",
            "ml.g4dn.xlarge",
            "ml.m5.large",
            (
                f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:{V}-gpu-{PY}",
                f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:{V}-cpu-{PY}",
            ),
        ),
        # The images' registry is another AWS account in some regions: a hard-coded one pulled nothing there.
        (
            "af-south-1",
            "ml.m5.xlarge",
            "ml.m5.large",
            (
                f"626614931356.dkr.ecr.af-south-1.amazonaws.com/pytorch-training:{V}-cpu-{PY}",
                f"626614931356.dkr.ecr.af-south-1.amazonaws.com/pytorch-inference:{V}-cpu-{PY}",
            ),
        ),
    ],
)
def test_the_images_are_the_sdks_for_the_region_and_the_instance_types(region, training, endpoint, expected):
    from bin_counter.account import sagemaker_settings

    settings = sagemaker_settings(ROLES, region, training, endpoint)
    assert (settings["training_image"], settings["inference_image"]) == expected


def test_images_the_sdk_does_not_list_fail_in_settings_and_a_variables_images_win():
    from bin_counter.account import SettingsError, sagemaker_settings

    with pytest.raises(
        SettingsError,
        match=rf"no SageMaker pytorch {re.escape(V)} {PY} training image for "
        r"ml\.m5\.xlarge in xx-nowhere-1: .*[Uu]nsupported region",
    ):
        sagemaker_settings(ROLES, "xx-nowhere-1", "ml.m5.xlarge", "ml.m5.large")
    own = {
        **ROLES,
        "training_image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mine:1",
        "inference_image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mine-serve:1",
    }
    settings = sagemaker_settings(own, "xx-nowhere-1", "ml.m5.xlarge", "ml.m5.large")  # the SDK is not asked
    assert settings["training_image"].endswith("/mine:1") and settings["inference_image"].endswith("/mine-serve:1")


def test_the_code_and_the_model_ask_sagemaker_to_install_nothing():
    """SageMaker's training toolkit pip-installs a requirements.txt (`pip install .` for a setup.py) at
    the source dir's root when the job starts, and the inference image one in the model's code/ when the
    endpoint starts: on billed time, and failing without internet. The image has what the code needs."""
    with tarfile.open(fileobj=io.BytesIO(code_archive())) as source:
        names = source.getnames()
    assert "train.py" in names and "framework.json" in names
    assert not {"requirements.txt", "setup.py", "pyproject.toml"} & set(names), names
    train = (REPO / "sagemaker_code" / "train.py").read_text()
    serving_code = re.search(r"^SERVING_CODE = \(([^)]*)\)", train, re.M).group(1)
    assert '"inference.py"' in serving_code and "requirements" not in serving_code
    with tarfile.open(REPO / "models" / "bin-counter.tar.gz") as published:
        assert "code/inference.py" in published.getnames()
        assert "code/requirements.txt" not in published.getnames()
