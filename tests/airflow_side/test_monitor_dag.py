"""bin_count_monitor end to end on the local stack: one deployment with capture on, photos with
expected counts sent through the local API (gateway, Lambda function, endpoint), the monitor run with
dag.test() over the window. Then photos unlike the test set's: the drift alarm's alert arrives in the
alerts topic and the bin_count_drift asset event is emitted."""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from bin_counter import capture, monitor_metrics, monitor_report
from tests.airflow_side.conftest import ENDPOINT, FUNCTION, QUICK_DEPLOY, dag_without_retries, upload_dataset
from tests.airflow_side.machines import assert_ran_apart
from tests.airflow_side.test_data_capture import post
from tests.airflow_side.test_deploy_dag import PUBLISHED_ARCHIVE, clients, register, task_states
from tests.conftest import make_bin_image

pytestmark = pytest.mark.skipif(not PUBLISHED_ARCHIVE.is_file(), reason="needs models/bin-counter.tar.gz")
# Few requests, so the test stays quick; the production defaults ask for more (docs/dags/README.md).
# PSI's threshold is out of reach here: the published model's test set is ABID photos and these are
# generated ones, so its count distribution differs from the first request on; the drift this test
# drives is the photos' own (test_monitor.py covers PSI's verdicts).
SMALL = {"min_requests": 12, "min_labelled": 12, "psi_threshold": 100.0, "settle_minutes": 0}


@pytest.fixture
def monitor_dag(airflow_db, monkeypatch, pipeline_stack, moto_endpoint):
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER", pipeline_stack.outputs["SageMakerVariable"])
    yield dag_without_retries("bin_count_monitor")
    # The monitor's alarms notify the alerts topic: gone with the test, so that the next tests' alarm
    # loops (every stand-in evaluates every alarm of this moto) send nothing into their queue.
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    cloudwatch.delete_alarms(AlarmNames=list(monitor_metrics.alarm_names(ENDPOINT).values()))


def send(url: str, photos: list[tuple[bytes, int]]) -> list[tuple[int, int]]:
    """Each photo with its expected count through POST /count; (answered count, expected) pairs."""
    answers = []
    for photo, expected in photos:
        answer = post(f"{url}?expected={expected}", photo, "image/jpeg")
        answers.append((answer["count"], expected))
    return answers


def delivered(s3, moto_endpoint: str, bucket: str, start: datetime, end: datetime, n: int) -> None:
    """Wait until the window's `n` requests are in S3 (the capture writer sends every 2 s) and in the
    function's log group (shipped every second), as an hourly run a while later finds them."""
    logs = boto3.client("logs", endpoint_url=moto_endpoint, region_name="us-east-1")
    deadline = time.time() + 30
    while time.time() < deadline:
        keys = capture.capture_keys(s3, bucket, ENDPOINT, start, end)
        captured = sum(1 for _ in capture.read_captures(s3, bucket, keys, start, end))
        if captured >= n and len(capture.read_verdicts(logs, FUNCTION, start, end)) >= n:
            return
        time.sleep(1)
    raise AssertionError(f"the window's {n} requests were not all captured and logged in 30 s")


def run_monitor(monitor_dag, bucket: str, start: datetime, end: datetime, capfd):
    conf = {**SMALL, "bucket": bucket, "window_start": start.isoformat(), "window_end": end.isoformat()}
    run = monitor_dag.test(run_conf=conf)
    log = capfd.readouterr().out
    assert run.state == "success", log[-4000:]
    return run, log


def wait_for_alert(alerts, alarm: str, state: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        for message in alerts():
            body = json.loads(message["Message"])
            seen.append((body.get("AlarmName"), body.get("NewStateValue")))
            if body.get("AlarmName") == alarm and body.get("NewStateValue") == state:
                return body
    raise AssertionError(f"no {state} alert for {alarm} in {timeout} s; seen {seen}")


def link_of(run, task_id: str) -> str:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id, key="_link_MonitorReportLink")
        ).first()
        return row.value


def drift_events() -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        return [e.extra for e in session.query(AssetEvent).filter(AssetEvent.source_dag_id == "bin_count_monitor")]


def test_the_monitor_reports_the_live_accuracy_the_answers_imply_and_raises_drift_on_other_photos(
    deploy_dag,
    monitor_dag,
    s3,
    bucket,
    local_stack_connection,
    moto_endpoint,
    alerts,
    permitted_calls_only,
    capfd,
    separate_machines,
):
    stack = local_stack_connection
    sm, _ = clients(stack)
    upload_dataset(s3, bucket, "v-test", {"train": 1, "validation": 1, "test": 5})  # 15 test photos
    version = register(sm, s3, bucket, "monitor-model")
    conf = {**QUICK_DEPLOY, "bucket": bucket, "model_package": str(version["version"]), "capture_percent": 100}
    run = deploy_dag.test(run_conf=conf)
    assert run.state == "success", capfd.readouterr().out[-3000:]
    capfd.readouterr()
    runs = [run]
    url = f"{stack['endpoint']}/count"

    # Photos like the test set's, with their true counts as the expected ones. (The window starts now:
    # the deployment's smoke check sent requests of its own a moment ago.)
    start = datetime.now(UTC)
    answers = send(url, [(make_bin_image(i % 3, 500 + i), i % 3) for i in range(15)])
    end = datetime.now(UTC) + timedelta(seconds=1)
    delivered(s3, moto_endpoint, bucket, start, end, 15)
    run, log = run_monitor(monitor_dag, bucket, start, end, capfd)
    runs.append(run)
    prefix = monitor_report.report_prefix(ENDPOINT, start)
    figures = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/figures.json")["Body"].read())
    ours = sum(1 for count, expected in answers if count == expected) / len(answers)
    assert figures["labelled"] == 15 and figures["joined"]["joined"] == 15, figures["joined"]
    assert figures["live"]["accuracy"] == pytest.approx(ours, abs=1e-4), log[-3000:]
    assert not figures["drift_detected"], figures["drift"]
    assert task_states(run)["announce"] == "skipped"
    # The task's link opens the report (a presigned URL: no credentials needed).
    with urllib.request.urlopen(link_of(run, "report")) as response:
        assert "live accuracy" in response.read().decode()
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    stats = cloudwatch.get_metric_statistics(
        Namespace=monitor_metrics.NAMESPACE,
        MetricName="LiveAccuracy",
        Dimensions=[{"Name": "EndpointName", "Value": ENDPOINT}],
        StartTime=start - timedelta(hours=1),
        EndTime=end + timedelta(hours=1),
        Period=60,
        Statistics=["Minimum"],
    )
    assert [p["Minimum"] for p in stats["Datapoints"]] == [pytest.approx(ours, abs=1e-4)]
    alerts()  # the drift alarm's first evaluation (OK), if it came

    # Bigger, brighter photos than any of the test set's: the photo statistics drift.
    start = datetime.now(UTC)
    send(url, [(make_bin_image(i % 3, 900 + i, size=(160, 120)), i % 3) for i in range(15)])
    end = datetime.now(UTC) + timedelta(seconds=1)
    delivered(s3, moto_endpoint, bucket, start, end, 15)
    run, log = run_monitor(monitor_dag, bucket, start, end, capfd)
    runs.append(run)
    assert task_states(run)["announce"] == "success", log[-3000:]
    [event] = drift_events()
    assert "photo pixels" in event["drifted"] and event["report"].startswith(f"s3://{bucket}/monitoring/")
    alert = wait_for_alert(alerts, monitor_metrics.alarm_names(ENDPOINT)["drift"], "ALARM")
    assert "docs/dags/README.md" in alert["AlarmDescription"]
    # Each task ran on a machine of its own (as on the CeleryExecutor): the report and its plots were
    # made and uploaded in one task; the figures went on in XCom.
    assert_ran_apart(separate_machines, *runs)
