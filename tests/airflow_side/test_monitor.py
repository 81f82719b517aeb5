"""bin_count_monitor's parts: the join of captures and API log lines, live accuracy, the drift tests,
the baseline from a model card, the report in S3 (on moto, opened through its presigned URL), and the
metrics and alarms in moto's CloudWatch, evaluated as the stand-in evaluates every alarm."""

from __future__ import annotations

import io
import json
import random
import tarfile
import urllib.request
from datetime import UTC, datetime, timedelta

import boto3
import pendulum
import pytest

from bin_counter import monitor, monitor_baseline, monitor_metrics, monitor_report
from bin_counter.capture import CapturedRequest, Verdict
from standin.cloudwatch.evaluator import AlarmEvaluator
from tests.airflow_side.test_deploy_requests import validate_cloudwatch
from tests.conftest import make_bin_image

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
WINDOW = {"start": T0.isoformat(), "end": (T0 + timedelta(hours=1)).isoformat()}
# A test set's predicted counts (classes 0-5) and confidences, as the model card keeps them.
BASELINE_COUNTS = [10, 60, 110, 140, 120, 60]
BASELINE_CONFIDENCE = [0, 0, 5, 40, 90, 120, 100, 70, 50, 25]


def verdict(request_id: str, count: int, expected: int | None, minute: int = 0, confidence: float = 0.7) -> Verdict:
    judged = None if expected is None else ("match" if count == expected else "mismatch")
    answer = {"count": count, "confidence": confidence, "expected": expected, "verdict": judged}
    return Verdict(request_id, T0 + timedelta(minutes=minute), "mv-1", [answer], 200)


def captured(request_id: str | None, count: int, photo: bytes, minute: int = 0) -> CapturedRequest:
    return CapturedRequest(
        event_id=f"event-{request_id}-{minute}",
        inference_id=request_id,
        time=T0 + timedelta(minutes=minute),
        endpoint="ep",
        variant="AllTraffic",
        content_type="image/jpeg",
        images=[photo],
        predictions=[{"count": count, "confidence": 0.6, "probabilities": [0.1] * 6}],
        model_version="mv-1",
    )


def sample_from(histogram: list[int], n: int, seed: int) -> list[int]:
    """n classes drawn with the histogram's shares."""
    return random.Random(seed).choices(range(len(histogram)), weights=histogram, k=n)


def baseline(**extra) -> dict:
    return {
        "model": "bin-counter-ep-v1",
        "model_version": "mv-1",
        "num_classes": 6,
        "test_accuracy": 0.44,
        "count_histogram": BASELINE_COUNTS,
        "confidence_histogram": BASELINE_CONFIDENCE,
        "photo_statistics": {},
        **extra,
    }


def answers_with(counts: list[int], confidences: list[float]) -> dict[str, Verdict]:
    return {
        f"r{i}": verdict(f"r{i}", c, None, minute=i % 60, confidence=p)
        for i, (c, p) in enumerate(zip(counts, confidences, strict=True))
    }


def confidences_from(histogram: list[int], n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [(b + rng.random()) / 10 for b in sample_from(histogram, n, seed)]


# -- the join and live accuracy ------------------------------------------------------------------
def test_captures_join_their_log_lines_by_inference_id_and_neither_is_lost_without_the_other():
    photo = make_bin_image(2, 0)
    verdicts = {"a": verdict("a", 2, 2), "b": verdict("b", 3, 1, minute=5)}
    captures = [captured("a", 2, photo), captured(None, 4, photo, minute=7)]  # b was not sampled
    answers, joined = monitor.join(captures, verdicts)
    assert joined == {"verdict_lines": 2, "captures": 2, "joined": 1, "capture_only": 1, "requests": 3}
    by_id = {a.request_id: a for a in answers}
    assert by_id["a"].photo == photo and by_id["a"].expected == 2  # the line's expected count, the capture's photo
    assert by_id["b"].photo is None and by_id["b"].expected == 1
    [alone] = [a for a in answers if a.request_id.startswith("capture:")]
    assert alone.count == 4 and alone.expected is None and alone.photo == photo
    assert [a.time for a in answers] == sorted(a.time for a in answers)
    # A capture whose photos do not match its line's answers one to one: the line's answers stay.
    two = captured("a", 2, photo)
    two = CapturedRequest(**{**two.__dict__, "images": [photo, photo]})
    answers, joined = monitor.join([two], {"a": verdict("a", 2, 2)})
    assert joined["photos_not_matched"] == 1 and [(a.expected, a.photo) for a in answers] == [(2, None)]


def test_live_accuracy_rmse_and_within_one_are_the_expected_counts_against_the_answers():
    pairs = [(2, 2), (3, 2), (0, 0), (5, 1), (4, 4), (1, None)]  # (count, expected)
    verdicts = {f"r{i}": verdict(f"r{i}", c, e, minute=i) for i, (c, e) in enumerate(pairs)}
    thresholds = monitor.Thresholds(min_requests=1, min_labelled=5, min_accuracy=0.7)
    figures = monitor.assess([], verdicts, baseline(), thresholds, WINDOW)
    live = figures["live"]
    assert figures["labelled"] == 5 and figures["answers"] == 6
    assert live["accuracy"] == 0.6  # 3 of 5
    assert live["mae"] == pytest.approx((0 + 1 + 0 + 4 + 0) / 5)
    assert live["rmse"] == pytest.approx(((1 + 16) / 5) ** 0.5, abs=1e-4)
    assert live["within_1"] == 0.8
    assert live["confusion_matrix"][1][5] == 1  # expected 1, answered 5
    assert figures["verdicts"] == {"match": 3, "mismatch": 2, "uncertain": 0}
    assert figures["accuracy_below_threshold"] and figures["alerts"]
    # Under min_labelled: no accuracy, and no alarm on it.
    few = monitor.assess([], verdicts, baseline(), monitor.Thresholds(min_labelled=6, min_accuracy=0.7), WINDOW)
    assert few["live"] is None and few["live_status"] == monitor.TOO_FEW and not few["accuracy_below_threshold"]


# -- drift -----------------------------------------------------------------------------------------
def test_a_sample_from_the_test_sets_distribution_is_no_drift():
    n = 600
    verdicts = answers_with(sample_from(BASELINE_COUNTS, n, 1), confidences_from(BASELINE_CONFIDENCE, n, 2))
    figures = monitor.assess([], verdicts, baseline(), monitor.Thresholds(), WINDOW)
    assert figures["drift"]["counts"]["status"] == monitor.NO_DRIFT, figures["drift"]["counts"]
    assert figures["drift"]["confidence"]["status"] == monitor.NO_DRIFT, figures["drift"]["confidence"]
    assert figures["drift"]["counts"]["statistic"] < 0.05
    assert not figures["drift_detected"] and not figures["alerts"]


def test_a_shifted_mix_of_counts_and_lower_confidence_is_drift():
    n = 600
    shifted_counts = [300, 200, 50, 30, 10, 10]  # mostly empty and single-item bins
    low_confidence = [60, 120, 150, 90, 40, 20, 10, 5, 3, 2]
    verdicts = answers_with(sample_from(shifted_counts, n, 3), confidences_from(low_confidence, n, 4))
    figures = monitor.assess([], verdicts, baseline(), monitor.Thresholds(), WINDOW)
    assert figures["drift"]["counts"]["drifted"] and figures["drift"]["counts"]["statistic"] > 0.2
    assert figures["drift"]["confidence"]["drifted"]
    assert figures["drifted"] == ["counts", "confidence"] and figures["alerts"]


def test_too_few_requests_is_said_instead_of_drift_and_no_baseline_is_said_too():
    verdicts = answers_with([0] * 50, [0.1] * 50)  # as shifted as can be, but only 50
    figures = monitor.assess([], verdicts, baseline(confidence_histogram=None), monitor.Thresholds(), WINDOW)
    assert figures["drift"]["counts"]["status"] == monitor.TOO_FEW and not figures["drift_detected"]
    assert figures["drift"]["confidence"]["status"] == monitor.NO_BASELINE


def test_psi_is_zero_for_equal_shares_and_refuses_histograms_over_other_bins():
    assert monitor.psi([1, 2, 3], [10, 20, 30]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="different bins"):
        monitor.psi([1, 2], [1, 2, 3])


def test_darker_photos_than_the_test_sets_are_photo_drift_and_alike_ones_are_not():
    def stats(photos: list[bytes]) -> dict:
        found = [monitor.photo_statistics(p) for p in photos]
        return {name: [s[name] for s in found] for name in monitor.PHOTO_STATISTICS}

    test_photos = [make_bin_image(i % 6, i) for i in range(60)]
    base = baseline(photo_statistics=stats(test_photos))
    thresholds = monitor.Thresholds(min_requests=40)
    alike = [captured(f"a{i}", 1, make_bin_image(i % 6, 1000 + i), minute=i % 60) for i in range(60)]
    figures = monitor.assess(alike, {}, base, thresholds, WINDOW)
    assert not any(found["drifted"] for found in figures["drift"]["photos"].values()), figures["drift"]["photos"]
    bigger = [captured(f"b{i}", 1, make_bin_image(i % 6, i, size=(128, 96)), minute=i % 60) for i in range(60)]
    figures = monitor.assess(bigger, {}, base, thresholds, WINDOW)
    assert figures["drift"]["photos"]["pixels"]["drifted"] and "photo pixels" in figures["drifted"]
    assert monitor.photo_statistics(b"not a photo") is None


def test_the_window_is_the_data_interval_moved_back_or_the_params():
    now = T0 + timedelta(hours=5)
    start, end = monitor.window({"settle_minutes": 10}, T0, T0 + timedelta(hours=1), now)
    assert (start, end) == (T0 - timedelta(minutes=10), T0 + timedelta(minutes=50))
    # Triggered without a logical date: no data interval, the hour before now.
    assert monitor.window({"settle_minutes": 10}, None, None, now) == (
        now - timedelta(minutes=70),
        now - timedelta(minutes=10),
    )
    assert monitor.window({"settle_minutes": 0}, T0, T0, now) == (T0 - timedelta(hours=1), T0)
    given = {"window_start": "2026-12-01T00:00:00", "window_end": "2026-12-01T06:00:00Z"}
    start, end = monitor.window(given, None, None, now)
    assert (start.tzinfo, end - start) == (UTC, timedelta(hours=6))
    with pytest.raises(ValueError, match="both"):
        monitor.window({"window_start": "2026-12-01T00:00:00"}, T0, T0, now)
    with pytest.raises(ValueError, match="before it starts"):
        monitor.window({"window_start": "2026-12-02", "window_end": "2026-12-01"}, T0, T0, now)
    # A scheduled run's data interval, as Airflow hands it (pendulum, whose DateTime in the stdlib's
    # UTC drops its zone in arithmetic): the edges stay comparable with the log lines' aware times.
    interval = pendulum.instance(T0), pendulum.instance(T0 + timedelta(hours=1))
    start, end = monitor.window({"settle_minutes": 10}, *interval, now)
    assert (start.utcoffset(), end.utcoffset()) == (timedelta(0), timedelta(0))
    assert start < T0 and start.isoformat().endswith("+00:00")


# -- the baseline ----------------------------------------------------------------------------------
def test_a_card_without_histograms_gives_the_confusion_matrix_column_sums_and_no_confidence_baseline():
    card = {"model_version": "mv", "classes": [0, 1, 2], "metrics": {"test": {"n": 6, "accuracy": 0.5,
            "confusion_matrix": [[1, 1, 0], [0, 2, 0], [0, 1, 1]]}}}  # fmt: skip
    found = monitor_baseline.card_baseline(card)
    assert found["count_histogram"] == [1, 4, 1] and found["confidence_histogram"] is None
    card["metrics"]["test"] |= {"predicted_histogram": [2, 2, 2], "confidence_histogram": [1] * 10}
    assert monitor_baseline.card_baseline(card)["count_histogram"] == [2, 2, 2]


def test_the_model_card_is_read_from_the_artifact_in_s3(s3, bucket):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data in (
            ("model.pt", b"\0" * 50_000),
            ("model_card.json", json.dumps({"model_version": "mv"}).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    s3.put_object(Bucket=bucket, Key="m/model.tar.gz", Body=out.getvalue())
    assert monitor_baseline.model_card(s3, f"s3://{bucket}/m/model.tar.gz") == {"model_version": "mv"}


# -- the report, the metrics and the alarms --------------------------------------------------------
def shifted_figures() -> dict:
    counts = [0] * 150 + [1] * 100 + [5] * 50
    verdicts = {f"r{i}": verdict(f"r{i}", c, c if i % 3 else 2, minute=i % 60) for i, c in enumerate(counts)}
    return monitor.assess([], verdicts, baseline(), monitor.Thresholds(min_accuracy=0.8), WINDOW)


def test_the_report_is_in_s3_with_its_plots_and_opens_through_its_presigned_url(s3, bucket):
    figures = shifted_figures()
    written = monitor_report.write_report(s3, bucket, "ep", T0, figures)
    assert written["html"] == "monitoring/ep/20261207T100000Z/report.html"
    stored = json.loads(s3.get_object(Bucket=bucket, Key=written["json"])["Body"].read())
    assert stored["live"]["accuracy"] == figures["live"]["accuracy"]
    url = monitor_report.presigned_url(s3, bucket, written["html"], 3600)
    with urllib.request.urlopen(url) as response:  # no credentials: the URL carries them
        page = response.read().decode()
    assert page.count("data:image/png;base64,") == 4
    assert "drift" in page and "counts, confidence" in page


def test_the_figures_become_metrics_at_the_windows_end_and_the_drift_alarm_fires(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    figures = shifted_figures()
    now = datetime.now(UTC)
    data = monitor_metrics.metric_data("ep-unit", figures, now)
    names = {d["MetricName"] for d in data}
    assert {"Requests", "LiveAccuracy", "LiveRMSE", "LiveWithin1", "CountDriftPSI", "DriftDetected"} <= names
    requests = monitor_metrics.alarms("ep-unit", "arn:aws:sns:us-east-1:123456789012:alerts", 0.8)
    validate_cloudwatch("PutMetricData", {"Namespace": monitor_metrics.NAMESPACE, "MetricData": data})
    for request in requests:
        validate_cloudwatch("PutMetricAlarm", request)
    monitor_metrics.put_metrics(cloudwatch, data)
    alarms = monitor_metrics.ensure_alarms(cloudwatch, requests)
    monitor_metrics.ensure_alarms(cloudwatch, requests)  # again: the same two alarms
    assert len(cloudwatch.describe_alarms(AlarmNamePrefix="ep-unit-live-")["MetricAlarms"]) == 2
    states = AlarmEvaluator(cloudwatch).evaluate(alarms, now=now.timestamp() + 1)
    # The next hour's run puts nothing again: a lasting drift stays in ALARM, notified once.
    monitor_metrics.ensure_alarms(cloudwatch, requests)
    kept = {a["AlarmName"]: a["StateValue"] for a in cloudwatch.describe_alarms(AlarmNames=alarms)["MetricAlarms"]}
    cloudwatch.delete_alarms(AlarmNames=alarms)  # not left for the other tests' alarm loops
    assert states == {"ep-unit-live-drift": "ALARM", "ep-unit-live-accuracy": "ALARM"}
    assert kept == states


def test_a_window_with_too_few_requests_publishes_no_drift_datapoint():
    figures = monitor.assess([], answers_with([1] * 5, [0.5] * 5), baseline(), monitor.Thresholds(), WINDOW)
    names = {d["MetricName"] for d in monitor_metrics.metric_data("ep", figures, T0)}
    assert names == {"Requests", "Answers", "LabelledAnswers"}


def test_the_accuracy_threshold_is_the_test_accuracy_less_the_allowed_drop_unless_given():
    params = {"psi_threshold": 0.2, "ks_p_threshold": 0.001, "min_requests": 200, "min_labelled": 30}
    drop = {**params, "min_live_accuracy": None, "max_accuracy_drop": 0.15}
    assert monitor.thresholds(drop, baseline()).min_accuracy == pytest.approx(0.29)
    assert monitor.thresholds(drop, baseline(test_accuracy=None)).min_accuracy is None
    assert monitor.thresholds({**drop, "min_live_accuracy": 0.6}, baseline()).min_accuracy == 0.6


def test_the_asset_events_extra_says_what_crossed_and_where_the_report_is():
    figures = shifted_figures()
    extra = monitor.event_extra(figures, "s3://b/monitoring/ep/x/report.html")
    assert extra["drifted"] == ["counts", "confidence"] and extra["accuracy_below_threshold"]
    assert extra["drift"]["counts"]["status"] == monitor.DRIFT and "photo pixels" in extra["drift"]
    assert "confusion_matrix" not in extra["live"] and extra["report"].endswith("report.html")
    json.dumps(extra)  # an event's extra is JSON
