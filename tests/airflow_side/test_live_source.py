"""Captured photos with a confirmed count as a data-prep source (bin_counter.live): the join, the
split in their own blocks, the dataset record, and the gate's view of the live test photos; end to
end, a dataset built with them trains and is gated on them."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from bin_counter import gate, live, registry, split
from bin_counter.abid import Record, S3Store
from bin_counter.capture import CapturedRequest, Verdict
from tests.conftest import make_bin_image

HOUR = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def captured(inference_id: str | None, images: list[bytes], moment: datetime = HOUR) -> CapturedRequest:
    return CapturedRequest(
        event_id=f"event-{inference_id}",
        inference_id=inference_id,
        time=moment,
        endpoint="bin-counter",
        variant="AllTraffic",
        content_type="image/jpeg",
        images=images,
        predictions=[{"count": 1, "confidence": 0.6} for _ in images],
        model_version="m1",
    )


def verdict(request_id: str, *expected: int | None) -> Verdict:
    answers = [{"count": 1, "confidence": 0.6, "expected": e, "verdict": None} for e in expected]
    return Verdict(request_id=request_id, time=HOUR, model_version="m1", answers=answers, status=200)


def test_confirmed_photos_take_the_reviewers_count_then_the_clients_and_skip_the_rest():
    photos = [make_bin_image(c, seed) for seed, c in enumerate((1, 2, 3, 4))]
    captures = [
        captured("req-a", [photos[0], photos[1]]),  # image 0: the client's 1; image 1: a reviewer's 5
        captured("req-b", [photos[2]]),  # no expected count, no review: not used
        captured("req-c", [photos[3][:200]]),  # truncated: skipped and counted
        captured("req-a", [photos[0], photos[1]]),  # the same request again (a retried capture)
        captured("req-d", [photos[0]]),  # the same bytes from another request
        captured(None, [photos[2]]),  # no inference id: nothing joins it to a count
    ]
    verdicts = {"req-a": verdict("req-a", 1, 2), "req-c": verdict("req-c", 4), "req-d": verdict("req-d", 1)}
    report = live.LiveReport()
    found = live.confirmed_photos(captures, verdicts, {("req-a", 1): 5}, report)
    assert [(p.key, p.count, p.metadata["confirmed_by"]) for p in found] == [
        ("live-2026120109-req-a-0", 1, "client"),
        ("live-2026120109-req-a-1", 5, "reviewer"),
    ]
    assert found[0].metadata["EXPECTED_QUANTITY"] == 1 and found[0].metadata["source"] == "live"
    assert (report.confirmed_by_client, report.confirmed_by_reviewer, report.unconfirmed) == (1, 1, 2)
    assert report.duplicates == 3 and list(report.invalid) == ["live-2026120109-req-c-0"]
    assert report.captured_photos == 8


def test_review_files_are_read_and_bad_rows_reported_not_fatal(s3, bucket):
    s3.put_object(
        Bucket=bucket,
        Key="reviews/2026-12-01-alice.csv",
        Body=b"inference_id,count,image\nreq-a,3,\nreq-b,2,1\nreq-c,many,0\n",
    )
    s3.put_object(Bucket=bucket, Key="reviews/notes.txt", Body=b"not a review")
    counts, bad = live.read_reviews(s3, bucket)
    assert counts == {("req-a", 0): 3, ("req-b", 1): 2}
    assert len(bad) == 1 and "2026-12-01-alice.csv, line 4" in bad[0]


def test_written_photos_are_written_once(s3, bucket):
    report = live.LiveReport()
    photos = live.confirmed_photos(
        [captured("req-a", [make_bin_image(2, 0)])], {"req-a": verdict("req-a", 2)}, {}, report
    )
    store = S3Store(bucket, "abid/raw", s3)
    assert live.write_photos(store, photos) == {"written": 1, "skipped": 0}
    assert live.write_photos(store, photos) == {"written": 0, "skipped": 1}
    meta = json.loads(store.read("metadata/live-2026120109-req-a-0.json"))
    assert meta["EXPECTED_QUANTITY"] == 2 and meta["inference_id"] == "req-a"


def test_live_photos_split_in_their_own_hour_blocks_with_each_splits_share():
    abid = [Record(f"{i:05d}", i % 4) for i in range(1000, 1400)]
    hours = [HOUR + timedelta(hours=h) for h in range(20)]
    photos = [Record(live.live_key(moment, f"r{h}x{i}", 0), i % 3) for h, moment in enumerate(hours) for i in range(3)]
    assignment = split.assign_splits(abid + photos, block_size=50, seed=0)
    by_block: dict[str, set] = {}
    for record in photos:
        by_block.setdefault(split.block_of(record.key, 50), set()).add(assignment[record.key])
    assert len(by_block) == 20 and all(len(splits) == 1 for splits in by_block.values())  # an hour stays together
    assert all(b.startswith("live:") for b in by_block)
    table = split.summarize_sources(abid + photos, assignment)
    assert sum(table["live"].values()) == 60 and sum(table["abid"].values()) == 400
    assert table["live"]["test"] > 0 and table["live"]["train"] > table["live"]["test"]  # live photos in every split
    # ABID's assignment is the one it was without live photos.
    assert {k: v for k, v in assignment.items() if not live.is_live(k)} == split.assign_splits(abid, block_size=50)


@pytest.mark.parametrize(
    ("live_n", "new_live", "expected_ok", "words"),
    [
        (40, 0.50, False, "worse by 0.2000"),  # enough live photos, clearly worse on them: held back
        (40, 0.68, True, "not worse beyond the margin on the live photos"),
        (5, 0.10, True, "fewer than 30: shown, not deciding"),
    ],
)
def test_the_gate_holds_back_a_model_worse_on_enough_live_photos(live_n, new_live, expected_ok, words):
    metrics = {
        "test:accuracy": 0.80,
        "champion:accuracy": 0.75,
        "test:live_accuracy": new_live,
        "champion:live_accuracy": 0.70,
        "test:live_n": live_n,
        "champion:live_n": live_n,
    }
    ok, reason = gate.deployment_decision(metrics, True, "accuracy", 0.05)
    assert ok is expected_ok and words in reason
    assert gate.deployment_decision({"test:accuracy": 0.8, "champion:accuracy": 0.7}, True, "accuracy", 0.0)[0]


def test_the_review_page_shows_the_live_photos_scores():
    scores = {"accuracy": 0.8, "rmse": 0.5, "mae": 0.2, "within_1": 1.0, "n": 50, "model_version": "new"}
    card = {
        "test": {**scores, "live": {**scores, "n": 12, "accuracy": 0.75}},
        "champion": {**scores, "model_version": "old", "live": {**scores, "n": 12, "accuracy": 0.5}},
    }
    report = registry.evaluation_report(card, {"deploy": "new", "reason": "fine"}, "job", "v-1")
    assert report["comparison"]["candidate"]["live"]["n"] == 12
    assert report["comparison"]["serving"]["live"]["accuracy"] == 0.5
    page = registry.review_markdown(report)
    assert "On the 12 live photos" in page and "| accuracy (exact count) | 0.750 | 0.500 |" in page


# -- end to end ------------------------------------------------------------------------------------
def put_captures(s3, bucket: str, endpoint: str, requests: list[tuple[str, datetime, bytes, int]]) -> None:
    """Capture files as the stand-in's endpoint writes them (standin.sagemaker.capture), one per request."""
    from bin_counter.capture import capture_destination, data_capture_config
    from standin.sagemaker.capture import capture_key, capture_line

    config = data_capture_config(bucket, 100)
    for request_id, moment, photo, predicted in requests:
        answer = json.dumps({"count": predicted, "confidence": 0.5, "model_version": "m0"}).encode()
        body = capture_line(config, (photo, "image/jpeg"), (answer, "application/json"), request_id, moment)
        target, key = capture_key(capture_destination(bucket), endpoint, "AllTraffic", moment)
        s3.put_object(Bucket=target, Key=key, Body=body.encode() + b"\n")


def put_verdicts(logs, function: str, lines: list[tuple[str, datetime, int]]) -> None:
    """The API function's per-request lines in its log group, as Lambda ships them."""
    group = f"/aws/lambda/{function}"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="2026/12/01/[$LATEST]live")
    events = [
        {
            "timestamp": int(moment.timestamp() * 1000),
            "message": json.dumps(
                {
                    "event": "answer",
                    "request_id": request_id,
                    "status": 200,
                    "images": 1,
                    "model_version": "m0",
                    "latency_ms": 20,
                    "answers": [{"count": 1, "confidence": 0.5, "expected": expected, "verdict": "checked"}],
                }
            ),
        }
        for request_id, moment, expected in sorted(lines, key=lambda x: x[1])
    ]
    logs.put_log_events(logGroupName=group, logStreamName="2026/12/01/[$LATEST]live", logEvents=events)


@pytest.fixture
def data_prep(airflow_db):
    from tests.airflow_side.conftest import dag_without_retries

    return dag_without_retries("bin_count_data_prep")


def test_a_dataset_built_with_captured_photos_trains_and_is_gated_on_them(
    data_prep, s3, bucket, job_inputs, local_stack_connection, moto_endpoint, tmp_path, capfd
):
    from bin_counter.dataset import latest_version, read_record, resolve_dataset
    from tests.airflow_side.conftest import ENDPOINT, FUNCTION, job_config, sagemaker_client, wait_training_job
    from tests.conftest import write_abid_dir

    source = write_abid_dir(tmp_path / "abid", {f"{i:05d}": i % 3 for i in range(1000, 1060)})
    # Ten hours of requests, two an hour, with the count the client expected; one more without (a
    # reviewer's CSV confirms it), one without either, one truncated photo. No empty bins: the
    # generated photos of one are alike to the byte, and the same photo twice is taken once.
    now = datetime.now(UTC).replace(minute=30)
    requests = [(f"req-{h}-{i}", now - timedelta(hours=h + 1), 1 + (h + i) % 2) for h in range(10) for i in range(2)]
    photos = {rid: make_bin_image(count, 500 + n) for n, (rid, _, count) in enumerate(requests)}
    extra = [("reviewed", now - timedelta(hours=2), 2), ("unconfirmed", now - timedelta(hours=3), 1)]
    photos |= {rid: make_bin_image(count, 700 + n) for n, (rid, _, count) in enumerate(extra)}
    photos["truncated"] = make_bin_image(1, 800)[:300]
    when = {rid: moment for rid, moment, _ in [*requests, *extra]} | {"truncated": now - timedelta(hours=4)}
    put_captures(s3, bucket, ENDPOINT, [(rid, when[rid], photos[rid], 1) for rid in photos])
    logs = boto3.client("logs", endpoint_url=moto_endpoint, region_name="us-east-1")
    put_verdicts(
        logs,
        FUNCTION,
        [(rid, moment, count) for rid, moment, count in requests] + [("truncated", when["truncated"], 1)],
    )
    s3.put_object(Bucket=bucket, Key="reviews/first.csv", Body=b"inference_id,count\nreviewed,2\n")

    conf = {
        "bucket": bucket,
        "source": str(source),
        "subset": "key_range",
        "key_range": "01000:01060",
        "block_size": 10,
        "live_source": True,
        "live_lookback_hours": 24,
        "endpoint_name": ENDPOINT,
        "function_name": FUNCTION,
    }
    run = data_prep.test(run_conf=conf)
    assert run.state == "success", capfd.readouterr().out[-3000:]
    version = latest_version(s3, bucket)
    record = read_record(s3, bucket, version)
    assert sum(record["sources"]["abid"].values()) == 60
    assert sum(record["sources"]["live"].values()) == 21 and record["sources"]["live"]["test"] > 0
    assert record["live"]["enabled"] is True
    assert (record["live"]["confirmed_by_client"], record["live"]["confirmed_by_reviewer"]) == (20, 1)
    assert (record["live"]["unconfirmed"], record["live"]["invalid"]) == (1, 1)
    rows = list(
        csv.DictReader(
            io.StringIO(s3.get_object(Bucket=bucket, Key=f"datasets/{version}/manifest.csv")["Body"].read().decode())
        )
    )
    live_rows = [r for r in rows if live.is_live(r["key"])]
    assert len(live_rows) == 21 and all(r["block"].startswith("live:") for r in live_rows)
    split_of_block: dict[str, set] = {}
    for row in rows:
        split_of_block.setdefault(row["block"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of_block.values())  # no block on two sides
    assert not [r for r in rows if not live.is_live(r["key"]) and r["block"].startswith("live:")]

    # One training job on the dataset, scoring the new model and the published one on its test set.
    champion = gate.initial_champion(s3, bucket, "published")
    data = resolve_dataset(s3, bucket, version, None)
    sm = sagemaker_client(local_stack_connection)
    job = "live-photos-final"
    sm.create_training_job(
        **job_config(bucket, job, channels={**data["channels"], "champion": champion["model_data_url"]})
    )
    described = wait_training_job(sm, job)
    assert described["TrainingJobStatus"] == "Completed", described.get("FailureReason")
    metrics = gate.final_metrics(described)
    live_test = sum(1 for r in live_rows if r["split"] == "test")
    assert metrics["test:live_n"] == metrics["champion:live_n"] == live_test
    assert {"test:live_accuracy", "test:live_rmse", "champion:live_accuracy", "champion:live_rmse"} <= set(metrics)
    artifact = described["ModelArtifacts"]["S3ModelArtifacts"].removeprefix("s3://").split("/", 1)
    card = registry.model_card(s3.get_object(Bucket=artifact[0], Key=artifact[1])["Body"].read())
    assert card["metrics"]["test"]["live"]["accuracy"] == metrics["test:live_accuracy"]
    assert card["metrics"]["champion"]["live"]["n"] == live_test

    # The gate weighs them (here from one live photo on); the review page shows them.
    choice = gate.choose_deployment(metrics, champion, job, "accuracy", 1.0, live_min_photos=1)
    assert f"live test accuracy on {live_test} photos" in choice["reason"]
    report = registry.evaluation_report(card["metrics"], choice, job, version)
    assert f"On the {live_test} live photos" in registry.review_markdown(report)
