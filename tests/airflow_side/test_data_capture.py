"""Data capture end to end: bin_count_deploy deploys with capture_percent, photos with expected counts go
through the local API (gateway, the Lambda function, the endpoint), the stand-in writes SageMaker's
capture files to S3, the function's log lines reach CloudWatch Logs, and bin_counter.capture reads both
back with the Airflow worker's rights and joins them by request id. Then capture_percent 0 writes nothing."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from bin_counter import capture
from tests.airflow_side.conftest import API_KEY, ENDPOINT, FUNCTION, QUICK_DEPLOY, upload_dataset
from tests.airflow_side.test_deploy_dag import PUBLISHED_ARCHIVE, clients, register
from tests.conftest import make_bin_image

pytestmark = pytest.mark.skipif(not PUBLISHED_ARCHIVE.is_file(), reason="needs models/bin-counter.tar.gz")
# SageMaker's layout: <destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/<mm>-<ss>-<mmm>-<uuid>.jsonl
KEY = re.compile(
    rf"captures/{ENDPOINT}/AllTraffic/\d{{4}}/\d{{2}}/\d{{2}}/\d{{2}}/\d{{2}}-\d{{2}}-\d{{3}}-[0-9a-f-]{{36}}\.jsonl"
)


def post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type, "x-api-key": API_KEY}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{error.code}: {error.read()[:300]!r}") from error


def wait_for(read, wanted: set[str], timeout: float = 30.0) -> dict:
    """`read()` (id -> record) until it holds every id in `wanted`."""
    deadline = time.time() + timeout
    while True:
        found = read()
        if wanted <= set(found) or time.time() > deadline:
            return found
        time.sleep(1)


def test_captured_photos_and_the_apis_verdicts_join_by_request_id(
    deploy_dag, s3, bucket, local_stack_connection, moto_endpoint, permitted_calls_only, worker_client, capfd
):
    stack = local_stack_connection
    sm, _ = clients(stack)
    upload_dataset(s3, bucket, "v-test", {"train": 1, "validation": 1, "test": 1})
    version = register(sm, s3, bucket, "capture-model")
    conf = {**QUICK_DEPLOY, "bucket": bucket, "model_package": str(version["version"]), "capture_percent": 100}
    run = deploy_dag.test(run_conf=conf)
    log = capfd.readouterr().out
    assert run.state == "success", log[-3000:]
    config = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    )
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == f"s3://{bucket}/captures"

    start = datetime.now(UTC) - timedelta(seconds=1)
    url = f"{stack['endpoint']}/count"
    sent: dict[str, tuple[list[bytes], list[int]]] = {}  # request id -> (photos, expected counts)
    for count in (0, 1, 2):
        photo = make_bin_image(count, 40 + count)
        answer = post(f"{url}?expected={count}", photo, "image/jpeg")
        sent[answer["request_id"]] = ([photo], [count])
    pair = [make_bin_image(1, 50), make_bin_image(2, 51)]
    body = json.dumps({"images": [base64.b64encode(p).decode() for p in pair], "expected": [1, 2]}).encode()
    answer = post(url, body, "application/json")
    sent[answer["request_id"]] = (pair, [1, 2])
    end = datetime.now(UTC) + timedelta(minutes=1)

    reader_s3, logs = worker_client("s3", moto_endpoint), worker_client("logs", moto_endpoint)

    def captured() -> dict:
        keys = capture.capture_keys(reader_s3, bucket, ENDPOINT, start, end)
        return {c.inference_id: c for c in capture.read_captures(reader_s3, bucket, keys, start, end)}

    found = wait_for(captured, set(sent))
    assert set(sent) <= set(found), f"captured {sorted(found)}, sent {sorted(sent)}"
    keys = capture.capture_keys(reader_s3, bucket, ENDPOINT, start, end)
    assert keys and all(KEY.fullmatch(k) for k in keys), keys
    verdicts = wait_for(lambda: capture.read_verdicts(logs, FUNCTION, start, end), set(sent))
    for request_id, (photos, expected) in sent.items():
        record = found[request_id]
        assert record.images == photos  # the exact bytes the client sent
        assert record.model_version == "capture-model" and record.variant == "AllTraffic"
        assert len(record.predictions) == len(photos)
        verdict = verdicts[request_id]
        assert [a["expected"] for a in verdict.answers] == expected
        assert [a["count"] for a in verdict.answers] == [p["count"] for p in record.predictions]
        assert all(a["verdict"] in ("match", "mismatch", "uncertain") for a in verdict.answers)
        assert verdict.status == 200 and verdict.model_version == "capture-model"

    # Capture off: the next deployment's configuration has none, and nothing more is written.
    run = deploy_dag.test(run_conf={**conf, "capture_percent": 0})
    log = capfd.readouterr().out
    assert run.state == "success", log[-3000:]
    served = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    )
    assert "DataCaptureConfig" not in served
    after = datetime.now(UTC)
    quiet = post(f"{url}?expected=1", make_bin_image(1, 60), "image/jpeg")["request_id"]
    assert wait_for(lambda: capture.read_verdicts(logs, FUNCTION, after, end), {quiet})  # the function answered
    time.sleep(3)  # longer than the capture writer's interval
    later = capture.capture_keys(reader_s3, bucket, ENDPOINT, after, end)
    assert quiet not in {c.inference_id for c in capture.read_captures(reader_s3, bucket, later, after, end)}
