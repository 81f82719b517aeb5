"""Deferred SageMaker waits on a live Airflow with ONE worker slot: the scheduler, triggerer, DAG
processor and API server as test_live_airflow runs them, the LocalExecutor bounded to one process
(`[core] parallelism`, which sizes its worker pool and the scheduler's open slots), against the
local stack.

While bin_count_retrain's SageMaker wait is deferred, another DAG's tasks run on that one slot (with
the wait held by a task process, they could not); an operator's clear of the deferred `retrain`
task (what follows a killed try: a deferred task has no process to kill, and a killed running one is
test_live_airflow's scheduler-kill drill) starts a new try that attaches to the running job and
defers again, with no second job; and the resumed task ends with the job's result and the tail of
its CloudWatch log."""

from __future__ import annotations

import json
from datetime import datetime

import boto3
import pytest

from scripts.airflow_api import wait_until
from tests.airflow_side.conftest import CONTAINER_PYTHON
from tests.airflow_side.test_live_airflow import MONITOR, RETRAIN, live_stack, quick_retrain, succeeded, wait_for_task

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")

# Small and quick as in the scheduler-kill drill: one trial, then the final job, nothing deployed.
# Enough epochs that a job outlasts what the test does while it waits (another DAG's run; a clear
# and the new try's start), on a loaded two-core machine.
EPOCHS = 10
CONF = quick_retrain(EPOCHS)


@pytest.fixture(scope="module")
def one_slot(moto_endpoint, tmp_path_factory):
    """The live stack with a single worker slot: at most one task process at a time, anywhere."""
    yield from live_stack(moto_endpoint, tmp_path_factory, AIRFLOW__CORE__PARALLELISM="1")


def log_text(api, dag_id: str, run_id: str, ti: dict) -> str:
    return "\n".join(api.task_log(dag_id, run_id, ti))


def deferred_wait(api, run_id: str) -> str:
    """Until the run's tuning or final training task is deferred; which one."""
    found: list[str] = []

    def either() -> bool:
        tasks = api.tasks(RETRAIN, run_id)
        found[:] = [t for t in ("tune", "retrain") if tasks.get(t, {}).get("state") == "deferred"]
        return bool(found)

    wait_until(either, 600, "bin_count_retrain's tune or retrain task to be deferred")
    return found[0]


def return_value(api, dag_id: str, run_id: str, task_id: str) -> dict:
    value = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")["value"]
    return json.loads(value) if isinstance(value, str) else value


def test_a_deferred_wait_frees_the_only_slot_and_a_cleared_try_attaches_to_its_job(one_slot):
    api = one_slot["api"]
    sm = boto3.client("sagemaker", endpoint_url=one_slot["standin"], region_name="us-east-1")
    for dag_id in (RETRAIN, MONITOR):
        api.patch(f"/dags/{dag_id}", {"is_paused": False})
    run_id = api.trigger(RETRAIN, CONF)

    # a, b. A SageMaker wait is deferred: the one slot is free, and bin_count_monitor's tasks run on
    # it (nothing serves on this stack: its baseline skips the rest) while the wait stays deferred.
    waiting = deferred_wait(api, run_id)
    held = api.tasks(RETRAIN, run_id)[waiting]
    monitor_run = api.trigger(MONITOR, {})
    monitor_tasks = succeeded(api, MONITOR, monitor_run)
    assert monitor_tasks["window"]["state"] == "success", monitor_tasks["window"]
    assert monitor_tasks["baseline"]["state"] == "skipped", monitor_tasks["baseline"]
    # With one slot, the monitor's first task could start only while the wait held no slot: it started
    # before the waiting task ended, on the same try (the job may end while the monitor's run goes on).
    after = api.tasks(RETRAIN, run_id)[waiting]
    assert after["try_number"] == held["try_number"], after
    started = datetime.fromisoformat(monitor_tasks["window"]["start_date"])
    assert not after["end_date"] or started < datetime.fromisoformat(after["end_date"]), (
        f"{waiting} ended ({after['end_date']}) before bin_count_monitor's first task started ({started}): the "
        "job ended first, so this does not show the slot was free while it waited; lengthen it (EPOCHS)"
    )

    # c. The final job's wait is deferred; an operator clears the task (as after its try was killed).
    wait_for_task(api, RETRAIN, run_id, "retrain", "deferred")
    first = api.tasks(RETRAIN, run_id)["retrain"]
    jobs_before = {j["TrainingJobName"]: j["CreationTime"] for j in sm.list_training_jobs()["TrainingJobSummaries"]}
    clear = {"dry_run": False, "dag_run_id": run_id, "task_ids": ["retrain"], "only_failed": False}
    cleared = api.post(f"/dags/{RETRAIN}/clearTaskInstances", {**clear, "reset_dag_runs": False})
    assert [ti["task_id"] for ti in cleared["task_instances"]] == ["retrain"], cleared

    def deferred_again() -> bool:
        ti = api.tasks(RETRAIN, run_id)["retrain"]
        if ti["try_number"] > first["try_number"] and ti["state"] in ("success", "failed", "up_for_retry"):
            raise AssertionError(
                f"retrain's new try ended {ti['state']} without deferring: the job ended before it attached; "
                f"lengthen it (EPOCHS)\n{log_text(api, RETRAIN, run_id, ti)}"
            )
        return ti["try_number"] > first["try_number"] and ti["state"] == "deferred"

    wait_until(deferred_again, 300, "the cleared retrain task's new try to defer")
    second = api.tasks(RETRAIN, run_id)["retrain"]
    attach_log = log_text(api, RETRAIN, run_id, second)
    assert "was started by an earlier try and is InProgress: attaching to it" in attach_log, attach_log
    assert "on the triggerer" in attach_log, attach_log

    # d. The run succeeds on that one job; the resumed task logs the job's last lines and returns it.
    tasks = succeeded(api, RETRAIN, run_id)
    jobs_after = {j["TrainingJobName"]: j["CreationTime"] for j in sm.list_training_jobs()["TrainingJobSummaries"]}
    assert jobs_after == jobs_before, f"jobs started after the clear: {set(jobs_after) - set(jobs_before)}"
    final = tasks["retrain"]
    assert final["try_number"] == second["try_number"], final
    final_log = log_text(api, RETRAIN, run_id, final)
    assert "The last" in final_log and "lines of" in final_log and "epoch=" in final_log, final_log
    result = return_value(api, RETRAIN, run_id, "retrain")["Training"]
    assert result["TrainingJobStatus"] == "Completed", result
    assert result["TrainingJobName"] in jobs_before, result["TrainingJobName"]
