"""The last lines of a SageMaker job's CloudWatch log, for a task whose wait did not follow the log.

A task that defers its wait to the triggerer prints nothing while the job runs: the provider's
triggers poll the job's status only (apache/airflow#41158). On-call staff read a task's log for the
epochs and the failure, so the resumed task puts the log's tail there once the job has ended. The
log groups and stream names are SageMaker's: `/aws/sagemaker/TrainingJobs` with a stream
`<job>/algo-<n>-<time>` per instance, `/aws/sagemaker/TransformJobs` with `<job>/<instance id>`
(the provider's own log reader, SageMakerHook.multi_stream_iter, reads the same).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TRANSFORM_LOG_GROUP = "/aws/sagemaker/TransformJobs"
# Enough for the last epochs' lines and a traceback; the whole log stays in CloudWatch.
TAIL_LINES = 40


def job_log_tail(logs: Any, group: str, job_name: str, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` messages of each of the job's streams in `group` (a CloudWatch Logs client),
    each prefixed with its stream's instance when the job had several; [] when the job wrote none."""
    try:
        streams = [
            stream["logStreamName"]
            for page in logs.get_paginator("describe_log_streams").paginate(
                logGroupName=group, logStreamNamePrefix=f"{job_name}/"
            )
            for stream in page.get("logStreams", [])
        ]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":  # no job of this kind logged yet
            return []
        raise
    tail: list[str] = []
    for stream in sorted(streams):
        events = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=False, limit=lines).get(
            "events", []
        )
        instance = stream.split("/", 1)[1]
        prefix = f"[{instance}] " if len(streams) > 1 else ""
        tail += [f"{prefix}{event['message'].rstrip()}" for event in events]
    return tail
