"""CloudWatch's alarm evaluation (standin/cloudwatch/alarms.py) against the worked examples of AWS's
documentation: no server, only the pure module.

The tables are "Configuring how CloudWatch alarms treat missing data" in the CloudWatch User Guide,
https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/alarms-and-missing-data.html (archived
source: awsdocs/amazon-cloudwatch-user-guide, doc_source/AlarmThatSendsEmail.md, "How alarm state is
evaluated when data is missing"). Each row: the five most recent datapoints, most recent on the right
(0 not breaching, X breaching, - missing), then the state for MISSING, IGNORE, BREACHING, NOT BREACHING;
"Retain current state" is written RETAIN."""

from __future__ import annotations

import pytest

from standin.cloudwatch.alarms import ALARM, INSUFFICIENT_DATA, OK, MetricAlarm, evaluate, evaluation_range

URL = "https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/alarms-and-missing-data.html"
TREATMENTS = ("missing", "ignore", "breaching", "notBreaching")

# Datapoints to Alarm 3, Evaluation Periods 3 (the guide's first table).
THREE_OF_THREE = [
    ("0 - X - X", "OK", "OK", "OK", "OK"),
    ("0 - - - -", "OK", "OK", "OK", "OK"),
    ("- - - - -", "INSUFFICIENT_DATA", "RETAIN", "ALARM", "OK"),
    ("0 X X - X", "ALARM", "ALARM", "ALARM", "ALARM"),
    ("- - X - -", "ALARM", "RETAIN", "ALARM", "OK"),
]
# Datapoints to Alarm 2, Evaluation Periods 3: "a 2 out of 3, M out of N alarm" (the second table).
TWO_OF_THREE = [
    ("0 - X - X", "ALARM", "ALARM", "ALARM", "ALARM"),
    ("0 0 X 0 X", "ALARM", "ALARM", "ALARM", "ALARM"),
    ("0 - X - -", "OK", "OK", "ALARM", "OK"),
    ("- - - - 0", "OK", "OK", "ALARM", "OK"),
    ("- - - X -", "ALARM", "RETAIN", "ALARM", "OK"),
]
PERIOD, THRESHOLD = 300, 1.0
VALUES = {"0": 0.0, "X": 5.0, "-": None}


def alarm(m: int, treatment: str, statistic: str = "Sum", comparison: str = "GreaterThanOrEqualToThreshold"):
    return MetricAlarm("a", PERIOD, 3, m, THRESHOLD, comparison, statistic, treatment)


def points(row: str) -> list[tuple[float, float | None]]:
    return [(PERIOD * i, VALUES[mark]) for i, mark in enumerate(row.split())]


@pytest.mark.parametrize(
    ("m", "row", "expected"),
    [(3, r[0], r[1:]) for r in THREE_OF_THREE] + [(2, r[0], r[1:]) for r in TWO_OF_THREE],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_the_guides_tables_of_missing_data(m, row, expected):
    for treatment, state in zip(TREATMENTS, expected, strict=True):
        for current in (OK, ALARM, INSUFFICIENT_DATA):
            result = evaluate(alarm(m, treatment), points(row), current)
            assert result.state == (current if state == "RETAIN" else state), (URL, row, treatment, current)


def test_the_state_reason_reads_as_cloudwatch_writes_it():
    result = evaluate(alarm(1, "notBreaching"), [(0.0, None), (60.0, None), (120.0, 3.0)], OK)
    assert result.state == ALARM
    assert result.reason.startswith("Threshold Crossed: 1 out of the last 3 datapoints [3.0 (01/01/70 00:02:00)] was ")
    assert "greater than or equal to the threshold (1.0) (minimum 1 datapoint for OK -> ALARM transition)" in (
        result.reason
    )
    quiet = evaluate(alarm(1, "notBreaching"), [(0.0, None), (60.0, None), (120.0, None)], ALARM)
    assert quiet.state == OK and "3 missing datapoints were treated as [NonBreaching]" in quiet.reason


def five_xx(treatment: str = "notBreaching") -> MetricAlarm:
    """The deploy DAG's 5xx alarm (the shared interface): Sum >= 1 over one 60 s period."""
    return MetricAlarm("e-invocation-5xx-errors", 60, 1, 1, 1.0, "GreaterThanOrEqualToThreshold", "Sum", treatment)


def latency() -> MetricAlarm:
    return MetricAlarm("e-model-latency", 60, 1, 1, 500_000.0, "GreaterThanThreshold", "Average", "notBreaching")


def test_an_open_period_that_already_breaches_a_growing_sum_fires_at_once():
    now = 600 + 12.0  # 12 s into the period that started at 600
    window = evaluation_range(five_xx(), {600: 2.0}, now)
    assert window[-1] == (600, 2.0) and len(window) == 3
    assert evaluate(five_xx(), window, OK).state == ALARM


def test_an_open_period_below_the_threshold_waits_for_its_close():
    # A Sum of 0 may still grow: the open period is not looked at, the closed ones decide.
    window = evaluation_range(five_xx(), {600: 0.0}, 612.0)
    assert [start for start, _ in window] == [420, 480, 540]
    assert evaluate(five_xx(), window, ALARM).state == OK  # missing treated as not breaching


def test_an_open_average_is_not_looked_at_until_it_closes():
    # An average can fall again as more requests come: a slow first request must not fire the alarm.
    window = evaluation_range(latency(), {600: 900_000.0}, 612.0)
    assert window[-1][0] == 540
    assert evaluate(latency(), window, OK).state == OK
    closed = evaluation_range(latency(), {600: 900_000.0}, 661.0)
    assert closed[-1] == (600, 900_000.0) and evaluate(latency(), closed, OK).state == ALARM


def test_a_falling_minimum_under_a_less_than_threshold_fires_early():
    low = MetricAlarm("low", 60, 1, 1, 5.0, "LessThanThreshold", "Minimum", "missing")
    assert evaluation_range(low, {600: 1.0}, 630.0)[-1] == (600, 1.0)
    assert evaluation_range(low, {600: 9.0}, 630.0)[-1][0] == 540


def test_datapoints_to_alarm_defaults_to_the_evaluation_periods():
    described = {
        "AlarmName": "x",
        "Period": 60,
        "EvaluationPeriods": 2,
        "Threshold": 1.0,
        "ComparisonOperator": "GreaterThanThreshold",
        "Statistic": "Maximum",
    }
    parsed = MetricAlarm.from_description(described)
    assert (parsed.datapoints_to_alarm, parsed.treat_missing) == (2, "missing")
