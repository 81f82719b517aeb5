"""Deferred SageMaker waits, as the triggerer runs them: the operators (deferrable) hand the wait to the
provider's SageMakerTrigger, which polls the stand-in through aiobotocore, for as long as the job may
run; the resumed task returns the job's result with the tail of its CloudWatch log, raises with
SageMaker's FailureReason when the job failed, and a retry attaches to the running job and defers again.

The trigger runs here as the triggerer runs it (its async `run()` to its first event), and the task's
resumption as the task runner resumes it (`execute_complete` with that event). The live scheduler,
triggerer and one-slot executor are tests/airflow_side/test_live_deferral.py's."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger
from airflow.sdk.exceptions import TaskDeferred

from bin_counter.job_logs import TRAINING_LOG_GROUP, TRANSFORM_LOG_GROUP, job_log_tail
from bin_counter.sagemaker_config import search_ranges, tuning_job_config
from bin_counter.sagemaker_operators import (
    ReplacingEndpointOperator,
    ResumableTrainingOperator,
    ResumableTransformOperator,
    ResumableTuningOperator,
    training_job_limit,
    tuning_job_limit,
)
from tests.airflow_side.conftest import job_config, published_count_request, sagemaker_client, wait_training_job


def deferred(operator, context: dict | None = None) -> TaskDeferred:
    """The TaskDeferred that `operator.execute` raises (the test fails if it returns instead)."""
    with pytest.raises(TaskDeferred) as raised:
        operator.execute(context or {})
    return raised.value


def triggered(deferral: TaskDeferred) -> dict:
    """The trigger's first event, as the triggerer would fire it, from its serialized form."""
    classpath, kwargs = deferral.trigger.serialize()
    assert classpath.endswith("SageMakerTrigger")
    trigger = SageMakerTrigger(**kwargs)

    async def first() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(first())


def training(job_inputs: str, name: str, **hyperparameters) -> ResumableTrainingOperator:
    config = job_config(job_inputs, name, **hyperparameters)
    return ResumableTrainingOperator(
        task_id="retrain", config=config, check_interval=1, print_log=False, deferrable=True
    )


def test_a_deferred_training_task_resumes_with_the_result_and_the_log_tail(local_stack_connection, job_inputs, capfd):
    operator = training(job_inputs, "bin-counter-defer-final", epochs=2)
    operator.pre_execute({})  # the task's timeout from the job's own limit, as the task runner calls it
    deferral = deferred(operator)
    _, kwargs = deferral.trigger.serialize()
    assert kwargs["job_name"] == "bin-counter-defer-final" and kwargs["waiter_delay"] == 1
    # The provider's own deferral gives up after 60 polls (a minute here, 30 at its 30 s): this one
    # polls for as long as the task may take, which is the job's limit and the margins.
    limit = training_job_limit(operator.config["StoppingCondition"])
    assert limit is not None and operator.execution_timeout is not None
    assert kwargs["waiter_max_attempts"] >= operator.execution_timeout.total_seconds() > limit.total_seconds()
    assert deferral.timeout == operator.execution_timeout and deferral.method_name == "execute_complete"

    event = triggered(deferral)
    assert event == {"status": "success", "job_name": "bin-counter-defer-final"}
    resumed = training(job_inputs, "bin-counter-defer-final", epochs=2)  # a fresh task process resumes it
    capfd.readouterr()
    result = resumed.execute_complete({}, event)
    task_log = capfd.readouterr().out
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert result["Training"]["TrainingJobName"] == "bin-counter-defer-final"
    # The task log ends with the job's log as CloudWatch has it: the epochs on-call looks for.
    logs = resumed.hook.logs_hook.conn
    tail = job_log_tail(logs, TRAINING_LOG_GROUP, "bin-counter-defer-final")
    assert any(line.startswith("epoch=2 ") for line in tail), tail
    assert f"The last {len(tail)} lines of bin-counter-defer-final's log" in task_log
    assert "\n".join(tail) in task_log


def test_a_failed_job_resumes_into_a_clear_error_with_its_log(local_stack_connection, job_inputs, capfd):
    deferral = deferred(training(job_inputs, "bin-counter-defer-bad", epochs=0))
    event = triggered(deferral)
    assert event["status"] == "failed"
    capfd.readouterr()
    with pytest.raises(Exception) as raised:
        training(job_inputs, "bin-counter-defer-bad", epochs=0).execute_complete({}, event)
    task_log = capfd.readouterr().out
    message = str(raised.value)
    assert message.startswith("SageMaker training job bin-counter-defer-bad did not succeed: it is Failed: ")
    assert "--epochs must be at least 1" in message
    assert "--epochs must be at least 1" in task_log.split("lines of bin-counter-defer-bad's log", 1)[1]


def test_a_retried_task_attaches_to_the_running_job_and_defers_again(local_stack_connection, job_inputs, capfd):
    sm = sagemaker_client(local_stack_connection)
    # The first try started the job, deferred, and was then killed (its trigger lost, the task cleared).
    sm.create_training_job(**job_config(job_inputs, "bin-counter-defer-retry", epochs=40))
    capfd.readouterr()
    deferral = deferred(training(job_inputs, "bin-counter-defer-retry", epochs=40))
    task_log = capfd.readouterr().out
    assert "was started by an earlier try and is InProgress: attaching to it" in task_log
    assert "Waiting for training job bin-counter-defer-retry on the triggerer" in task_log
    assert deferral.trigger.serialize()[1]["job_name"] == "bin-counter-defer-retry"
    listed = sm.list_training_jobs(NameContains="bin-counter-defer-retry")["TrainingJobSummaries"]
    assert [job["TrainingJobName"] for job in listed] == ["bin-counter-defer-retry"]  # no second job
    sm.stop_training_job(TrainingJobName="bin-counter-defer-retry")
    assert wait_training_job(sm, "bin-counter-defer-retry")["TrainingJobStatus"] == "Stopped"
    # Stopped (by hand, or by its limit) while deferred: the trigger says so, the task fails saying it.
    event = triggered(deferral)
    assert event["status"] == "stopped"
    with pytest.raises(Exception, match="did not succeed: it is Stopped"):
        training(job_inputs, "bin-counter-defer-retry", epochs=40).execute_complete({}, event)


def test_a_tuning_wait_is_deferred_for_as_long_as_its_trials_may_run(local_stack_connection, job_inputs):
    sm = sagemaker_client(local_stack_connection)
    trial = job_config(job_inputs, "bc-tune-defer")
    ranges = search_ranges((40, 40), [8], (0.001, 0.01))
    config = tuning_job_config(
        "bc-tune-defer",
        trial,
        ranges,
        "validation:accuracy",
        max_jobs=2,
        max_parallel_jobs=1,
        strategy="Random",
    )
    sm.create_hyper_parameter_tuning_job(**config)  # an earlier try's
    operator = ResumableTuningOperator(task_id="tune", config=config, check_interval=30, deferrable=True)
    operator.pre_execute({})
    deferral = deferred(operator)
    _, kwargs = deferral.trigger.serialize()
    limit = tuning_job_limit(config)
    assert limit is not None and limit > timedelta(hours=4)  # longer than the provider's 480 polls of 30 s
    assert kwargs["waiter_max_attempts"] * kwargs["waiter_delay"] >= limit.total_seconds()
    listed = sm.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
    assert [job["HyperParameterTuningJobName"] for job in listed] == ["bc-tune-defer"]  # attached
    sm.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="bc-tune-defer")


def test_a_deferred_transform_task_resumes_with_its_log_tail(local_stack_connection, s3, bucket, capfd):
    sm = sagemaker_client(local_stack_connection)
    request = published_count_request(s3, sm, bucket, "bin-counter-defer-count", "bin-counter-defer-model", 2)

    def counting() -> ResumableTransformOperator:
        return ResumableTransformOperator(
            task_id="count", config=dict(request), check_interval=1, check_if_model_exists=False, deferrable=True
        )

    event = triggered(deferred(counting()))
    assert event == {"status": "success", "job_name": "bin-counter-defer-count"}
    capfd.readouterr()
    result = counting().execute_complete({}, event)
    task_log = capfd.readouterr().out
    assert result["Transform"]["TransformJobStatus"] == "Completed"
    # Read as the worker may read it: the stack's policy grants the transform jobs' log group too.
    tail = job_log_tail(counting().hook.logs_hook.conn, TRANSFORM_LOG_GROUP, "bin-counter-defer-count")
    assert tail and "\n".join(tail) in task_log


def test_a_cleared_tuning_task_attaches_to_the_job_its_renumbered_try_started(local_stack_connection, job_inputs):
    sm = sagemaker_client(local_stack_connection)
    trial = job_config(job_inputs, "bc-tune-renum")
    ranges = search_ranges((40, 40), [8], (0.001, 0.01))

    def config(name: str) -> dict:
        return tuning_job_config(
            name, trial, ranges, "validation:accuracy", max_jobs=1, max_parallel_jobs=1, strategy="Random"
        )

    # Try 1's job failed (here: stopped); try 2 started bc-tune-renum-r02 and deferred; then the task
    # was cleared: try 3 must wait for r02, not start r03 beside it.
    sm.create_hyper_parameter_tuning_job(**config("bc-tune-renum"))
    sm.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="bc-tune-renum")
    sm.create_hyper_parameter_tuning_job(**config("bc-tune-renum-r02"))
    operator = ResumableTuningOperator(
        task_id="tune", config=config("bc-tune-renum"), check_interval=5, deferrable=True
    )
    deferral = deferred(operator, {"ti": TryNumber(3)})
    assert deferral.trigger.serialize()[1]["job_name"] == "bc-tune-renum-r02"
    listed = sm.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
    assert sorted(job["HyperParameterTuningJobName"] for job in listed) == ["bc-tune-renum", "bc-tune-renum-r02"]
    sm.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="bc-tune-renum-r02")


class TryNumber:
    def __init__(self, try_number: int) -> None:
        self.try_number = try_number


def test_an_endpoint_wait_is_deferred_for_its_max_ingestion_time():
    operator = ReplacingEndpointOperator(
        task_id="deploy", config={"EndpointName": "e"}, check_interval=5, max_ingestion_time=600, deferrable=True
    )
    with pytest.raises(TaskDeferred) as raised:
        operator.defer_wait("e")
    _, kwargs = raised.value.trigger.serialize()
    assert (kwargs["job_type"], kwargs["waiter_delay"], kwargs["waiter_max_attempts"]) == ("endpoint", 5, 121)
    assert raised.value.timeout == timedelta(seconds=600)
