"""CloudWatch's alarm evaluation on moto: read an alarm (DescribeAlarms) and its metric's datapoints
(GetMetricData, one value of the alarm's statistic per period, periods aligned to the period as
CloudWatch aligns them), evaluate it (`alarms`), and set its state in moto (SetAlarmState, with the
StateReason and StateReasonData CloudWatch writes) when it changes, so that DescribeAlarms shows the
DAGs and the on-call person what CloudWatch would; then send the alarm's actions their notification
(`notifications`), as CloudWatch does on a state change.

`AlarmLoop` does this for every metric alarm in the account every few seconds, as CloudWatch evaluates
every alarm every period; deployment guardrails also evaluate their rollback alarms during a bake
(standin.sagemaker.models). One evaluation runs at a time, so a state change is made and notified once.

Alarms on metric math (`Metrics`, as lambda/template.yaml's 4XX share) are evaluated for expressions of
the arithmetic operators (+ - * /), numbers and the alarm's metric ids (e.g. `100 * m1 / m2`): each
period's value is the expression over the metrics' values in that period (a period where a metric has
no datapoint, or a division by zero, has none). Open periods are never looked at for them. Other
expressions (functions such as FILL or METRICS()) and extended statistics (p90) keep their state here:
CloudWatch on AWS evaluates them.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import operator
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from standin.cloudwatch import notifications
from standin.cloudwatch.alarms import EXTRA_PERIODS, Evaluation, MetricAlarm, evaluate, evaluation_range

log = logging.getLogger("standin")
# One evaluation at a time in this process: the loop and a deployment's bake may look at the same alarm.
EVALUATING = threading.Lock()
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class AlarmEvaluator:
    """Evaluates metric alarms through `client`, a CloudWatch client of moto's, and sends the
    notifications of their state changes through `sns` (an SNS client of moto's; None: none sent)."""

    def __init__(self, client, sns=None, region: str = "us-east-1") -> None:
        self.client, self.sns, self.region = client, sns, region

    def evaluate(self, names: list[str] | None = None, now: float | None = None) -> dict[str, str]:
        """Each named alarm's state after this evaluation (None: every metric alarm; an alarm that does
        not exist is left out; one CloudWatch evaluates but the stand-in cannot keeps its state)."""
        now = time.time() if now is None else now
        states: dict[str, str] = {}
        with EVALUATING:
            for described in self._describe(names):
                states[described["AlarmName"]] = self._evaluate_one(described, now)
        return states

    def _describe(self, names: list[str] | None) -> list[dict]:
        if names is not None:
            return self.client.describe_alarms(AlarmNames=names).get("MetricAlarms", []) if names else []
        found: list[dict] = []
        for page in self.client.get_paginator("describe_alarms").paginate(AlarmTypes=["MetricAlarm"]):
            found += page.get("MetricAlarms", [])
        return found

    def _evaluate_one(self, described: dict, now: float) -> str:
        name, current = described["AlarmName"], described.get("StateValue", "INSUFFICIENT_DATA")
        if described.get("Metrics"):
            alarm, values = self._math(described, now)
        elif "Statistic" in described and "MetricName" in described:
            alarm = MetricAlarm.from_description(described)
            values = self._values(described, alarm, now)
        else:
            alarm, values = None, None
        if alarm is None or values is None:
            log.debug("alarm %s: evaluated on AWS only (extended statistic or expression)", name)
            return current
        result = evaluate(alarm, evaluation_range(alarm, values, now), current)
        if result.state != current:
            self._set(described, alarm, result, current)
        return result.state

    def _values(self, described: dict, alarm: MetricAlarm, now: float) -> dict[float, float]:
        """Period start -> the alarm's statistic over that period, for the periods evaluated."""
        metric = {"Namespace": described["Namespace"], "MetricName": described["MetricName"]}
        if described.get("Dimensions"):
            metric["Dimensions"] = described["Dimensions"]
        stat = {"Metric": metric, "Period": alarm.period, "Stat": alarm.statistic}
        if described.get("Unit"):
            stat["Unit"] = described["Unit"]
        return self._series({"m": stat}, alarm, now)["m"]

    def _series(self, stats: dict[str, dict], alarm: MetricAlarm, now: float) -> dict[str, dict[float, float]]:
        """Each query id's period start -> value (GetMetricData), over the periods evaluated."""
        period = alarm.period
        end = (math.floor(now / period) + 1) * period
        start = end - period * (alarm.evaluation_periods + EXTRA_PERIODS + 1)
        answer = self.client.get_metric_data(
            MetricDataQueries=[{"Id": i, "MetricStat": stat, "ReturnData": True} for i, stat in stats.items()],
            StartTime=datetime.fromtimestamp(start, UTC),
            EndTime=datetime.fromtimestamp(end, UTC),
        )
        series: dict[str, dict[float, float]] = {i: {} for i in stats}
        for result in answer.get("MetricDataResults", []):
            for stamp, value in zip(result.get("Timestamps", []), result.get("Values", []), strict=False):
                series[result["Id"]][float(stamp.timestamp())] = float(value)
        return series

    def _math(self, described: dict, now: float) -> tuple[MetricAlarm | None, dict[float, float] | None]:
        """A metric math alarm as a MetricAlarm (no statistic: open periods are not looked at) and its
        expression's value per period; (None, None) for what the stand-in does not evaluate."""
        queries = described["Metrics"]
        stats = {q["Id"]: q["MetricStat"] for q in queries if "MetricStat" in q}
        returned = [q for q in queries if q.get("ReturnData", True) and "Expression" in q]
        if len(returned) != 1 or not stats:
            return None, None
        try:
            expression = ast.parse(returned[0]["Expression"], mode="eval").body
            _check(expression, set(stats))
        except (SyntaxError, ValueError):
            return None, None
        period = int(described.get("Period") or next(iter(stats.values()))["Period"])
        alarm = MetricAlarm.from_description({**described, "Period": period, "Statistic": ""})
        series = self._series(stats, alarm, now)
        starts = set.intersection(*(set(values) for values in series.values()))
        values = {}
        for start in starts:
            with contextlib.suppress(ZeroDivisionError):
                values[start] = _compute(expression, {i: series[i][start] for i in series})
        return alarm, values

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
        if not alarm.statistic:  # metric math: no one statistic
            data.pop("statistic")
        log.info("alarm %s: %s -> %s: %s", alarm.name, current, result.state, result.reason)
        self.client.set_alarm_state(
            AlarmName=alarm.name, StateValue=result.state, StateReason=result.reason, StateReasonData=json.dumps(data)
        )
        if self.sns is not None:
            changed = datetime.now(UTC)
            notifications.notify(self.sns, described, current, result.state, result.reason, changed, self.region)


def _check(node: ast.AST, ids: set[str]) -> None:
    """Refuse (ValueError) what is not arithmetic on numbers and the alarm's metric ids."""
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        _check(node.left, ids)
        _check(node.right, ids)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        _check(node.operand, ids)
    elif isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return
    elif not (isinstance(node, ast.Name) and node.id in ids):
        raise ValueError(f"not evaluated locally: {ast.dump(node)}")


def _compute(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.BinOp):
        return OPERATORS[type(node.op)](_compute(node.left, values), _compute(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return -_compute(node.operand, values)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    assert isinstance(node, ast.Name)  # _check let nothing else through
    return values[node.id]


class AlarmLoop:
    """CloudWatch's evaluation of every metric alarm, every `interval` seconds, in a daemon thread
    (with `before`, e.g. the metrics publisher's flush, run first so that what happened is judged)."""

    def __init__(self, evaluator: AlarmEvaluator, interval: float, before: Callable[[], Any] | None = None) -> None:
        self.evaluator, self.interval, self.before = evaluator, interval, before
        self.stopping = threading.Event()
        self.failing = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="cloudwatch-alarms")
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                if self.before is not None:
                    self.before()
                self.evaluator.evaluate()
            except Exception as exc:  # moto unreachable: try again next time, say so once
                if not self.failing:
                    log.warning("could not evaluate the alarms: %s", exc)
                self.failing = True
                continue
            self.failing = False

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
