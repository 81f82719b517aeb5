"""A killed job task stops its SageMaker job, and a job task's timeout follows the job's own time limit.

The drills start real jobs through the operators on the stand-in and kill their task the way Airflow 3
does: the task runner's own timeout (airflow.sdk.execution_time.task_runner._run_execute_callable: a
SIGALRM raises AirflowTaskTimeout inside execute, then the runner calls on_kill). Its SIGTERM handler
("mark failed", a worker shut down) calls the same on_kill."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from airflow.sdk.exceptions import AirflowTaskTimeout
from airflow.sdk.execution_time.task_runner import _run_execute_callable

from bin_counter.retrain import resources
from bin_counter.sagemaker_config import search_ranges, tuning_job_config
from bin_counter.sagemaker_operators import (
    JOB_START_MARGIN,
    TASK_MARGIN,
    ReplacingEndpointOperator,
    ResumableTrainingOperator,
    ResumableTransformOperator,
    ResumableTuningOperator,
)
from standin.launch import airflow_connection, free_port
from tests.airflow_side.conftest import (
    dag_without_retries,
    job_config,
    published_count_request,
    sagemaker_client,
    wait_ended,
    wait_training_job,
)


class TaskInstance:
    try_number = 2


def holds(condition: Callable[[], bool]) -> bool:
    try:
        return condition()
    except Exception:  # the stand-in busy or gone: not yet, ask again
        return False


def run_until_killed(operator, condition: Callable[[], bool], context: dict | None = None) -> None:
    """Run the operator as the task runner does, and fire the runner's timeout (SIGALRM to this
    process, which its handler turns into AirflowTaskTimeout in the main thread) as soon as
    `condition()` holds: mid-job, whatever the machine's speed."""
    operator.execution_timeout = timedelta(hours=1)  # armed by the runner; the watcher fires it early
    previous, done = signal.getsignal(signal.SIGALRM), threading.Event()

    def watch() -> None:
        deadline = time.time() + 120
        while not done.is_set() and not holds(condition) and time.time() < deadline:
            time.sleep(0.2)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGALRM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(AirflowTaskTimeout):
            _run_execute_callable(context or {}, operator.execute, operator)
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # a late alarm must not land in another test
        done.set()
        watcher.join()
        signal.signal(signal.SIGALRM, previous)


def in_progress(jobs: list[dict], field: str) -> bool:
    return any(j[field] == "InProgress" for j in jobs)


def test_a_killed_training_task_stops_the_job_it_started(local_stack_connection, job_inputs):
    sm = sagemaker_client(local_stack_connection)
    # An earlier try's job, stopped: this try starts its own under a new (timestamped) name, and that
    # is the one to stop.
    sm.create_training_job(**job_config(job_inputs, "bin-counter-kill-final", epochs=500))
    sm.stop_training_job(TrainingJobName="bin-counter-kill-final")
    assert wait_training_job(sm, "bin-counter-kill-final")["TrainingJobStatus"] == "Stopped"

    def retrain() -> ResumableTrainingOperator:
        config = job_config(job_inputs, "bin-counter-kill-final", epochs=500)
        return ResumableTrainingOperator(task_id="retrain", config=config, check_interval=1, print_log=False)

    operator = retrain()

    def this_try_runs() -> bool:
        found = sm.list_training_jobs(NameContains="bin-counter-kill-final-")["TrainingJobSummaries"]
        return in_progress(found, "TrainingJobStatus")

    run_until_killed(operator, this_try_runs)
    started = operator.config["TrainingJobName"]
    assert started.startswith("bin-counter-kill-final-")
    # The retry comes while the stopped job may still be Stopping: it must start a job of its own, not
    # take over the one its kill stopped (which would end Stopped, and the try with it).
    retry = retrain()

    def the_retry_runs() -> bool:
        found = sm.list_training_jobs(NameContains="bin-counter-kill-final-")["TrainingJobSummaries"]
        return any(j["TrainingJobName"] != started and j["TrainingJobStatus"] == "InProgress" for j in found)

    run_until_killed(retry, the_retry_runs)
    assert retry.config["TrainingJobName"] not in (started, "bin-counter-kill-final")
    for name in (started, retry.config["TrainingJobName"]):
        assert wait_training_job(sm, name)["TrainingJobStatus"] == "Stopped"
    # Killed again (the runner's timeout, then SIGTERM): the job has ended, nothing is asked twice.
    operator.on_kill()


def test_a_killed_tuning_task_stops_its_tuning_job_and_its_trials(local_stack_connection, job_inputs):
    sm = sagemaker_client(local_stack_connection)

    def config() -> dict:
        trial = job_config(job_inputs, "bc-tune-kill")
        ranges = search_ranges((500, 500), [8], (0.001, 0.01))
        return tuning_job_config(
            "bc-tune-kill", trial, ranges, "validation:accuracy", max_jobs=2, max_parallel_jobs=1, strategy="Random"
        )

    # An earlier try's tuning job, stopped: this try starts bc-tune-kill-r02.
    sm.create_hyper_parameter_tuning_job(**config())
    sm.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="bc-tune-kill")
    earlier = wait_ended(
        lambda: sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="bc-tune-kill"),
        "HyperParameterTuningJobStatus",
        120,
    )
    assert earlier["HyperParameterTuningJobStatus"] == "Stopped"
    operator = ResumableTuningOperator(task_id="tune", config=config(), check_interval=1)

    def trials(name: str) -> list[dict]:
        return sm.list_training_jobs_for_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)[
            "TrainingJobSummaries"
        ]

    def a_trial_runs() -> bool:
        names = [
            j["HyperParameterTuningJobName"]
            for j in sm.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
        ]
        return "bc-tune-kill-r02" in names and in_progress(trials("bc-tune-kill-r02"), "TrainingJobStatus")

    run_until_killed(operator, a_trial_runs, {"ti": TaskInstance()})
    assert operator.config["HyperParameterTuningJobName"] == "bc-tune-kill-r02"
    tuning = wait_ended(
        lambda: sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="bc-tune-kill-r02"),
        "HyperParameterTuningJobStatus",
        120,
    )
    assert tuning["HyperParameterTuningJobStatus"] == "Stopped"
    assert {t["TrainingJobStatus"] for t in trials("bc-tune-kill-r02")} == {"Stopped"}


def test_a_killed_transform_task_stops_its_transform_job(local_stack_connection, s3, bucket):
    sm = sagemaker_client(local_stack_connection)
    request = published_count_request(s3, sm, bucket, "bin-counter-kill-count", "bin-counter-kill-model", 3)
    operator = ResumableTransformOperator(
        task_id="count", config=request, check_interval=1, check_if_model_exists=False
    )

    def describe() -> dict:
        return sm.describe_transform_job(TransformJobName="bin-counter-kill-count")

    def started() -> bool:
        return bool(sm.list_transform_jobs(NameContains="bin-counter-kill-count")["TransformJobSummaries"])

    run_until_killed(operator, started)  # while its model loads
    assert wait_ended(describe, "TransformJobStatus", 120)["TransformJobStatus"] == "Stopped"


def test_on_kill_before_the_job_or_without_sagemaker_does_not_raise(monkeypatch, capfd):
    # A kill before execute began: the config names no job of this try, nothing is asked of SageMaker.
    operator = ResumableTrainingOperator(
        task_id="retrain", config=job_config("b", "bin-counter-unreachable-final"), print_log=False
    )
    operator.on_kill()
    # SageMaker unreachable when the task is killed: the log says to stop the job by hand, and the
    # kill goes on (an exception here would hide the task's own error).
    connection = airflow_connection(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    connection["extra"]["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    operator.job_in_hand = True
    operator.on_kill()
    assert "Could not stop SageMaker job bin-counter-unreachable-final: stop it by hand" in capfd.readouterr().out


HOUR = timedelta(hours=1)


def test_the_training_task_timeout_follows_the_jobs_limit():
    # training_max_hours may be 120 while the DAG's static timeout is 6 h: the job's limit wins.
    config = job_config("b", "bin-counter-long-final")
    config["StoppingCondition"] = {
        "MaxRuntimeInSeconds": resources({"training_instance_type": "x", "training_max_hours": 120})["max_runtime_s"]
    }
    operator = ResumableTrainingOperator(task_id="retrain", config=config, execution_timeout=6 * HOUR)
    operator.pre_execute({})
    assert operator.execution_timeout == 120 * HOUR + JOB_START_MARGIN + TASK_MARGIN
    # Managed spot: the wait for capacity counts too (MaxWaitTimeInSeconds).
    config["StoppingCondition"] = {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    operator.pre_execute({})
    assert operator.execution_timeout == 2 * HOUR + JOB_START_MARGIN + TASK_MARGIN


def test_the_tuning_task_timeout_follows_its_trials_limits_and_waves():
    trial = job_config("b", "bc-tune-long")
    trial["StoppingCondition"] = {"MaxRuntimeInSeconds": 4 * 3600}
    ranges = search_ranges((1, 2), [8], (0.001, 0.01))
    # Five trials, two at a time: three waves of trials, each with its start.
    config = tuning_job_config("bc-tune-long", trial, ranges, "validation:accuracy", max_jobs=5, max_parallel_jobs=2)
    operator = ResumableTuningOperator(task_id="tune", config=config, execution_timeout=12 * HOUR)
    operator.pre_execute({})
    assert operator.execution_timeout == 3 * (4 * HOUR + JOB_START_MARGIN) + TASK_MARGIN
    # The tuning job's own limit, when shorter, is the one that ends it.
    config["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxRuntimeInSeconds"] = 5 * 3600
    operator.pre_execute({})
    assert operator.execution_timeout == 5 * HOUR + TASK_MARGIN


def test_a_transform_task_keeps_its_timeout():
    # A transform job has no time limit of its own.
    operator = ResumableTransformOperator(
        task_id="count", config={"TransformJobName": "bin-counter-t"}, execution_timeout=12 * HOUR
    )
    operator.pre_execute({})
    assert operator.execution_timeout == 12 * HOUR


def test_the_dags_job_tasks_are_the_operators_that_stop_their_jobs(airflow_db):
    retrain = dag_without_retries("bin_count_retrain")
    assert isinstance(retrain.get_task("tune"), ResumableTuningOperator)
    assert isinstance(retrain.get_task("retrain"), ResumableTrainingOperator)
    assert isinstance(dag_without_retries("bin_count_deploy").get_task("deploy"), ReplacingEndpointOperator)
    assert isinstance(dag_without_retries("bin_count_batch").get_task("count"), ResumableTransformOperator)
