"""The stand-in's data capture writer and its Lambda log shipper on their own: SageMaker's line and key
layout, read back by bin_counter.capture, and an unreachable S3 that neither fails nor slows a request
and loses nothing once S3 is back."""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.config import Config

from bin_counter import capture as reader
from standin.awslambda.logs import FunctionLogs, batches, stream_name
from standin.sagemaker.capture import CaptureWriter, capture_key, capture_line, check_config
from standin.sagemaker.exceptions import ValidationException
from tests.conftest import make_bin_image

WHEN = datetime(2026, 12, 3, 23, 59, 59, 999_000, tzinfo=UTC)


def unreachable(_role: str):
    quick = Config(connect_timeout=0.5, read_timeout=0.5, retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1", config=quick)


def test_a_line_is_sagemakers_and_bin_counters_reader_reads_it_back():
    config = reader.data_capture_config("b", 100)
    photo = make_bin_image(2, 1)
    answer = json.dumps({"count": 2, "probabilities": [0.1, 0.2, 0.7], "confidence": 0.7, "model_version": "m"})
    line = capture_line(config, (photo, "image/jpeg"), (answer.encode(), "application/json"), "req-9", WHEN)
    record = json.loads(line)
    assert record["eventVersion"] == "0"
    assert record["eventMetadata"]["inferenceId"] == "req-9"
    assert record["eventMetadata"]["inferenceTime"] == "2026-12-03T23:59:59.999Z"
    request, output = record["captureData"]["endpointInput"], record["captureData"]["endpointOutput"]
    assert (request["mode"], request["encoding"], request["observedContentType"]) == ("INPUT", "BASE64", "image/jpeg")
    assert base64.b64decode(request["data"]) == photo
    assert (output["mode"], output["encoding"], output["data"]) == ("OUTPUT", "JSON", answer)
    parsed = reader.parse_capture_line(line, "ep", "AllTraffic")
    assert parsed.images == [photo] and parsed.predictions[0]["count"] == 2 and parsed.inference_id == "req-9"
    # Without CaptureContentTypeHeader everything is BASE64; with Input only there is no output.
    bare = json.loads(
        capture_line(
            {"CaptureOptions": [{"CaptureMode": "Input"}]}, (b"{}", "application/json"), (b"", None), None, WHEN
        )
    )
    assert bare["captureData"]["endpointInput"]["encoding"] == "BASE64" and "endpointOutput" not in bare["captureData"]
    assert "inferenceId" not in bare["eventMetadata"]


def test_the_key_is_the_invocations_hour_in_utc_under_the_destination():
    bucket, key = capture_key("s3://data/captures", "ep", "AllTraffic", WHEN)
    assert bucket == "data"
    assert key.startswith("captures/ep/AllTraffic/2026/12/03/23/59-59-999-") and key.endswith(".jsonl")
    assert capture_key("s3://data", "ep", "v", WHEN)[1].startswith("ep/v/2026/12/03/23/")
    with pytest.raises(ValidationException, match="KmsKeyId"):
        check_config({**reader.data_capture_config("b", 5), "KmsKeyId": "alias/x"})


def test_an_unreachable_s3_neither_fails_nor_slows_a_request_and_loses_nothing(s3, bucket, caplog):
    factory = {"make": unreachable}
    writer = CaptureWriter(lambda role: factory["make"](role), interval=3600)
    config = reader.data_capture_config(bucket, 100)
    answer = (b'{"count": 1}', "application/json")
    started = time.perf_counter()
    for i in range(50):
        writer.record(config, "role", ("ep", "AllTraffic"), (b"photo", "image/jpeg"), answer, f"r{i}", WHEN)
    assert time.perf_counter() - started < 1.0  # appended in memory: no request waits for S3
    with caplog.at_level(logging.WARNING, logger="standin"):
        writer.flush()
    assert "could not send, will retry" in caplog.text
    factory["make"] = lambda _role: s3  # S3 is back
    writer.flush()
    writer.stop()
    keys = reader.capture_keys(s3, bucket, "ep", WHEN - timedelta(hours=1), WHEN + timedelta(hours=1))
    found = list(reader.read_captures(s3, bucket, keys, WHEN - timedelta(hours=1), WHEN + timedelta(hours=1)))
    assert sorted(c.inference_id for c in found) == sorted(f"r{i}" for i in range(50))


def test_sampling_draws_per_request_and_zero_or_disabled_captures_nothing():
    draws = iter([0.05, 0.5, 0.95])
    writer = CaptureWriter(unreachable, interval=3600, draw=lambda: next(draws))
    config = reader.data_capture_config("b", 50)
    assert [writer.sampled(config) for _ in range(3)] == [True, False, False]
    assert not writer.sampled(reader.data_capture_config("b", 0))
    assert not writer.sampled({**config, "EnableCapture": False})
    writer.stop()


def test_function_output_is_cut_into_put_log_events_requests_within_its_limits(moto_endpoint, monkeypatch):
    events = [{"timestamp": i, "message": "x" * 1000} for i in range(2000, 0, -1)]
    cut = batches(events)
    assert sum(len(b) for b in cut) == 2000 and len(cut) == 2
    assert all(sum(len(e["message"]) + 26 for e in b) <= 1_048_576 for b in cut)
    assert cut[0][0]["timestamp"] == 1  # in time order
    assert stream_name(now=WHEN).startswith("2026/12/03/[$LATEST]")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("logs", endpoint_url=moto_endpoint, region_name="us-east-1")
    shipper = FunctionLogs(lambda _role: client, interval=3600)
    line = json.dumps({"event": "answer", "request_id": "abc", "status": 200, "answers": []})
    now_ms = int(time.time() * 1000)
    shipper.add("role", "fn-shipped", "2026/12/03/[$LATEST]0123", line, now_ms)
    shipper.stop()
    found = reader.read_verdicts(
        client, "fn-shipped", datetime.fromtimestamp(now_ms / 1000 - 5, UTC), datetime.now(UTC) + timedelta(seconds=5)
    )
    assert list(found) == ["abc"]
