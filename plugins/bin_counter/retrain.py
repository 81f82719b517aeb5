"""What the retraining DAG's own tasks build, as functions testable without Airflow: the training
code's package, the backbone's ImageNet weights in the bucket, and the SageMaker requests of a run from
its Params, dataset, account and champion.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Mapping
from pathlib import Path

from bin_counter import registry, sagemaker_config, weights
from bin_counter.artifacts import content_key, put_once
from bin_counter.paths import CODE_DIR


# -- the training code ----------------------------------------------------------------------------
def code_archive(code_dir: Path = CODE_DIR) -> bytes:
    """sourcedir.tar.gz of the training code, byte-identical for identical sources."""
    buf = io.BytesIO()
    # gzip stores a time; mtime=0 keeps the archive's bytes a function of the sources only.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in sorted(p for p in code_dir.iterdir() if p.suffix in (".py", ".txt", ".json") and p.is_file()):
            info = tar.gettarinfo(str(path), arcname=path.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buf.getvalue()


def upload_code(s3, bucket: str, code_dir: Path = CODE_DIR) -> str:
    """Upload sourcedir.tar.gz under its content hash (once) and return its S3 URI."""
    if not (code_dir / "train.py").is_file():
        raise FileNotFoundError(f"{code_dir} has no train.py: set BIN_COUNTER_CODE_DIR to the sagemaker_code folder")
    data = code_archive(code_dir)
    return put_once(s3, bucket, content_key("code", data, "sourcedir.tar.gz"), data)


# -- requests the DAG sends, from its Params ------------------------------------------------------
def static_hyperparameters(params: Mapping) -> dict:
    return {
        "arch": params["arch"],
        "mode": params["mode"],
        "max-count": params["max_count"],
        **dict(params.get("extra_hyperparameters") or {}),
    }


def weights_channel(s3, params: Mapping) -> str | None:
    """The S3 URI of the backbone's ImageNet weights file, stored once (bin_counter.weights): the jobs'
    `weights` channel. None when the jobs do not start from ImageNet weights or the file is not here and
    the jobs can download it; weights.WeightsNotFound when they cannot (efficientnet_lite0)."""
    hyperparameters = static_hyperparameters(params)
    if not weights.uses_imagenet(hyperparameters):
        print(f"the jobs start from --weights {hyperparameters['weights']}: no ImageNet weights to hand over")
        return None
    return weights.upload_weights(s3, params["bucket"], params["arch"])


def distribution(params: Mapping) -> dict:
    """The jobs' data-parallel settings from the run's Params. Trials and the final job train alike:
    the batch size is per process, so the best trial's hyperparameters mean the same in the final job."""
    return {
        "distributed": bool(params.get("distributed_training")),
        "processes_per_host": params.get("processes_per_instance") if params.get("distributed_training") else None,
    }


def resources(params: Mapping) -> dict:
    """The jobs' instances, storage and time limit from the run's Params, trials and the final job alike."""
    return {
        "instance_type": params["training_instance_type"],
        "instance_count": int(params.get("training_instance_count") or 1),
        "volume_gb": int(params.get("training_volume_gb") or 30),
        "max_runtime_s": int(float(params.get("training_max_hours") or 4) * 3600),
    }


def tuning_request(
    params: Mapping,
    data: Mapping,
    account: Mapping,
    code_uri: str,
    dag_id: str,
    run_id: str,
    weights_uri: str | None = None,
) -> dict:
    """CreateHyperParameterTuningJob for this run: trials train on train, are scored on validation,
    and start from the ImageNet weights file at `weights_uri` (their `weights` channel), if any."""
    names = sagemaker_config.run_job_names(dag_id, run_id)
    bucket = params["bucket"]
    trial = sagemaker_config.training_job_config(
        job_name=names["tuning_job"],
        image_uri=account["training_image"],
        role_arn=account["role_arn"],
        source_s3_uri=code_uri,
        channels={
            "train": data["channels"]["train"],
            "validation": data["channels"]["validation"],
            weights.CHANNEL: weights_uri,
        },
        output_s3_uri=f"s3://{bucket}/models/tuning/",
        hyperparameters=static_hyperparameters(params),
        region=account["region"],
        tags=sagemaker_config.resource_tags(
            {"bin-counter:dataset-version": data["version"], "bin-counter:dag-run": run_id}
        ),
        **resources(params),
        **distribution(params),
    )
    ranges = sagemaker_config.search_ranges(
        (params["epochs_min"], params["epochs_max"]), params["batch_sizes"], (params["lr_min"], params["lr_max"])
    )
    return sagemaker_config.tuning_job_config(
        names["tuning_job"],
        trial,
        ranges,
        params["objective"],
        params["max_jobs"],
        min(params["max_parallel_jobs"], params["max_jobs"]),
        strategy=params["strategy"],
    )


def final_training_request(
    params: Mapping,
    data: Mapping,
    account: Mapping,
    code_uri: str,
    best: Mapping,
    champion: Mapping | None,
    dag_id: str,
    run_id: str,
    weights_uri: str | None = None,
) -> dict:
    """CreateTrainingJob with the best trial's hyperparameters on train + validation (from the ImageNet
    weights file at `weights_uri`, if any), scoring the new model and the serving one (if any) on the
    test images."""
    names = sagemaker_config.run_job_names(dag_id, run_id)
    bucket = params["bucket"]
    channels = dict(data["channels"])
    if champion:
        channels["champion"] = champion["model_data_url"]
    if weights_uri:
        channels[weights.CHANNEL] = weights_uri
    hyperparameters = {**static_hyperparameters(params), **best["hyperparameters"], "train-on-validation": True}
    return sagemaker_config.training_job_config(
        job_name=names["training_job"],
        image_uri=account["training_image"],
        role_arn=account["role_arn"],
        source_s3_uri=code_uri,
        channels=channels,
        output_s3_uri=f"s3://{bucket}/models/",
        hyperparameters=hyperparameters,
        region=account["region"],
        **resources(params),
        checkpoint_s3_uri=f"s3://{bucket}/checkpoints/{names['training_job']}/",
        tags=sagemaker_config.resource_tags(
            {
                "bin-counter:dataset-version": data["version"],
                "bin-counter:dag-run": run_id,
                "bin-counter:best-trial": best["training_job"],
            }
        ),
        **distribution(params),
    )


def register_candidate(
    sm,
    s3,
    params: Mapping,
    job: Mapping,
    data: Mapping,
    account: Mapping,
    decision: Mapping,
    champion: Mapping | None,
    run_id: str,
) -> dict:
    """Register the model the gate chose (the finished training job's, or before anything serves the
    published champion it scored better) as a PendingManualApproval version of the endpoint's model
    package group, with its evaluation report in S3. A retried task finds the version it registered.
    Returns what approval and deployment need: arn, group, version, model_version, report_uri, review
    (the approval page's markdown), reason (the gate's)."""
    bucket = params["bucket"]
    name, artifact = job["TrainingJobName"], job["ModelArtifacts"]["S3ModelArtifacts"]
    # The trained model's card holds both scores (train.py --champion), whichever is registered.
    source_bucket, key = artifact.removeprefix("s3://").split("/", 1)
    card = registry.model_card(s3.get_object(Bucket=source_bucket, Key=key)["Body"].read())
    model_version = card["model_version"]
    if decision.get("deploy") == "published":
        if champion is None:
            raise ValueError("the gate chose the published model, and no champion was given")
        artifact, model_version = champion["model_data_url"], champion["model_version"]
    report = registry.evaluation_report(card.get("metrics", {}), decision, name, data["version"])
    report_uri = registry.store_report(s3, bucket, report)
    group = registry.group_name(params["endpoint_name"])
    registry.ensure_group(sm, group, f"Bin item counters for the endpoint {params['endpoint_name']} (bin-counter)")
    request = registry.version_request(
        group,
        account["inference_image"],
        artifact,
        report_uri,
        {
            "model-version": model_version,
            "training-job": name,
            "dataset-version": data["version"],
            "dag-run": run_id,
            "gate": decision.get("deploy"),
            "test-accuracy": round(report["comparison"]["candidate"]["accuracy"], 4),
        },
        f"{model_version}: {decision.get('reason', '')}",
    )
    arn = registry.register(sm, request, f"{run_id}/{decision.get('deploy')}")
    described = sm.describe_model_package(ModelPackageName=arn)
    return {
        "arn": arn,
        "group": group,
        "version": described["ModelPackageVersion"],
        "status": described["ModelApprovalStatus"],
        "model_version": model_version,
        "report_uri": report_uri,
        "review": registry.review_markdown(report),
        "reason": decision.get("reason", ""),
    }
