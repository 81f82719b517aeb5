"""The capture and verdict readers on moto's S3 and CloudWatch Logs, on records built as SageMaker's
and Lambda's documentation shows them."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta

import boto3
import botocore.session
import pytest
from botocore.validate import ParamValidator

from bin_counter import capture
from standin import constraints
from tests.conftest import make_bin_image

# The AWS developer guide's own sample line (model-monitor-data-capture-endpoint, "View Captured Data").
DOC_LINE = (
    '{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT",'
    '"data":"69,0,153.7,109,194.0\\n","encoding":"CSV"},"endpointOutput":{"observedContentType":'
    '"text/csv; charset=utf-8","mode":"OUTPUT","data":"0.0254181120544672","encoding":"CSV"}},'
    '"eventMetadata":{"eventId":"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee","inferenceTime":"2022-02-14T17:25:49Z"},'
    '"eventVersion":"0"}'
)
T0 = datetime(2026, 12, 3, 9, 58, 0, tzinfo=UTC)


def answer(count: int, version: str = "v7") -> dict:
    probabilities = [0.1] * 6
    probabilities[count] = 0.5
    return {"count": count, "probabilities": probabilities, "confidence": 0.5, "expected_count": float(count)}


def line(inference_id: str | None, moment: datetime, request: tuple[str, str, str], response: dict) -> str:
    """A capture line as SageMaker writes it: (content type, encoding, data) in, JSON out."""
    meta = {"eventId": f"event-{inference_id}", "inferenceTime": moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}
    if inference_id is not None:
        meta["inferenceId"] = inference_id
    content_type, encoding, data = request
    return json.dumps(
        {
            "captureData": {
                "endpointInput": {
                    "observedContentType": content_type,
                    "mode": "INPUT",
                    "data": data,
                    "encoding": encoding,
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "data": json.dumps(response),
                    "encoding": "JSON",
                },
            },
            "eventMetadata": meta,
            "eventVersion": "0",
        }
    )


def test_the_config_is_a_valid_create_endpoint_config_part_and_zero_turns_it_off():
    shape = botocore.session.get_session().get_service_model("sagemaker").operation_model("CreateEndpointConfig")
    config = capture.data_capture_config("bin-counter-data", 25)
    params = {
        "EndpointConfigName": "c",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "m", "InstanceType": "ml.m5.large"}],
        "DataCaptureConfig": config,
    }
    report = ParamValidator().validate(params, shape.input_shape)
    assert not report.has_errors(), report.generate_report()
    assert constraints.report(params, shape.input_shape) is None
    assert config["DestinationS3Uri"] == "s3://bin-counter-data/captures"
    assert config["EnableCapture"] and config["InitialSamplingPercentage"] == 25
    assert {o["CaptureMode"] for o in config["CaptureOptions"]} == {"Input", "Output"}
    assert capture.data_capture_config("b", 0)["EnableCapture"] is False
    with pytest.raises(ValueError, match="0 to 100"):
        capture.data_capture_config("b", 101)


def test_the_documentations_sample_line_parses():
    found = capture.parse_capture_line(DOC_LINE, "ep", "AllTraffic")
    assert found.event_id == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee" and found.inference_id is None
    assert found.time == datetime(2022, 2, 14, 17, 25, 49, tzinfo=UTC)
    assert found.content_type == "text/csv" and found.images == [b"69,0,153.7,109,194.0\n"]


def test_photos_and_answers_come_back_from_an_image_body_and_a_json_list(s3, bucket):
    one, two, three = (make_bin_image(n, n) for n in (1, 2, 3))
    single = line(
        "req-1", T0, ("image/jpeg", "BASE64", base64.b64encode(one).decode()), {**answer(1), "model_version": "v7"}
    )
    listed = json.dumps({"images": [base64.b64encode(two).decode(), base64.b64encode(three).decode()]})
    several = line(
        "req-2",
        T0 + timedelta(minutes=3),  # the next hour: its own folder
        ("application/json", "JSON", listed),
        {"predictions": [answer(2), answer(3)], "model_version": "v7"},
    )
    s3.put_object(Bucket=bucket, Key="captures/ep/AllTraffic/2026/12/03/09/58-00-000-a.jsonl", Body=single + "\n")
    s3.put_object(Bucket=bucket, Key="captures/ep/AllTraffic/2026/12/03/10/01-00-000-b.jsonl", Body=several + "\n")
    s3.put_object(Bucket=bucket, Key="captures/ep/AllTraffic/2026/12/03/12/00-00-000-c.jsonl", Body=several)
    s3.put_object(Bucket=bucket, Key="captures/other-ep/AllTraffic/2026/12/03/09/58-00-000-d.jsonl", Body=single)

    keys = capture.capture_keys(s3, bucket, "ep", T0, T0 + timedelta(hours=1))
    assert keys == [
        "captures/ep/AllTraffic/2026/12/03/09/58-00-000-a.jsonl",
        "captures/ep/AllTraffic/2026/12/03/10/01-00-000-b.jsonl",
    ]
    found = list(capture.read_captures(s3, bucket, keys, T0, T0 + timedelta(hours=1)))
    assert [c.inference_id for c in found] == ["req-1", "req-2"]
    assert found[0].images == [one] and found[1].images == [two, three]
    assert [p["count"] for p in found[0].predictions] == [1] and "model_version" not in found[0].predictions[0]
    assert [p["count"] for p in found[1].predictions] == [2, 3]
    assert (found[1].endpoint, found[1].variant, found[1].model_version) == ("ep", "AllTraffic", "v7")
    # The window is on inferenceTime, not only on the folders.
    later = list(capture.read_captures(s3, bucket, keys, T0 + timedelta(minutes=1), T0 + timedelta(hours=1)))
    assert [c.inference_id for c in later] == ["req-2"]


def test_a_torn_line_is_skipped_with_its_place_and_the_rest_are_read(s3, bucket, caplog):
    good = line(None, T0, ("image/png", "BASE64", base64.b64encode(b"png").decode()), {"error": "x", "message": "m"})
    key = "captures/ep/AllTraffic/2026/12/03/09/58-00-000-a.jsonl"
    s3.put_object(Bucket=bucket, Key=key, Body="\n".join([good, good[:40], '{"captureData": 1}', good]))
    with caplog.at_level(logging.WARNING):
        found = list(capture.read_captures(s3, bucket, [key], T0, T0 + timedelta(hours=1)))
    assert len(found) == 2 and found[0].predictions == [] and found[0].event_id == "event-None"
    assert "line 2 skipped" in caplog.text and "line 3 skipped" in caplog.text


def test_verdicts_are_read_from_the_functions_log_group_across_pages(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    logs = boto3.client("logs", endpoint_url=moto_endpoint, region_name="us-east-1")
    assert capture.read_verdicts(logs, "no-such-function", T0, T0 + timedelta(hours=1)) == {}
    group = "/aws/lambda/bin-counter-api-verdicts"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="2026/12/03/[$LATEST]abc")
    start_ms = int(T0.timestamp() * 1000)
    events = [{"timestamp": start_ms - 1000, "message": json.dumps({"event": "answer", "request_id": "early"})}]
    events += [{"timestamp": start_ms + i, "message": "START RequestId: r Version: $LATEST"} for i in range(3)]
    for i in range(10_050):  # past one FilterLogEvents page (10,000 events)
        body = {"event": "answer", "request_id": f"r{i}", "status": 200, "images": 1, "model_version": "v7"}
        body["answers"] = [{"count": 2, "confidence": 0.9, "expected": 2 if i % 2 else None, "verdict": None}]
        events.append({"timestamp": start_ms + 10 + i, "message": json.dumps(body)})
    for chunk in range(0, len(events), 5000):
        logs.put_log_events(
            logGroupName=group, logStreamName="2026/12/03/[$LATEST]abc", logEvents=events[chunk : chunk + 5000]
        )
    verdicts = capture.read_verdicts(logs, "bin-counter-api-verdicts", T0, T0 + timedelta(hours=1))
    assert len(verdicts) == 10_050 and "early" not in verdicts
    assert verdicts["r1"].answers[0]["expected"] == 2 and verdicts["r1"].model_version == "v7"
    assert verdicts["r1"].status == 200 and verdicts["r1"].time == T0 + timedelta(milliseconds=11)
