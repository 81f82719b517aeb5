"""SageMaker request builders for training, tuning and serving `sagemaker_code/`, its metric regexes,
and the best trial of a tuning job (what the final training request is built from).

The metric definitions live here, next to the job config that carries them, and a test runs the
real training script and checks that every regex finds its value in the script's output.
Standard library only: this module is imported by DAG tasks and by tests in both environments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from bin_counter.artifacts import digest

ENTRY_POINT = "train.py"
# The training toolkit's switches for data-parallel training (sagemaker_training.params and
# sagemaker_pytorch_container.training).
TORCH_DISTRIBUTED = "sagemaker_torch_distributed_enabled"
PROCESSES_PER_HOST = "sagemaker_mpi_num_of_processes_per_host"
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
    # The model serving now, scored by the same job on the same test images (train.py --champion).
    {"Name": "champion:accuracy", "Regex": rf"\bchampion_test_accuracy={_NUMBER}"},
    {"Name": "champion:rmse", "Regex": rf"\bchampion_test_rmse={_NUMBER}"},
    {"Name": "champion:mae", "Regex": rf"\bchampion_test_mae={_NUMBER}"},
    {"Name": "champion:within_1", "Regex": rf"\bchampion_test_within_1={_NUMBER}"},
    # The same on the live photos of the test channel alone (keys "live-...", bin_counter.live), both
    # models; printed only when the test channel holds live photos.
    {"Name": "test:live_accuracy", "Regex": rf"\blive_test_accuracy={_NUMBER}"},
    {"Name": "test:live_rmse", "Regex": rf"\blive_test_rmse={_NUMBER}"},
    {"Name": "test:live_n", "Regex": rf"\blive_test_n={_NUMBER}"},
    {"Name": "champion:live_accuracy", "Regex": rf"\bchampion_live_test_accuracy={_NUMBER}"},
    {"Name": "champion:live_rmse", "Regex": rf"\bchampion_live_test_rmse={_NUMBER}"},
    {"Name": "champion:live_n", "Regex": rf"\bchampion_live_test_n={_NUMBER}"},
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


MANIFEST_SUFFIX = ".manifest"


def s3_data_type(uri: str) -> str:
    """A channel's S3DataType: ManifestFile for a `.manifest` object (as the data-prep DAG names a split's
    manifest, and AWS's examples name theirs), S3Prefix for anything else."""
    return "ManifestFile" if uri.endswith(MANIFEST_SUFFIX) else "S3Prefix"


def training_job_config(
    job_name: str,
    image_uri: str,
    role_arn: str,
    source_s3_uri: str,
    channels: Mapping[str, str | None],
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
    distributed: bool = False,
    processes_per_host: int | None = None,
) -> dict:
    """A CreateTrainingJob request that runs train.py in script mode.

    channels: channel name (train, validation, test, ...) -> S3 URI: a `.manifest` object (a dataset's
    ManifestFile, `s3_data_type`) or a prefix; train.py reads either layout a channel then holds. A
    channel with no URI (None or "") is left out.
    source_s3_uri: the sourcedir.tar.gz holding sagemaker_code/.
    distributed: train data-parallel under the image's `torch_distributed` launcher (torchrun), one
    process per GPU of each instance, or `processes_per_host`.
    """
    if not channels.get("train"):
        raise ValueError("a training job needs a 'train' channel")
    if instance_count > 1 and not distributed:
        raise ValueError(
            f"{instance_count} instances without distributed training would each train alone on the "
            "whole data: set distributed_training, or one instance"
        )
    if use_spot and not checkpoint_s3_uri:
        raise ValueError("spot training needs checkpoint_s3_uri, or an interruption loses the run")
    if processes_per_host is not None and (not distributed or processes_per_host < 1):
        raise ValueError("processes_per_host is for a distributed job, and at least 1")
    script_mode = {
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": source_s3_uri,
        "sagemaker_region": region,
        "sagemaker_container_log_level": 20,
    }
    if distributed:
        # What the SDK's PyTorch estimator sends for distribution={"torch_distributed": {"enabled": True}};
        # the training toolkit reads the process count from the MPI setting's name.
        script_mode[TORCH_DISTRIBUTED] = True
        if processes_per_host:
            script_mode[PROCESSES_PER_HOST] = processes_per_host
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
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": s3_data_type(uri),
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "ContentType": "application/x-image",
                "InputMode": "File",
            }
            for name, uri in channels.items()
            if uri
        ],
        "OutputDataConfig": {"S3OutputPath": output_s3_uri},
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": instance_count, "VolumeSizeInGB": volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_s},
        "EnableManagedSpotTraining": use_spot,
        "Tags": [{"Key": k, "Value": v} for k, v in (tags or {}).items()],
    }
    if checkpoint_s3_uri:
        config["CheckpointConfig"] = {"S3Uri": checkpoint_s3_uri, "LocalPath": "/opt/ml/checkpoints"}
    if use_spot:
        config["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_wait_s or 2 * max_runtime_s
    return config


# -- names derived from the DAG run ---------------------------------------------------------------
def run_digest(dag_id: str, run_id: str) -> str:
    """A short name for a DAG run, the same on every try of its tasks and every re-run of it."""
    return digest(f"{dag_id}/{run_id}")


def run_job_names(dag_id: str, run_id: str) -> dict[str, str]:
    """Names of the run's SageMaker resources, the same on every try of a task, so a retried task
    finds the job its earlier try started. Tuning job names are limited to 32 characters."""
    digest = run_digest(dag_id, run_id)
    final = f"bin-counter-{digest}-final"
    return {
        "tuning_job": f"bc-tune-{digest}",
        "training_job": final,
        "model": final,
        "endpoint_config": final,
        "transform_job": f"bin-counter-{digest}-batch",
    }


# -- hyperparameter tuning ------------------------------------------------------------------------
def search_ranges(epochs: Sequence[int], batch_sizes: Sequence[int], lr: Sequence[float]) -> dict:
    """ParameterRanges over train.py's epochs (integers, inclusive), batch size (the listed values)
    and learning rate (continuous, searched on a log scale)."""
    (epochs_min, epochs_max), (lr_min, lr_max) = epochs, lr
    if not 1 <= epochs_min <= epochs_max:
        raise ValueError(f"epochs range {epochs_min}..{epochs_max}: need 1 <= min <= max")
    if not 0 < lr_min <= lr_max:
        raise ValueError(f"learning rate range {lr_min}..{lr_max}: need 0 < min <= max")
    if not batch_sizes:
        raise ValueError("batch sizes: list at least one")
    ranges: dict = {"IntegerParameterRanges": [], "ContinuousParameterRanges": [], "CategoricalParameterRanges": []}
    # SageMaker refuses a range whose ends are equal; a fixed value is a one-value categorical range.
    if epochs_min == epochs_max:
        ranges["CategoricalParameterRanges"].append({"Name": "epochs", "Values": [str(epochs_min)]})
    else:
        ranges["IntegerParameterRanges"].append(
            {"Name": "epochs", "MinValue": str(epochs_min), "MaxValue": str(epochs_max), "ScalingType": "Auto"}
        )
    if lr_min == lr_max:
        ranges["CategoricalParameterRanges"].append({"Name": "lr", "Values": [repr(float(lr_min))]})
    else:
        ranges["ContinuousParameterRanges"].append(
            {
                "Name": "lr",
                "MinValue": repr(float(lr_min)),
                "MaxValue": repr(float(lr_max)),
                "ScalingType": "Logarithmic",
            }
        )
    ranges["CategoricalParameterRanges"].append({"Name": "batch-size", "Values": [str(int(b)) for b in batch_sizes]})
    return ranges


def tuned_names(ranges: Mapping) -> set[str]:
    return {r["Name"] for kind in ranges.values() for r in kind}


def tuning_job_config(
    job_name: str,
    training: Mapping,
    ranges: Mapping,
    objective: str,
    max_jobs: int,
    max_parallel_jobs: int,
    strategy: str = "Bayesian",
    early_stopping: bool = True,
) -> dict:
    """A CreateHyperParameterTuningJob request whose trials are the `training` job (as
    training_job_config builds it) with the tuned hyperparameters taken out of its static ones."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose one of {sorted(OBJECTIVES)}")
    if not 1 <= max_parallel_jobs <= max_jobs:
        raise ValueError(f"max parallel jobs {max_parallel_jobs} must be between 1 and max jobs {max_jobs}")
    tuned = tuned_names(ranges)
    definition = {
        "StaticHyperParameters": {k: v for k, v in training["HyperParameters"].items() if k not in tuned},
        "AlgorithmSpecification": training["AlgorithmSpecification"],
        **{
            k: training[k]
            for k in (
                "RoleArn",
                "InputDataConfig",
                "OutputDataConfig",
                "ResourceConfig",
                "StoppingCondition",
                "EnableManagedSpotTraining",
                "CheckpointConfig",
            )
            if k in training
        },
    }
    return {
        "HyperParameterTuningJobName": job_name,
        "HyperParameterTuningJobConfig": {
            "Strategy": strategy,
            "HyperParameterTuningJobObjective": {"Type": OBJECTIVES[objective], "MetricName": objective},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel_jobs},
            "ParameterRanges": dict(ranges),
            "TrainingJobEarlyStoppingType": "Auto" if early_stopping else "Off",
        },
        "TrainingJobDefinition": definition,
        "Tags": training.get("Tags", []),
    }


def best_trial(tuning_job: Mapping) -> dict:
    """The best trial of a finished tuning job: its name, objective value and tuned hyperparameters
    (decoded from SageMaker's strings)."""
    best = tuning_job.get("BestTrainingJob")
    if not best:
        counters = tuning_job.get("TrainingJobStatusCounters", {})
        raise ValueError(
            f"tuning job {tuning_job.get('HyperParameterTuningJobName')} has no successful trial "
            f"(trials: {json.dumps(counters)}); see the trials' FailureReason"
        )
    hyperparameters = {}
    for name, value in best["TunedHyperParameters"].items():
        try:
            hyperparameters[name] = json.loads(value)
        except json.JSONDecodeError:
            hyperparameters[name] = value
    objective = best.get("FinalHyperParameterTuningJobObjectiveMetric", {})
    return {
        "training_job": best["TrainingJobName"],
        "hyperparameters": hyperparameters,
        "objective": {"name": objective.get("MetricName"), "value": objective.get("Value")},
    }


# -- serving ------------------------------------------------------------------------------------------
# The inference toolkit's setting for TorchServe's workers per model (default: one per vCPU); the
# model's inference.py gives each worker its share of the cores.
SERVING_WORKERS = "SAGEMAKER_MODEL_SERVER_WORKERS"


def model_config(
    name: str,
    image_uri: str,
    model_data_url: str,
    role_arn: str,
    tags: Mapping[str, str] | None = None,
    environment: Mapping[str, str] | None = None,
) -> dict:
    """CreateModel for the PyTorch inference container: model.tar.gz carries code/inference.py."""
    return {
        "ModelName": name,
        "PrimaryContainer": {
            "Image": image_uri,
            "ModelDataUrl": model_data_url,
            "Mode": "SingleModel",
            "Environment": {"SAGEMAKER_PROGRAM": "inference.py", **(environment or {})},
        },
        "ExecutionRoleArn": role_arn,
        "Tags": [{"Key": k, "Value": str(v)} for k, v in (tags or {}).items()],
    }


def endpoint_config(
    name: str,
    model_name: str,
    instance_type: str,
    instance_count: int = 1,
    tags: Mapping[str, str] | None = None,
    data_capture: Mapping | None = None,
) -> dict:
    """CreateEndpointConfig with one variant serving `model_name`; with `data_capture` (SageMaker's
    DataCaptureConfig, bin_counter.capture.data_capture_config) the endpoint records its requests."""
    capture = {"DataCaptureConfig": dict(data_capture)} if data_capture else {}
    return {
        **capture,
        "EndpointConfigName": name,
        "ProductionVariants": [
            {
                "VariantName": "AllTraffic",
                "ModelName": model_name,
                "InstanceType": instance_type,
                "InitialInstanceCount": instance_count,
                "InitialVariantWeight": 1.0,
            }
        ],
        "Tags": [{"Key": k, "Value": str(v)} for k, v in (tags or {}).items()],
    }


# EC2's size names, in vCPUs: `large` 2, `xlarge` 4, `<n>xlarge` 4n (a few older types have more, e.g.
# c4.8xlarge 36: then fewer requests in flight than workers, never more).
SIZE_VCPUS = {"medium": 2, "large": 2, "xlarge": 4}


def instance_vcpus(instance_type: str) -> int | None:
    """The vCPUs of an `ml.<family>.<size>` instance type by its size's name; None for a size that
    names none (`metal`, ...)."""
    size = instance_type.rsplit(".", 1)[-1]
    if size in SIZE_VCPUS:
        return SIZE_VCPUS[size]
    multiple = size.removesuffix("xlarge")
    return 4 * int(multiple) if multiple != size and multiple.isdigit() else None


def default_max_concurrent(instance_type: str, max_payload_mb: int) -> int:
    """Requests in flight per transform instance: one per worker TorchServe starts in the CPU image
    (one per vCPU), within SageMaker's MaxConcurrentTransforms x MaxPayloadInMB <= 100 MB. Left unset,
    SageMaker would ask the container's /execution-parameters, which the PyTorch image does not serve,
    and send one at a time (CreateTransformJob's MaxConcurrentTransforms); so also for an unknown size."""
    return max(1, min(instance_vcpus(instance_type) or 1, 100 // max_payload_mb))


def transform_job_config(
    name: str,
    model_name: str,
    manifest_uri: str,
    output_uri: str,
    instance_type: str,
    instance_count: int = 1,
    max_concurrent: int | None = None,
    max_payload_mb: int = 6,
    environment: Mapping[str, str] | None = None,
    invocation_timeout_s: int = 600,
    invocation_retries: int = 3,
    tags: Mapping[str, str] | None = None,
) -> dict:
    """CreateTransformJob: every object the manifest lists sent whole as one record (a photo), each
    answer written as `<output_uri><relative key>.out`, as SageMaker's batch transform writes it.
    `max_concurrent` None: `default_max_concurrent`."""
    if not 1 <= max_payload_mb <= 100:
        raise ValueError(f"max_payload_mb={max_payload_mb}: SageMaker takes 1 to 100 (MB)")
    if max_concurrent is None:
        max_concurrent = default_max_concurrent(instance_type, max_payload_mb)
    if max_concurrent < 1 or max_concurrent * max_payload_mb > 100:
        # SageMaker refuses MaxConcurrentTransforms x MaxPayloadInMB above 100 MB.
        raise ValueError(
            f"max_concurrent={max_concurrent} x max_payload_mb={max_payload_mb} is above SageMaker's "
            "100 MB: lower one of them"
        )
    return {
        "TransformJobName": name,
        "ModelName": model_name,
        "MaxConcurrentTransforms": max_concurrent,
        "MaxPayloadInMB": max_payload_mb,
        "BatchStrategy": "SingleRecord",
        "ModelClientConfig": {
            "InvocationsTimeoutInSeconds": invocation_timeout_s,
            "InvocationsMaxRetries": invocation_retries,
        },
        "Environment": dict(environment or {}),
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "ManifestFile", "S3Uri": manifest_uri}},
            # The model tells JPEG from PNG by their bytes: one type for every photo.
            "ContentType": "application/x-image",
            "CompressionType": "None",
            "SplitType": "None",
        },
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": "application/json", "AssembleWith": "None"},
        "TransformResources": {"InstanceType": instance_type, "InstanceCount": instance_count},
        "Tags": [{"Key": k, "Value": str(v)} for k, v in (tags or {}).items()],
    }


def resource_tags(tags: Mapping[str, object]) -> dict[str, str]:
    """Tag values as SageMaker takes them: strings of at most 256 characters."""
    return {k: str(v)[:256] for k, v in tags.items() if v is not None and str(v) != ""}
