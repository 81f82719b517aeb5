"""What CloudWatch sends an alarm's SNS topics when the alarm changes state: the alarm notification
JSON, in the layout AWS publishes it, to each topic of the new state's actions (AlarmActions for ALARM,
OKActions for OK, InsufficientDataActions for INSUFFICIENT_DATA), only while ActionsEnabled.

moto stores the actions and never runs them: its SetAlarmState only records the state (moto 5.2.5,
moto/cloudwatch/models.py `CloudWatchBackend.set_alarm_state` -> `FakeAlarm.update_state`, no SNS
call), so nothing here is sent twice.

The layout is AWS's own samples of the notification as it reaches a subscriber, in aws/aws-lambda-go's
events/testdata/cloudwatch-alarm-sns-payload-single-metric.json (an alarm on one metric: `Trigger` names
the metric, its `Statistic` in capitals, `Dimensions` as `{"value", "name"}`) and
cloudwatch-alarm-sns-payload-multiple-metrics.json (metric math: `Trigger.Metrics` is the alarm's
Metrics). The Subject ("ALARM: \"<name>\" in <region's long name>") and the Region's long name are as
CloudWatch's notifications show them (e-mailed and SNS-delivered alarms); the long name is known here
for the local stack's region only, other regions keep their code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime

from standin.core import ACCOUNT

log = logging.getLogger("standin")

REGION_NAMES = {"us-east-1": "US East (N. Virginia)"}
ACTIONS = {"ALARM": "AlarmActions", "OK": "OKActions", "INSUFFICIENT_DATA": "InsufficientDataActions"}
MAX_SUBJECT = 100  # SNS's limit on a Subject


def _timestamp(moment: datetime) -> str:
    """CloudWatch's StateChangeTime: 2015-06-03T17:43:27.123+0000."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def _dimensions(dimensions: list[Mapping]) -> list[dict]:
    return [{"value": d["Value"], "name": d["Name"]} for d in dimensions]


def _treat_missing(alarm: Mapping) -> str:
    # As AWS's samples write it, padding included.
    return f"- TreatMissingData:                    {alarm.get('TreatMissingData') or 'missing'}"


def _metric_query(query: Mapping) -> dict:
    if "Expression" in query:
        found = {k: query[k] for k in ("Expression", "Id", "Label") if k in query}
        return {**found, "ReturnData": query.get("ReturnData", True)}
    stat = query["MetricStat"]
    metric = stat["Metric"]
    return {
        "Id": query["Id"],
        "MetricStat": {
            "Metric": {
                "Dimensions": _dimensions(metric.get("Dimensions", [])),
                "MetricName": metric["MetricName"],
                "Namespace": metric["Namespace"],
            },
            "Period": stat["Period"],
            "Stat": stat["Stat"],
        },
        "ReturnData": query.get("ReturnData", False),
    }


def trigger(alarm: Mapping) -> dict:
    """The notification's `Trigger`: the alarm's metric (or metric math) and its threshold rule."""
    rule = {
        "Period": alarm.get("Period"),
        "EvaluationPeriods": alarm["EvaluationPeriods"],
        "ComparisonOperator": alarm["ComparisonOperator"],
        "Threshold": float(alarm["Threshold"]),
        "TreatMissingData": _treat_missing(alarm),
        "EvaluateLowSampleCountPercentile": alarm.get("EvaluateLowSampleCountPercentile", ""),
    }
    if alarm.get("Metrics"):
        first: Mapping = next((q for q in alarm["Metrics"] if "MetricStat" in q), {})
        rule["Period"] = rule["Period"] or first.get("MetricStat", {}).get("Period")
        return {**rule, "Metrics": [_metric_query(q) for q in alarm["Metrics"]]}
    metric = {
        "MetricName": alarm["MetricName"],
        "Namespace": alarm["Namespace"],
        "StatisticType": "Statistic",
        "Statistic": str(alarm.get("Statistic", "")).upper(),
        "Unit": alarm.get("Unit"),
        "Dimensions": _dimensions(alarm.get("Dimensions", [])),
    }
    return {**metric, **rule}


def alarm_message(alarm: Mapping, old: str, new: str, reason: str, changed: datetime, region: str) -> dict:
    """The notification CloudWatch publishes for `alarm` (a DescribeAlarms entry) going `old` -> `new`."""
    name = alarm["AlarmName"]
    return {
        "AlarmName": name,
        "AlarmDescription": alarm.get("AlarmDescription"),
        "AWSAccountId": ACCOUNT,
        "NewStateValue": new,
        "NewStateReason": reason,
        "StateChangeTime": _timestamp(changed),
        "Region": REGION_NAMES.get(region, region),
        "AlarmArn": alarm.get("AlarmArn") or f"arn:aws:cloudwatch:{region}:{ACCOUNT}:alarm:{name}",
        "OldStateValue": old,
        "Trigger": trigger(alarm),
    }


def subject(name: str, state: str, region: str) -> str:
    return f'{state}: "{name}" in {REGION_NAMES.get(region, region)}'[:MAX_SUBJECT]


def topics(alarm: Mapping, state: str) -> list[str]:
    """The SNS topics the alarm's actions for `state` name, none while its actions are disabled; other
    kinds of action (an Auto Scaling policy, an EC2 action) are not CloudWatch-to-SNS and left out."""
    if not alarm.get("ActionsEnabled", True):
        return []
    return [arn for arn in alarm.get(ACTIONS[state], []) if arn.startswith("arn:aws:sns:")]


def notify(sns, alarm: Mapping, old: str, new: str, reason: str, changed: datetime, region: str) -> list[str]:
    """Publish the notification to each topic of the new state's actions; the topics it reached. A
    topic that cannot be reached costs a warning, as an undeliverable action does on AWS (the alarm's
    history records it; the state change stands)."""
    message = json.dumps(alarm_message(alarm, old, new, reason, changed, region))
    reached = []
    for topic in topics(alarm, new):
        try:
            sns.publish(TopicArn=topic, Subject=subject(alarm["AlarmName"], new, region), Message=message)
        except Exception as exc:
            log.warning("alarm %s: could not notify %s: %s", alarm["AlarmName"], topic, exc)
            continue
        reached.append(topic)
    return reached
