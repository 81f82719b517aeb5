"""A retried training or tuning task attaches to the job its earlier try started (the stand-in,
over HTTP, running the real train.py), and a failed job is retried under a new name."""

from __future__ import annotations

import time

import boto3
import pytest
from airflow.providers.amazon.aws.hooks.sagemaker import LogState, SageMakerHook

from bin_counter.sagemaker_config import search_ranges, tuning_job_config
from bin_counter.sagemaker_operators import ResumableTrainingOperator, ResumableTuningOperator
from tests.airflow_side.conftest import job_config


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
    second = ResumableTrainingOperator(task_id="retrain", config=job_config(job_inputs, "bin-counter-retry-final"),
                                       check_interval=1, print_log=False)
    result = second.execute(context={})
    assert result["Training"]["TrainingJobName"] == "bin-counter-retry-final"
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert [j["TrainingJobName"] for j in training_jobs(local_stack_connection)] == ["bin-counter-retry-final"]
    # A third try, once it is complete: still that job, nothing new started.
    third = ResumableTrainingOperator(task_id="retrain", config=job_config(job_inputs, "bin-counter-retry-final"),
                                      check_interval=1, print_log=False)
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
    result = ResumableTrainingOperator(task_id="retrain", config=fixed, check_interval=1,
                                       print_log=False).execute(context={})
    assert result["Training"]["TrainingJobName"].startswith("bin-counter-bad-final-")
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert len(training_jobs(local_stack_connection)) == 2


def test_a_retried_tuning_task_attaches_to_its_tuning_job(local_stack_connection, job_inputs):
    trial = job_config(job_inputs, "bc-tune-retry")
    config = tuning_job_config("bc-tune-retry", trial, search_ranges((1, 1), [8], (0.001, 0.01)),
                               "validation:accuracy", max_jobs=1, max_parallel_jobs=1, strategy="Random")
    first = ResumableTuningOperator(task_id="tune", config=config, check_interval=1)
    first.hook.create_tuning_job(first.config, wait_for_completion=False)
    result = ResumableTuningOperator(task_id="tune", config=tuning_job_config(
        "bc-tune-retry", trial, search_ranges((1, 1), [8], (0.001, 0.01)), "validation:accuracy", max_jobs=1,
        max_parallel_jobs=1, strategy="Random"), check_interval=1).execute(context={"ti": TaskInstance()})
    assert result["Tuning"]["HyperParameterTuningJobName"] == "bc-tune-retry"
    assert result["Tuning"]["HyperParameterTuningJobStatus"] == "Completed"
    assert len(training_jobs(local_stack_connection)) == 1  # one trial: nothing started twice
