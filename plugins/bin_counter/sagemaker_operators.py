"""The Amazon provider's SageMaker training, tuning and transform operators, made safe to retry, and a
training operator whose task ends within one poll of its job.

The stock operators create a job on every try: with the default `action_if_job_exists="timestamp"`
a retried task (a worker killed mid-wait, a scheduler restart) starts a second, identical job while
the first one still runs and bills. These subclasses look for the job their run already named first:
one that is running or finished is attached to (its log is followed, its result returned); one that
failed, was stopped or is stopping is left as it is and a fresh job is started under a new name, as the stock
operator does.

None of the provider's SageMaker operators has an `on_kill`: a task that Airflow kills (its
execution_timeout, "mark failed", a worker shut down) would leave its job running and billing until
the job's own time limit. These stop the job their try started or attached to; and their task's
timeout follows the job's own time limit, so that Airflow never gives up on a job SageMaker still
lets run. The deploy operator replaces an endpoint that SageMaker left Failed.

With `deferrable` (on where `[operators] default_deferrable` is, as on the compose stack, `make up`
and MWAA), every wait goes to the triggerer and the task frees its worker slot until the job ends;
an attached job is waited on the same way. The provider's triggers give up after 60 or 480 polls
(30 minutes or 4 hours at its 30 s), shorter than a tuning job may run: here they poll for as long as
the task may take. They do not follow the job's log (apache/airflow#41158), so the resumed task puts
the log's last lines into the task log (bin_counter.job_logs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, NoReturn

from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerEndpointOperator,
    SageMakerTrainingOperator,
    SageMakerTransformOperator,
    SageMakerTuningOperator,
    serialize,
)
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger
from airflow.providers.common.compat.sdk import AirflowException
from airflow.triggers.base import BaseTrigger
from botocore.exceptions import BotoCoreError, ClientError

from bin_counter.endpoint import delete_failed_endpoint
from bin_counter.job_logs import TRAINING_LOG_GROUP, TRANSFORM_LOG_GROUP, job_log_tail

# A job in these states is the task's to attach to. Not Stopping: a job goes Stopping when a killed
# try's on_kill stops it, and its retry, a minute later, must start a job of its own rather than take
# over one that ends Stopped (which the provider's tuning and transform waits count as success).
ATTACHABLE = {"InProgress", "Completed"}


# SageMaker's codes for a job it does not know: ValidationException for training and transform jobs
# (which the provider's own existence check relies on), ResourceNotFound for tuning jobs, as botocore's
# model lists for DescribeHyperParameterTuningJob and AWS answers ("An error occurred (ResourceNotFound)
# when calling the DescribeHyperParameterTuningJob operation: Amazon SageMaker can't find a tuning job
# called ...", aws/amazon-sagemaker-examples#1540). tests/airflow_side/test_standin_oracle.py holds the
# stand-in's answers to moto's.
NOT_FOUND_CODES = ("ValidationException", "ResourceNotFound")


def describe_or_none(describe, name: str) -> dict | None:
    """The job's description, or None when SageMaker does not know it (NOT_FOUND_CODES)."""
    try:
        return describe(name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in NOT_FOUND_CODES:
            return None
        raise


class LogFollowingSageMakerHook(SageMakerHook):
    """SageMakerHook that, while it follows a training job's log, looks at the job's status on every
    poll (the operator's check_interval) rather than at most every 30 seconds.

    The provider hard-codes those 30 s, so a task that prints the log ends up to 30 s after its job:
    with the DAG's default interval (30 s) nothing changes; with a shorter one (the local stack's, the
    tests') the interval that was asked for is the one honoured.
    """

    def describe_training_job_with_log(
        self, job_name, positions, stream_names, instance_count, state, last_description, last_describe_job_call
    ):
        # Backdated by the provider's 30 s: its own check then passes on every call.
        return super().describe_training_job_with_log(
            job_name, positions, stream_names, instance_count, state, last_description, last_describe_job_call - 30
        )


@dataclass(frozen=True)
class JobKind:
    """How to name, describe and stop one kind of SageMaker job."""

    name_field: str  # in the Create request and the Stop call
    status_field: str
    describe: str  # the SageMakerHook method
    stop: str  # the boto3 SageMaker client method


TRAINING = JobKind("TrainingJobName", "TrainingJobStatus", "describe_training_job", "stop_training_job")
TUNING = JobKind(
    "HyperParameterTuningJobName",
    "HyperParameterTuningJobStatus",
    "describe_tuning_job",
    "stop_hyper_parameter_tuning_job",
)
TRANSFORM = JobKind("TransformJobName", "TransformJobStatus", "describe_transform_job", "stop_transform_job")

# How much longer than a job's own time limit its task may take. MaxRuntimeInSeconds counts the job's
# run, not its start (instances, the image, the input channels), and a job stopped at its limit still
# gets 120 s to save its model, then uploads it (botocore's StoppingCondition doc). Per training job
# in a row (a tuning job's trials run in waves), then once per task (the last polls, the log's tail).
JOB_START_MARGIN = timedelta(minutes=20)
TASK_MARGIN = timedelta(minutes=20)


def training_job_limit(stopping: Mapping | None) -> timedelta | None:
    """How long one training job may run by its StoppingCondition; None without one. With managed
    spot, MaxWaitTimeInSeconds: the wait for capacity plus the run (at least MaxRuntimeInSeconds)."""
    seconds = [int(float(v)) for k in ("MaxRuntimeInSeconds", "MaxWaitTimeInSeconds") if (v := (stopping or {}).get(k))]
    return timedelta(seconds=max(seconds)) if seconds else None


def tuning_job_limit(config: Mapping) -> timedelta | None:
    """How long a tuning job may run: its trials' limit (with their start) times the waves they run
    in, ceil(MaxNumberOfTrainingJobs / MaxParallelTrainingJobs), or the tuning job's own
    MaxRuntimeInSeconds when that is shorter."""
    trial = training_job_limit(config.get("TrainingJobDefinition", {}).get("StoppingCondition"))
    limits = config.get("HyperParameterTuningJobConfig", {}).get("ResourceLimits", {})
    own = timedelta(seconds=int(float(limits["MaxRuntimeInSeconds"]))) if limits.get("MaxRuntimeInSeconds") else None
    if trial is None:
        return own
    waves = math.ceil(int(limits["MaxNumberOfTrainingJobs"]) / int(limits["MaxParallelTrainingJobs"]))
    by_trials = waves * (trial + JOB_START_MARGIN)
    return min(by_trials, own) if own else by_trials


class StopsItsJobWhenKilled:
    """For the job operators: `on_kill` stops the job this try started or attached to, and
    `pre_execute` sets the task's execution_timeout from the job's own time limit.

    Airflow 3's task runner calls `on_kill` on SIGTERM (the supervisor sends it for "mark failed", a
    lost heartbeat, a worker shut down, and SIGKILL 5 s later) and after the execution_timeout; it
    reads execution_timeout after `pre_execute`, once the config is rendered
    (airflow/sdk/execution_time/task_runner.py, _execute_task and _run_execute_callable)."""

    job_kind: ClassVar[JobKind]
    # Set once execute has begun: before that, the config names an earlier try's job, if any.
    job_in_hand: bool = False
    # The operator's, declared for the type checker.
    config: dict
    execution_timeout: timedelta | None

    def job_request(self) -> dict:
        """The Create request: the operator's config; the transform operator's may wrap it."""
        return self.config

    def job_time_limit(self) -> timedelta | None:
        """The longest the job may run by its own limits; None: the task keeps its execution_timeout."""
        return None

    def pre_execute(self, context: Any) -> None:
        limit = self.job_time_limit()
        if limit is not None:
            self.execution_timeout = limit + TASK_MARGIN
            self.log.info(  # type: ignore[attr-defined]
                "Task timeout %s: the job's own limit %s and a margin for its start and end.",
                self.execution_timeout,
                limit,
            )

    def on_kill(self) -> None:
        if not self.job_in_hand:
            return
        # The name now, not the one the task was given: a fresh job may have been renamed (the stock
        # operator's timestamp suffix, the tuning operator's -rNN) before it was created.
        name = self.job_request()[self.job_kind.name_field]
        try:
            stop_if_in_progress(self.hook, self.job_kind, name, self.log)  # type: ignore[attr-defined]
        except Exception:  # the task is being killed anyway: say so, never raise from here
            self.log.exception(  # type: ignore[attr-defined]
                "Could not stop SageMaker job %s: stop it by hand (%s) or it runs to its time limit.",
                name,
                self.job_kind.stop,
            )


def stop_if_in_progress(hook: SageMakerHook, kind: JobKind, name: str, log: Any) -> bool:
    """Stop the job when it is InProgress (SageMaker refuses to stop one that has ended); say what
    was done. True when it was asked to stop."""
    job = describe_or_none(getattr(hook, kind.describe), name)
    status = job[kind.status_field] if job else None
    if status != "InProgress":
        log.info("The task was killed; SageMaker job %s is %s: nothing to stop.", name, status or "not there")
        return False
    getattr(hook.conn, kind.stop)(**{kind.name_field: name})
    log.warning("The task was killed: asked SageMaker to stop job %s (it goes Stopping, then Stopped).", name)
    return True


# How many polls a wait without a time limit of its own may take: a week of the DAGs' 30 s polls.
UNLIMITED_WAIT = timedelta(days=7)


class DefersItsWait:
    """For the job and endpoint operators with `deferrable`: the wait for the job goes to the
    triggerer (a SageMakerTrigger polling every check_interval for as long as the task may take),
    whether this try started the job or attached to an earlier try's; once it ends, the resumed task
    puts the tail of the job's log into its own, and a failure raises with SageMaker's FailureReason."""

    trigger_job_type: ClassVar[str]  # SageMakerTrigger's job_type
    job_noun: ClassVar[str]  # what the log calls it
    # The operator's, declared for the type checker.
    deferrable: bool
    check_interval: int
    execution_timeout: timedelta | None
    aws_conn_id: str | None
    region_name: str | None
    verify: bool | str | None
    botocore_config: dict | None
    log: Any

    def wait_limit(self) -> timedelta:
        """How long the deferred wait may last: the task's execution_timeout (which pre_execute sets
        from the job's own limit), or the operator's max_ingestion_time where that is shorter, as the
        wait it replaces honours; else a week."""
        limits = [self.execution_timeout or UNLIMITED_WAIT]
        if getattr(self, "max_ingestion_time", None):
            limits.append(timedelta(seconds=self.max_ingestion_time))  # type: ignore[attr-defined]
        return min(limits)

    def defer_wait(self, name: str) -> NoReturn:
        """Hand the wait for `name` to the triggerer (raises TaskDeferred); execute_complete resumes."""
        limit = self.wait_limit()
        interval = max(int(self.check_interval), 1)
        trigger = SageMakerTrigger(
            job_name=name,
            job_type=self.trigger_job_type,
            waiter_delay=interval,
            # One poll more than the limit holds, so that the task's own timeout is what ends a wait.
            waiter_max_attempts=math.ceil(limit.total_seconds() / interval) + 1,
            aws_conn_id=self.aws_conn_id,
            region_name=self.region_name,
            verify=self.verify,
            botocore_config=self.botocore_config,
        )
        self.log.info(
            "Waiting for %s %s on the triggerer (a poll every %d s, for up to %s): this task holds no worker "
            "slot until it ends, and then puts the job's last log lines here.",
            self.job_noun,
            name,
            interval,
            limit,
        )
        base_defer: Callable[..., NoReturn] = super().defer  # type: ignore[misc]  # BaseOperator's, by the MRO
        base_defer(trigger=trigger, method_name="execute_complete", timeout=limit)

    def defer(
        self,
        *,
        trigger: BaseTrigger,
        method_name: str,
        kwargs: dict[str, Any] | None = None,
        timeout: timedelta | int | float | None = None,
    ) -> NoReturn:
        # The stock operators' own deferral (a job this try started) gives up after 60 or 480 polls.
        if isinstance(trigger, SageMakerTrigger):
            self.defer_wait(trigger.job_name)
        base_defer: Callable[..., NoReturn] = super().defer  # type: ignore[misc]  # BaseOperator's, by the MRO
        base_defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def log_lines(self, name: str) -> tuple[str, list[str]]:
        """(whose log, its last lines) for the job `name`; none for what keeps no log of its own."""
        return name, []

    def failure(self, name: str, event: Mapping) -> str:
        """What went wrong, in SageMaker's words where it has them (the job's status and FailureReason)."""
        kind: JobKind | None = getattr(self, "job_kind", None)
        hook: SageMakerHook = self.hook  # type: ignore[attr-defined]
        job = describe_or_none(getattr(hook, kind.describe), name) if kind else None
        if kind and job:
            return f"it is {job[kind.status_field]}: {job.get('FailureReason') or event.get('message')}"
        return str(event.get("message") or event)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict:
        event = dict(event or {})
        name = event.get("job_name") or ""
        whose, tail = name, list[str]()
        try:
            if name:
                whose, tail = self.log_lines(name)
        except (BotoCoreError, ClientError) as exc:  # the log is a courtesy: never the task's verdict
            self.log.warning("Could not read the last lines of %s's log from CloudWatch Logs: %s", name, exc)
        if tail:
            self.log.info("The last %d lines of %s's log (CloudWatch Logs):\n%s", len(tail), whose, "\n".join(tail))
        if event.get("status") != "success":
            raise AirflowException(f"SageMaker {self.job_noun} {name} did not succeed: {self.failure(name, event)}")
        return super().execute_complete(context, event)  # type: ignore[misc]


class ResumableTrainingOperator(StopsItsJobWhenKilled, DefersItsWait, SageMakerTrainingOperator):
    """SageMakerTrainingOperator that attaches to the job an earlier try of the task started, and
    follows its log with LogFollowingSageMakerHook (or, deferred, prints its tail at the end)."""

    aws_hook_class = LogFollowingSageMakerHook
    job_kind = TRAINING
    trigger_job_type = "Training"
    job_noun = "training job"

    def log_lines(self, name: str) -> tuple[str, list[str]]:
        return name, job_log_tail(self.hook.logs_hook.conn, TRAINING_LOG_GROUP, name)

    def job_time_limit(self) -> timedelta | None:
        limit = training_job_limit(self.config.get("StoppingCondition"))
        return limit + JOB_START_MARGIN if limit else None

    def execute(self, context: Any) -> dict:
        self.job_in_hand = True
        name = self.config["TrainingJobName"]
        job = describe_or_none(self.hook.describe_training_job, name)
        if job is None or job["TrainingJobStatus"] not in ATTACHABLE:
            if job is not None:
                self.log.info(
                    "Training job %s from an earlier try is %s (%s); starting a new one.",
                    name,
                    job["TrainingJobStatus"],
                    job.get("FailureReason", "no reason given"),
                )
            return super().execute(context)
        self.log.info(
            "Training job %s was started by an earlier try and is %s: attaching to it.", name, job["TrainingJobStatus"]
        )
        if self.wait_for_completion and self.deferrable and job["TrainingJobStatus"] == "InProgress":
            self.defer_wait(name)
        if self.wait_for_completion:
            # Follows the CloudWatch log like a fresh job, and raises with the FailureReason on failure.
            self.hook.check_training_status_with_log(
                name,
                self.hook.non_terminal_states,
                self.hook.training_failed_states,
                True,
                self.check_interval,
                self.max_ingestion_time,
            )
        return self.serialize_result(name)


def retry_name(name: str, try_number: int) -> str:
    """The tuning job a later try starts: names are at most 32 characters and cannot be reused."""
    return f"{name[:28]}-r{try_number:02d}"[:32]


class ResumableTuningOperator(StopsItsJobWhenKilled, DefersItsWait, SageMakerTuningOperator):
    """SageMakerTuningOperator that attaches to the tuning job an earlier try of the task started.
    Stopping the tuning job stops its running trials too (StopHyperParameterTuningJob's doc)."""

    job_kind = TUNING
    trigger_job_type = "tuning"
    job_noun = "tuning job"

    def log_lines(self, name: str) -> tuple[str, list[str]]:
        # A tuning job has no log of its own: its best trial's tells how the chosen model trained.
        best = (describe_or_none(self.hook.describe_tuning_job, name) or {}).get("BestTrainingJob", {})
        trial = best.get("TrainingJobName")
        if not trial:
            return name, []
        return f"{name}'s best trial {trial}", job_log_tail(self.hook.logs_hook.conn, TRAINING_LOG_GROUP, trial)

    def job_time_limit(self) -> timedelta | None:
        return tuning_job_limit(self.config)

    def execute(self, context: Any) -> dict:
        self.job_in_hand = True
        name = self.config["HyperParameterTuningJobName"]
        try_number = getattr(context.get("ti"), "try_number", 1)
        # This task's jobs, newest first: a try after a failed job started its own under its number
        # (and a clear of that try, deferred, must find it running, not start another).
        for candidate in [*(retry_name(name, n) for n in range(try_number - 1, 1, -1)), name]:
            job = describe_or_none(self.hook.describe_tuning_job, candidate)
            if job is not None and job["HyperParameterTuningJobStatus"] in ATTACHABLE:
                return self.attach(candidate, job)
        if job is not None:
            renamed = retry_name(name, try_number)
            self.log.info(
                "Tuning job %s from an earlier try is %s (%s); starting %s.",
                name,
                job["HyperParameterTuningJobStatus"],
                job.get("FailureReason", "no reason given"),
                renamed,
            )
            self.config["HyperParameterTuningJobName"] = renamed
        return super().execute(context)

    def attach(self, name: str, job: dict) -> dict:
        """The result of the tuning job an earlier try started, waited for (deferred, or here)."""
        status = job["HyperParameterTuningJobStatus"]
        self.log.info("Tuning job %s was started by an earlier try and is %s: attaching to it.", name, status)
        if self.wait_for_completion and self.deferrable and status == "InProgress":
            self.defer_wait(name)
        if self.wait_for_completion:
            job = self.hook.check_status(
                name,
                "HyperParameterTuningJobStatus",
                self.hook.describe_tuning_job,
                self.check_interval,
                self.max_ingestion_time,
            )
        return {"Tuning": serialize(job)}


class ResumableTransformOperator(StopsItsJobWhenKilled, DefersItsWait, SageMakerTransformOperator):
    """SageMakerTransformOperator that attaches to the transform job an earlier try of the task started
    (the stock one would start a second job under a timestamped name, counting every photo again).
    A transform job has no time limit of its own: the task keeps the execution_timeout it was given."""

    job_kind = TRANSFORM
    trigger_job_type = "Transform"
    job_noun = "transform job"

    def log_lines(self, name: str) -> tuple[str, list[str]]:
        return name, job_log_tail(self.hook.logs_hook.conn, TRANSFORM_LOG_GROUP, name)

    def job_request(self) -> dict:
        # The stock operator takes the CreateTransformJob request alone or under "Transform".
        return self.config.get("Transform", self.config)

    def execute(self, context: Any) -> dict:
        self.job_in_hand = True
        name = self.config["TransformJobName"]
        job = describe_or_none(self.hook.describe_transform_job, name)
        if job is None or job["TransformJobStatus"] not in ATTACHABLE:
            if job is not None:
                # The stock operator then starts the job under a timestamped name, with the same output path.
                self.log.info(
                    "Transform job %s from an earlier try is %s (%s); starting a new one.",
                    name,
                    job["TransformJobStatus"],
                    job.get("FailureReason", "no reason given"),
                )
            return super().execute(context)
        self.log.info(
            "Transform job %s was started by an earlier try and is %s: attaching to it.",
            name,
            job["TransformJobStatus"],
        )
        if self.wait_for_completion and self.deferrable and job["TransformJobStatus"] == "InProgress":
            self.defer_wait(name)
        if self.wait_for_completion:
            # Raises with the FailureReason if the job fails.
            self.hook.check_status(
                name,
                "TransformJobStatus",
                self.hook.describe_transform_job,
                self.check_interval,
                self.max_ingestion_time,
            )
        return self.serialize_result(name)


class ReplacingEndpointOperator(DefersItsWait, SageMakerEndpointOperator):
    """SageMakerEndpointOperator that first deletes the endpoint when SageMaker left it Failed.

    A Failed endpoint (a creation that failed: the model's health check, no instance quota) allows
    nothing but DeleteEndpoint (botocore's DescribeEndpointOutput.EndpointStatus doc): the stock
    operator's CreateEndpoint finds it exists and its UpdateEndpoint is refused, on this run and every
    later one. Deleted, the endpoint is created afresh, on this try or the task's next."""

    trigger_job_type = "endpoint"
    job_noun = "endpoint"

    def failure(self, name: str, event: Mapping) -> str:
        try:
            endpoint = self.hook.describe_endpoint(name)
        except ClientError:  # deleted meanwhile: the trigger's own message is all there is
            return str(event.get("message") or event)
        return f"it is {endpoint['EndpointStatus']}: {endpoint.get('FailureReason') or event.get('message')}"

    def execute(self, context: Any) -> dict:
        name = self.config.get("Endpoint", self.config)["EndpointName"]
        delete_failed_endpoint(self.hook.conn, name, poll_s=self.check_interval, log=self.log)
        return super().execute(context)


class RolloutEndpointOperator(ReplacingEndpointOperator):
    """Deploys what `bin_count_deploy` built (rollout.deployment_requests): CreateEndpoint for a new
    endpoint, UpdateEndpoint with its blue/green DeploymentConfig otherwise. The operation comes with
    the request, since only the run knows whether the endpoint exists; the wait covers the rollout's
    bakes (its MaximumExecutionTimeoutInSeconds) with a margin."""

    def execute(self, context: Any) -> dict:
        requests = self.config
        self.operation = requests["operation"]
        self.config = dict(requests["endpoint"])
        policy = self.config.get("DeploymentConfig", {}).get("BlueGreenUpdatePolicy", {})
        if policy:
            self.max_ingestion_time = policy["MaximumExecutionTimeoutInSeconds"] + 600
        return super().execute(context)
