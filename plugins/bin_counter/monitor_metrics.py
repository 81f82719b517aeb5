"""The monitor's figures as CloudWatch metrics, and the alarms on them.

Our own metrics live in namespace `BinCounter` (AWS's namespaces are AWS's), one series per endpoint
(dimension EndpointName), each datapoint timestamped at the end of the window it describes. A figure
the window had too little data for is not published: CloudWatch then has no datapoint, which the
alarms treat as not breaching (a quiet hour is no incident).

The alarms: `<endpoint>-live-drift` (DriftDetected reached 1 in an hour) and `<endpoint>-live-accuracy`
(LiveAccuracy under its threshold in an hour), to the alerts topic on ALARM and on OK. Period one
hour, the monitor's schedule, one breaching hour of the last two; Maximum and Minimum, whose breach
in a period still open is final, so CloudWatch (and the local evaluator, standin/cloudwatch/alarms.py)
raises them as soon as the datapoint is in.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

NAMESPACE = "BinCounter"
ALARM_PERIOD_S = 3600
DOCS = "docs/dags/README.md, section Monitor DAG"


def alarm_names(endpoint_name: str) -> dict[str, str]:
    """The monitor's alarms; `<endpoint>-*`, the names the worker may define (infra/pipeline.yaml)."""
    return {"drift": f"{endpoint_name}-live-drift", "accuracy": f"{endpoint_name}-live-accuracy"}


def metric_data(endpoint_name: str, figures: Mapping, at: datetime) -> list[dict]:
    """PutMetricData's MetricData for one window's figures (bin_counter.monitor.assess)."""
    values: dict[str, tuple[float, str]] = {
        "Requests": (figures["requests"], "Count"),
        "Answers": (figures["answers"], "Count"),
        "LabelledAnswers": (figures["labelled"], "Count"),
    }
    live = figures.get("live")
    if live:
        values |= {
            "LiveAccuracy": (live["accuracy"], "None"),
            "LiveRMSE": (live["rmse"], "None"),
            "LiveMAE": (live["mae"], "None"),
            "LiveWithin1": (live["within_1"], "None"),
        }
    drift = figures["drift"]
    if drift["counts"]["statistic"] is not None:
        values["CountDriftPSI"] = (drift["counts"]["statistic"], "None")
    if drift["confidence"]["statistic"] is not None:
        values["ConfidenceDriftPSI"] = (drift["confidence"]["statistic"], "None")
    p_values = [found["p_value"] for found in drift["photos"].values() if found.get("p_value") is not None]
    if p_values:
        values["PhotoDriftMinP"] = (min(p_values), "None")
    judged = [drift["counts"], drift["confidence"], *drift["photos"].values()]
    if any(found["statistic"] is not None for found in judged):
        values["DriftDetected"] = (1.0 if figures["drift_detected"] else 0.0, "None")
    dimensions = [{"Name": "EndpointName", "Value": endpoint_name}]
    return [
        {"MetricName": name, "Dimensions": dimensions, "Timestamp": at, "Value": float(value), "Unit": unit}
        for name, (value, unit) in values.items()
    ]


def put_metrics(cloudwatch, data: list[dict]) -> None:
    """PutMetricData in requests of at most 1,000 datapoints (CloudWatch's limit per request)."""
    for start in range(0, len(data), 1000):
        cloudwatch.put_metric_data(Namespace=NAMESPACE, MetricData=data[start : start + 1000])


def alarms(endpoint_name: str, topic_arn: str | None, min_accuracy: float | None) -> list[dict]:
    """PutMetricAlarm requests for the drift alarm and, with a threshold, the live-accuracy alarm."""
    names = alarm_names(endpoint_name)
    actions = [topic_arn] if topic_arn else []
    common = {
        "Namespace": NAMESPACE,
        "Dimensions": [{"Name": "EndpointName", "Value": endpoint_name}],
        "Period": ALARM_PERIOD_S,
        # 1 of the last 2 hours: an hour's datapoint (timestamped at its window's end, inside the clock
        # hour it is published in) keeps the alarm in its state through the next hour, until the next
        # run's datapoint; with 1 of 1 the alarm would fall back to OK at every hour's start, before the
        # monitor has looked, and alert again at its run.
        "EvaluationPeriods": 2,
        "DatapointsToAlarm": 1,
        "TreatMissingData": "notBreaching",
        "ActionsEnabled": True,
        "AlarmActions": actions,
        "OKActions": actions,
    }
    made = [
        {
            **common,
            "AlarmName": names["drift"],
            "AlarmDescription": f"{endpoint_name}: the photos clients send, or the model's answers to them, no longer "
            "look like the model's test set (bin_count_monitor's DriftDetected). The monitor's report (task "
            f"'report', link 'Monitor report') says which distribution moved. Read {DOCS}.",
            "MetricName": "DriftDetected",
            "Statistic": "Maximum",
            "Threshold": 1.0,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
        }
    ]
    if min_accuracy is not None:
        made.append(
            {
                **common,
                "AlarmName": names["accuracy"],
                "AlarmDescription": f"{endpoint_name}: on the photos whose expected count clients sent, the model "
                f"counted fewer than {min_accuracy:.0%} exactly in an hour (bin_count_monitor's LiveAccuracy). "
                f"Read {DOCS}.",
                "MetricName": "LiveAccuracy",
                "Statistic": "Minimum",
                "Threshold": float(min_accuracy),
                "ComparisonOperator": "LessThanThreshold",
            }
        )
    return made


def ensure_alarms(cloudwatch, requests: list[dict]) -> list[str]:
    """PutMetricAlarm each alarm that does not exist or whose definition differs. An unchanged alarm is
    left alone: CloudWatch would keep its state, but moto starts a re-put alarm over in OK, and every
    hourly run would notify a lasting drift again."""
    names = [r["AlarmName"] for r in requests]
    existing = {a["AlarmName"]: a for a in cloudwatch.describe_alarms(AlarmNames=names)["MetricAlarms"]}
    for request in requests:
        found = existing.get(request["AlarmName"])
        if found is None or any(found.get(field) != value for field, value in request.items()):
            cloudwatch.put_metric_alarm(**request)
    return names
