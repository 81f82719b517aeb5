"""A retried training or tuning task attaches to the job its earlier try started (the stand-in,
over HTTP, running the real train.py), and a failed job is retried under a new name."""

from __future__ import annotations

import re
import time

import boto3
import pytest
from airflow.providers.amazon.aws.hooks.sagemaker import LogState, SageMakerHook

from bin_counter.sagemaker_config import search_ranges, tuning_job_config
from bin_counter.sagemaker_operators import ResumableTrainingOperator, ResumableTuningOperator
from tests.airflow_side.conftest import JOB_DATA, job_config, list_objects, sagemaker_client, wait_training_job
from tests.conftest import write_split_dir


class TaskInstance:
    try_number = 2


def training_jobs(stack) -> list[dict]:
    sm = boto3.client("sagemaker", endpoint_url=stack["endpoint"], region_name="us-east-1")
    return sm.list_training_jobs()["TrainingJobSummaries"]


def test_a_retried_training_task_attaches_to_its_job(local_stack_connection, job_inputs):
    config = job_config(job_inputs, "bin-counter-retry-final")
    first = ResumableTrainingOperator(task_id="retrain", config=config, check_interval=1, print_log=False)
    # The first try starts the job and (say) its worker dies before it finishes waiting.
    first.hook.create_training_job(first.config, wait_for_completion=False, print_log=False)
    second = ResumableTrainingOperator(
        task_id="retrain", config=job_config(job_inputs, "bin-counter-retry-final"), check_interval=1, print_log=False
    )
    result = second.execute(context={})
    assert result["Training"]["TrainingJobName"] == "bin-counter-retry-final"
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert [j["TrainingJobName"] for j in training_jobs(local_stack_connection)] == ["bin-counter-retry-final"]
    # A third try, once it is complete: still that job, nothing new started.
    third = ResumableTrainingOperator(
        task_id="retrain", config=job_config(job_inputs, "bin-counter-retry-final"), check_interval=1, print_log=False
    )
    assert third.execute(context={})["Training"]["TrainingJobArn"] == result["Training"]["TrainingJobArn"]
    assert len(training_jobs(local_stack_connection)) == 1
    # Following a job's log, the operator's hook looks at the job on every poll: a job that completed
    # since the last look is seen at once, where the provider's hook looks again only 30 s after it.
    just_looked = ("bin-counter-retry-final", {}, [], 1, LogState.TAILING, result["Training"], time.monotonic())
    assert third.hook.describe_training_job_with_log(*just_looked)[0] == LogState.JOB_COMPLETE
    assert SageMakerHook(aws_conn_id="aws_default").describe_training_job_with_log(*just_looked)[0] == LogState.TAILING


def test_a_failed_training_job_is_retried_under_a_new_name(local_stack_connection, job_inputs):
    bad = job_config(job_inputs, "bin-counter-bad-final", epochs=0)
    with pytest.raises(Exception, match="--epochs must be at least 1"):
        ResumableTrainingOperator(task_id="retrain", config=bad, check_interval=1, print_log=False).execute({})
    fixed = job_config(job_inputs, "bin-counter-bad-final")
    result = ResumableTrainingOperator(task_id="retrain", config=fixed, check_interval=1, print_log=False).execute(
        context={}
    )
    assert result["Training"]["TrainingJobName"].startswith("bin-counter-bad-final-")
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert len(training_jobs(local_stack_connection)) == 2


def test_a_retried_tuning_task_attaches_to_its_tuning_job(local_stack_connection, job_inputs):
    trial = job_config(job_inputs, "bc-tune-retry")
    config = tuning_job_config(
        "bc-tune-retry",
        trial,
        search_ranges((1, 1), [8], (0.001, 0.01)),
        "validation:accuracy",
        max_jobs=1,
        max_parallel_jobs=1,
        strategy="Random",
    )
    first = ResumableTuningOperator(task_id="tune", config=config, check_interval=1)
    first.hook.create_tuning_job(first.config, wait_for_completion=False)
    result = ResumableTuningOperator(
        task_id="tune",
        config=tuning_job_config(
            "bc-tune-retry",
            trial,
            search_ranges((1, 1), [8], (0.001, 0.01)),
            "validation:accuracy",
            max_jobs=1,
            max_parallel_jobs=1,
            strategy="Random",
        ),
        check_interval=1,
    ).execute(context={"ti": TaskInstance()})
    assert result["Tuning"]["HyperParameterTuningJobName"] == "bc-tune-retry"
    assert result["Tuning"]["HyperParameterTuningJobStatus"] == "Completed"
    assert len(training_jobs(local_stack_connection)) == 1  # one trial: nothing started twice


def job_log(stack, name: str) -> str:
    """What the job printed (and the stand-in's own [standin] lines), from its folder."""
    return (stack["state"] / "training-jobs" / name / "opt-ml" / "job.log").read_text()


def test_a_stopped_job_is_retried_from_its_checkpoint_in_s3(local_stack_connection, job_inputs, s3, tmp_path):
    # A training set large enough that the job is still running when its first checkpoint reaches S3.
    folder = write_split_dir(tmp_path / "more", {0: 10, 1: 10, 2: 10}, seed=7)
    for image in folder.rglob("*.jpg"):
        s3.put_object(Bucket=job_inputs, Key=f"{JOB_DATA}/more/{image.relative_to(folder)}", Body=image.read_bytes())

    def config() -> dict:
        request = job_config(job_inputs, "bin-counter-ckpt-final", epochs=6, **{"batch-size": 2})
        for channel in request["InputDataConfig"]:
            if channel["ChannelName"] == "train":
                channel["DataSource"]["S3DataSource"]["S3Uri"] = f"s3://{job_inputs}/{JOB_DATA}/more/"
        # As retrain.py asks for it (sagemaker_config.training_job_config's checkpoint_s3_uri).
        request["CheckpointConfig"] = {
            "S3Uri": f"s3://{job_inputs}/checkpoints/bin-counter-ckpt-final/",
            "LocalPath": "/opt/ml/checkpoints",
        }
        return request

    sm = sagemaker_client(local_stack_connection)
    first = ResumableTrainingOperator(task_id="retrain", config=config(), check_interval=1, print_log=False)
    first.hook.create_training_job(first.config, wait_for_completion=False, print_log=False)
    # Stopped as soon as the first checkpoint is on the instance's disk (not once it is in S3, a poll
    # later: a fast machine may have finished all six epochs by then). The stop's last upload takes it to S3.
    local = (
        local_stack_connection["state"]
        / "training-jobs"
        / "bin-counter-ckpt-final"
        / "opt-ml"
        / "checkpoints"
        / "checkpoint.pth"
    )
    while not local.is_file():
        assert sm.describe_training_job(TrainingJobName="bin-counter-ckpt-final")["TrainingJobStatus"] == "InProgress"
        time.sleep(0.05)
    sm.stop_training_job(TrainingJobName="bin-counter-ckpt-final")  # a spot interruption, a lost instance
    assert wait_training_job(sm, "bin-counter-ckpt-final")["TrainingJobStatus"] == "Stopped"
    assert "checkpoint uploaded: checkpoint.pth" in job_log(local_stack_connection, "bin-counter-ckpt-final")
    key = "checkpoints/bin-counter-ckpt-final/checkpoint.pth"
    assert key in list_objects(s3, job_inputs, "checkpoints/")

    # The retry: the stopped job gets a new name, the same CheckpointConfig, and starts from S3's checkpoint.
    result = ResumableTrainingOperator(task_id="retrain", config=config(), check_interval=1, print_log=False).execute(
        context={}
    )
    retry = result["Training"]["TrainingJobName"]
    assert retry.startswith("bin-counter-ckpt-final-")
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    log = job_log(local_stack_connection, retry)
    assert "checkpoints: 1 file(s) restored from" in log
    resumed = re.search(r"^resumed from \S+checkpoint\.pth after epoch (\d+)$", log, re.MULTILINE)
    assert resumed, log
    after = int(resumed.group(1))
    assert 1 <= after < 6
    ran = [int(e) for e in re.findall(r"^epoch=(\d+) train_loss=", log, re.MULTILINE)]
    assert ran == list(range(after + 1, 7))  # fewer than the six epochs: only those after the checkpoint
    # Its own checkpoints went to the same place: the latest one is the finished run's.
    assert key in list_objects(s3, job_inputs, "checkpoints/")
