"""CloudWatch's alarm evaluation on moto: read an alarm (DescribeAlarms) and its metric's datapoints
(GetMetricData, one value of the alarm's statistic per period, periods aligned to the period as
CloudWatch aligns them), evaluate it (`alarms`), and set its state in moto (SetAlarmState, with the
StateReason and StateReasonData CloudWatch writes) when it changes, so that DescribeAlarms shows the
DAGs and the on-call person what CloudWatch would."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import UTC, datetime

from standin.cloudwatch.alarms import EXTRA_PERIODS, Evaluation, MetricAlarm, evaluate, evaluation_range

log = logging.getLogger("standin")


class AlarmEvaluator:
    """Evaluates named metric alarms through `client`, a CloudWatch client of moto's."""

    def __init__(self, client) -> None:
        self.client = client

    def evaluate(self, names: list[str], now: float | None = None) -> dict[str, str]:
        """Each named alarm's state after this evaluation (an alarm that does not exist is left out;
        one on a metric math expression or an extended statistic keeps the state it has)."""
        now = time.time() if now is None else now
        states: dict[str, str] = {}
        for described in self.client.describe_alarms(AlarmNames=names).get("MetricAlarms", []):
            name, current = described["AlarmName"], described.get("StateValue", "INSUFFICIENT_DATA")
            if "Statistic" not in described or "MetricName" not in described:
                log.warning("alarm %s: only alarms on one metric's standard statistic are evaluated locally", name)
                states[name] = current
                continue
            alarm = MetricAlarm.from_description(described)
            result = evaluate(alarm, evaluation_range(alarm, self._values(described, alarm, now), now), current)
            if result.state != current:
                self._set(described, alarm, result, current)
            states[name] = result.state
        return states

    def _values(self, described: dict, alarm: MetricAlarm, now: float) -> dict[float, float]:
        """Period start -> the alarm's statistic over that period, for the periods evaluated."""
        period = alarm.period
        end = (math.floor(now / period) + 1) * period
        start = end - period * (alarm.evaluation_periods + EXTRA_PERIODS + 1)
        metric = {"Namespace": described["Namespace"], "MetricName": described["MetricName"]}
        if described.get("Dimensions"):
            metric["Dimensions"] = described["Dimensions"]
        stat = {"Metric": metric, "Period": period, "Stat": alarm.statistic}
        if described.get("Unit"):
            stat["Unit"] = described["Unit"]
        answer = self.client.get_metric_data(
            MetricDataQueries=[{"Id": "m", "MetricStat": stat, "ReturnData": True}],
            StartTime=datetime.fromtimestamp(start, UTC),
            EndTime=datetime.fromtimestamp(end, UTC),
        )
        values: dict[float, float] = {}
        for result in answer.get("MetricDataResults", []):
            for stamp, value in zip(result.get("Timestamps", []), result.get("Values", []), strict=False):
                values[float(stamp.timestamp())] = float(value)
        return values

    def _set(self, described: dict, alarm: MetricAlarm, result: Evaluation, current: str) -> None:
        # StateReasonData as CloudWatch writes it (version 1.0: the query, the datapoints evaluated).
        data = {
            "version": "1.0",
            "queryDate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000"),
            "statistic": alarm.statistic,
            "period": alarm.period,
            "recentDatapoints": [value for _, value in result.datapoints],
            "threshold": alarm.threshold,
            "evaluatedDatapoints": [
                {
                    "timestamp": datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000"),
                    "value": value,
                }
                for start, value in reversed(result.datapoints)
            ],
        }
        log.info("alarm %s: %s -> %s: %s", alarm.name, current, result.state, result.reason)
        self.client.set_alarm_state(
            AlarmName=alarm.name, StateValue=result.state, StateReason=result.reason, StateReasonData=json.dumps(data)
        )
