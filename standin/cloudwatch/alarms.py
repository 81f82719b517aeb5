"""CloudWatch's evaluation of a metric alarm, from its documented semantics, with no I/O: which periods
are looked at, how a period's datapoint compares with the threshold, M out of N, and what missing data
becomes under each TreatMissingData. moto stores alarms and never evaluates them; `evaluator` feeds
this module moto's datapoints and writes the state back.

Sources: "Configuring how CloudWatch alarms treat missing data" and "Avoiding premature transitions to
alarm state" in the CloudWatch User Guide
(https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/alarms-and-missing-data.html; the
archived source, awsdocs/amazon-cloudwatch-user-guide doc_source/AlarmThatSendsEmail.md), whose tables
tests/airflow_side/test_alarm_evaluation.py holds this module to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OK, ALARM, INSUFFICIENT_DATA = "OK", "ALARM", "INSUFFICIENT_DATA"
# CloudWatch's evaluation range: "CloudWatch retrieves the 5 most recent data points when evaluating
# the alarm" for 3 evaluation periods; the guide's examples all take two periods beyond N.
EXTRA_PERIODS = 2

COMPARISONS = {
    "GreaterThanOrEqualToThreshold": (lambda v, t: v >= t, "greater than or equal to"),
    "GreaterThanThreshold": (lambda v, t: v > t, "greater than"),
    "LessThanThreshold": (lambda v, t: v < t, "less than"),
    "LessThanOrEqualToThreshold": (lambda v, t: v <= t, "less than or equal to"),
}
# A period still open has seen only part of its data. Where the statistic can only move towards the
# threshold as data comes (a Sum of non-negative values, a Maximum or a SampleCount rising past a
# greater-than threshold; a Minimum falling under a less-than one), a breach seen early is final, so
# the open period may fire the alarm at once. Any other open period (an Average above all) is not
# looked at until it has closed.
GROWING = {"Sum", "Maximum", "SampleCount"}
FALLING = {"Minimum"}


@dataclass(frozen=True)
class MetricAlarm:
    """The parts of a DescribeAlarms `MetricAlarms` entry that its evaluation reads."""

    name: str
    period: int
    evaluation_periods: int
    datapoints_to_alarm: int
    threshold: float
    comparison: str
    statistic: str
    treat_missing: str = "missing"

    @classmethod
    def from_description(cls, alarm: Mapping) -> MetricAlarm:
        return cls(
            name=alarm["AlarmName"],
            period=int(alarm["Period"]),
            evaluation_periods=int(alarm["EvaluationPeriods"]),
            # "If you are setting an M out of N alarm, this value is M"; unset, M is N.
            datapoints_to_alarm=int(alarm.get("DatapointsToAlarm") or alarm["EvaluationPeriods"]),
            threshold=float(alarm["Threshold"]),
            comparison=alarm["ComparisonOperator"],
            statistic=alarm["Statistic"],
            treat_missing=alarm.get("TreatMissingData") or "missing",
        )

    def breaches(self, value: float) -> bool:
        return COMPARISONS[self.comparison][0](value, self.threshold)

    def early_breach_is_final(self) -> bool:
        """Whether a breach in a period still open cannot be undone by the rest of its data."""
        if self.comparison.startswith("Greater"):
            return self.statistic in GROWING
        return self.statistic in FALLING


@dataclass(frozen=True)
class Evaluation:
    state: str  # OK, ALARM, INSUFFICIENT_DATA
    reason: str  # StateReason, in CloudWatch's words
    datapoints: tuple[tuple[float, float], ...]  # (period start, value) of the real datapoints evaluated


def evaluation_range(alarm: MetricAlarm, values: Mapping[float, float], now: float) -> list[tuple[float, float | None]]:
    """The periods CloudWatch looks at, oldest first, as (period start, the statistic's value or None
    for a missing datapoint): `evaluation_periods + 2` periods, aligned to multiples of the period,
    ending with the last closed one, or with the open one when its datapoint already breaches for good
    (`MetricAlarm.early_breach_is_final`). `values` maps period starts to the statistic's value."""
    period = alarm.period
    current = math.floor(now / period) * period
    open_value = values.get(current)
    settled = open_value is not None and alarm.breaches(open_value) and alarm.early_breach_is_final()
    last = current if settled else current - period
    count = alarm.evaluation_periods + EXTRA_PERIODS
    starts = [last - period * back for back in range(count - 1, -1, -1)]
    return [(start, values.get(start)) for start in starts]


def evaluate(alarm: MetricAlarm, points: Sequence[tuple[float, float | None]], current_state: str) -> Evaluation:
    """The alarm's state over an evaluation range (oldest first), as the guide's rules give it:
    - with at least N real datapoints in the range, the N most recent of them decide (M breaching:
      ALARM), and missing data is not treated at all;
    - with fewer, the real ones all count and the N minus that many most recent missing ones are
      filled with the TreatMissingData result (breaching, notBreaching); `missing` and `ignore` fill
      none: no real datapoint at all is INSUFFICIENT_DATA (`missing`) or the current state (`ignore`);
    - "premature alarm state": with fewer than M real datapoints in the range ("even if the total
      number of datapoints available is lower than M"), when within the last N periods the oldest
      breaching datapoint is at least M periods old and all more recent ones are breaching or
      missing, `missing` goes to ALARM (and `ignore` keeps its state). With M or more real ones the
      rule does not apply: the guide's `0 - X - -` (2 out of 3) stays OK."""
    n, m = alarm.evaluation_periods, alarm.datapoints_to_alarm
    real = [(start, value) for start, value in points if value is not None]
    treatment = alarm.treat_missing
    if len(real) >= n:
        evaluated = real[-n:]
        breaching = sum(alarm.breaches(v) for _, v in evaluated)
        return _threshold(alarm, evaluated, breaching, n, filled=0, state=ALARM if breaching >= m else OK)
    fill = n - len(real)
    if treatment == "breaching":
        breaching = sum(alarm.breaches(v) for _, v in real) + fill
        return _threshold(alarm, real, breaching, n, fill, ALARM if breaching >= m else OK)
    if treatment == "notBreaching":
        breaching = sum(alarm.breaches(v) for _, v in real)
        return _threshold(alarm, real, breaching, n, fill, ALARM if breaching >= m else OK)
    if not real:
        if treatment == "ignore":
            return Evaluation(current_state, _reason_kept(n), ())
        return Evaluation(INSUFFICIENT_DATA, _reason_unknown(n), ())
    if len(real) < m and _premature_alarm(alarm, points):
        if treatment == "ignore":
            return Evaluation(current_state, _reason_kept(n), tuple(real))
        breaching = sum(alarm.breaches(v) for _, v in real)
        return _threshold(alarm, real, breaching, n, filled=0, state=ALARM)
    breaching = sum(alarm.breaches(v) for _, v in real)
    return _threshold(alarm, real, breaching, n, filled=0, state=ALARM if breaching >= m else OK)


def _premature_alarm(alarm: MetricAlarm, points: Sequence[tuple[float, float | None]]) -> bool:
    window = [value for _, value in points[-alarm.evaluation_periods :]]
    for index, value in enumerate(window):
        if value is not None and alarm.breaches(value):
            age = len(window) - index  # the most recent period is 1 period old
            rest = window[index + 1 :]
            return age >= alarm.datapoints_to_alarm and all(v is None or alarm.breaches(v) for v in rest)
    return False


def _stamp(start: float) -> str:
    return time.strftime("%d/%m/%y %H:%M:%S", time.gmtime(start))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _threshold(
    alarm: MetricAlarm, evaluated: Sequence[tuple[float, float]], breaching: int, n: int, filled: int, state: str
) -> Evaluation:
    """CloudWatch's StateReason for a threshold alarm, e.g. "Threshold Crossed: 1 out of the last 1
    datapoints [3.0 (13/05/25 10:00:00)] was greater than or equal to the threshold (1.0) (minimum 1
    datapoint for OK -> ALARM transition).": the datapoints listed are the breaching ones for ALARM,
    the others for OK, most recent first."""
    words = COMPARISONS[alarm.comparison][1]
    wanted = state == ALARM
    shown = [(s, v) for s, v in reversed(evaluated) if alarm.breaches(v) == wanted]
    listed = ", ".join(f"{v} ({_stamp(s)})" for s, v in shown)
    count = breaching if wanted else len(shown)
    verb = "was" if count == 1 else "were"
    negation = "" if wanted else "not "
    reason = (
        f"Threshold Crossed: {count} out of the last {n} datapoints [{listed}] {verb} {negation}{words} "
        f"the threshold ({alarm.threshold}) (minimum {_plural(alarm.datapoints_to_alarm, 'datapoint')} for "
        f"{'OK -> ALARM' if wanted else 'ALARM -> OK'} transition)."
    )
    if filled:
        treated = "Breaching" if alarm.treat_missing == "breaching" else "NonBreaching"
        reason = (
            f"{reason[:-1]} {_plural(filled, 'missing datapoint')} {'was' if filled == 1 else 'were'} "
            f"treated as [{treated}]."
        )
    return Evaluation(state, reason, tuple(evaluated))


def _reason_unknown(n: int) -> str:
    return f"Insufficient Data: {_plural(n, 'datapoint')} {'was' if n == 1 else 'were'} unknown."


def _reason_kept(n: int) -> str:
    return f"No datapoints were received for {_plural(n, 'period')}: missing data is ignored, the state is kept."
