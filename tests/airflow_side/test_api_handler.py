"""lambda/handler.py run as a Lambda function by the stand-in, in front of a real endpoint serving
a model train.py made: API Gateway proxy events in, status codes and JSON bodies out; then the
same through the local API gateway over HTTP, and the CLI client."""

from __future__ import annotations

import base64
import json

import boto3

from bin_counter import api_client
from bin_counter.retrain import ensure_function
from tests.airflow_side.conftest import API_KEY
from tests.airflow_side.test_standin import client, serving_endpoint
from tests.conftest import make_bin_image, png_claiming_size

ROLE = "arn:aws:iam::000000000000:role/bin-counter-api"


def rest_event(body: bytes | str, content_type: str | None, binary: bool = True, method: str = "POST",
               query: dict | None = None) -> dict:
    """What API Gateway's REST API sends (payload 1.0): binary bodies base64-encoded."""
    if binary:
        body = base64.b64encode(body if isinstance(body, bytes) else body.encode()).decode()
    return {"resource": "/count", "path": "/count", "httpMethod": method,
            "headers": {"Content-Type": content_type} if content_type else {}, "queryStringParameters": query,
            "body": body, "isBase64Encoded": binary}


def http_api_event(body: str, content_type: str) -> dict:
    """HTTP API payload 2.0: lower-case headers, the method under requestContext.http."""
    return {"version": "2.0", "routeKey": "POST /count", "rawPath": "/count", "headers": {"content-type": content_type},
            "requestContext": {"http": {"method": "POST", "path": "/count"}}, "body": body, "isBase64Encoded": False}


def call(aws_lambda, event: dict, function: str = "bin-counter-api") -> tuple[int, dict]:
    answer = json.loads(aws_lambda.invoke(FunctionName=function, Payload=json.dumps(event))["Payload"].read())
    assert "errorMessage" not in answer, answer  # never an unhandled exception
    assert answer["headers"]["Content-Type"] == "application/json"
    return answer["statusCode"], json.loads(answer["body"])


def test_the_api_counts_and_refuses_bad_requests_precisely(local_stack_connection, job_inputs, tmp_path):
    stack = local_stack_connection
    serving_endpoint(client(stack), job_inputs, "api-model", "bin-counter")
    aws_lambda = boto3.client("lambda", endpoint_url=stack["endpoint"], region_name="us-east-1")
    ensure_function(aws_lambda, "bin-counter-api", "bin-counter", ROLE)
    jpeg = make_bin_image(2, 5)

    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"))
    assert status == 200, body
    assert body["model_version"] == "api-model" and 0 <= body["count"] <= 2 and body["request_id"]
    assert abs(sum(body["probabilities"]) - 1) < 1e-3 and 0 < body["confidence"] <= 1

    images = [base64.b64encode(make_bin_image(c, c)).decode() for c in range(3)]
    status, body = call(aws_lambda, rest_event(json.dumps({"images": images, "expected": [0, 1, 2]}),
                                               "application/json", binary=False))
    assert status == 200, body
    assert len(body["predictions"]) == 3
    assert all(p["verdict"] in ("match", "mismatch", "uncertain") and 0 <= p["expected_probability"] <= 1
               for p in body["predictions"])

    status, body = call(aws_lambda, http_api_event(json.dumps({"image": images[0]}), "application/json"))
    assert status == 200 and "count" in body

    bad = {
        "empty body": (rest_event(b"", "image/jpeg"), 400, "empty_body"),
        "text": (rest_event(b"hello, this is not an image", "image/jpeg"), 415, "unsupported_image"),
        "truncated JPEG": (rest_event(jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "truncated_image"),
        "wrong content type": (rest_event(jpeg, "text/plain"), 415, "unsupported_content_type"),
        "malformed base64": (rest_event(json.dumps({"image": "%%%not base64%%%"}), "application/json", binary=False),
                             400, "malformed_base64"),
        "malformed JSON": (rest_event("{not json", "application/json", binary=False), 400, "malformed_json"),
        "too many images": (rest_event(json.dumps({"images": images * 3}), "application/json", binary=False),
                            413, "too_many_images"),
        "GET": (rest_event(jpeg, "image/jpeg", method="GET"), 405, "method_not_allowed"),
        "bad expected": (rest_event(jpeg, "image/jpeg", query={"expected": "three"}), 400, "malformed_expected"),
        # The handler cannot see pixel dimensions without an image library; the model refuses the
        # decompression bomb with 413, and the API passes that status on.
        "huge image": (rest_event(png_claiming_size(50_000, 50_000), "image/png"), 413, "too_many_pixels"),
    }
    for case, (event, expected_status, expected_error) in bad.items():
        status, body = call(aws_lambda, event)
        assert (status, body.get("error")) == (expected_status, expected_error), f"{case}: {body}"
        assert body["message"] and body["request_id"], case

    # An endpoint that does not exist: the API says it is unavailable, not that it crashed.
    ensure_function(aws_lambda, "bin-counter-api-nowhere", "no-such-endpoint", ROLE)
    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"), function="bin-counter-api-nowhere")
    assert (status, body["error"]) == (503, "endpoint_unavailable"), body

    # One structured log line per request, without the image bytes.
    log = (stack["state"] / "lambda" / "bin-counter-api" / "function.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) >= 3 + len(bad)
    assert {"request_id", "status", "latency_ms", "model_version"} <= set(lines[0])
    assert base64.b64encode(jpeg).decode()[:40] not in log

    # The local API gateway: an HTTP request to POST /count, the API key checked, the image passed
    # base64-encoded to the function as API Gateway does, the function's answer as the HTTP answer.
    url = f"{stack['endpoint']}/count"
    photo, other = tmp_path / "bin.jpg", tmp_path / "bin.gif"
    photo.write_bytes(jpeg)
    other.write_bytes(b"GIF89a...")

    def post(image, key):
        return api_client.count(url, image, key, None, timeout=30, attempts=1)

    assert post(photo, None) == (403, {"message": "Forbidden"})
    assert post(photo, "wrong-key") == (403, {"message": "Forbidden"})
    status, body = post(photo, API_KEY)
    assert status == 200 and body["model_version"] == "api-model", body
    status, body = post(other, API_KEY)  # sent as application/octet-stream
    assert (status, body["error"]) == (415, "unsupported_content_type")


def test_the_cli_client_counts_a_folder_through_the_gateway(local_stack_connection, job_inputs, tmp_path, capsys):
    stack = local_stack_connection
    serving_endpoint(client(stack), job_inputs, "cli-model", "bin-counter")
    aws_lambda = boto3.client("lambda", endpoint_url=stack["endpoint"], region_name="us-east-1")
    ensure_function(aws_lambda, "bin-counter-api", "bin-counter", ROLE)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(make_bin_image(1, 1))
    (folder / "b.png").write_bytes(make_bin_image(2, 2, fmt="PNG"))
    (folder / "c.jpg").write_bytes(b"not really a jpeg")
    code = api_client.main(["--url", f"{stack['endpoint']}/count", "--api-key", API_KEY, "--expected", "1",
                            str(folder)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1  # one image failed
    assert len(lines) == 3
    assert lines[0].startswith(f"{folder / 'a.jpg'}: ") and "items (confidence" in lines[0]
    assert "expected 1:" in lines[0]
    assert "items (confidence" in lines[1] and "model cli-model" in lines[1]
    assert lines[2] == f"{folder / 'c.jpg'}: 415 unsupported_image: image 0 is neither JPEG nor PNG"
    assert api_client.main(["--url", f"{stack['endpoint']}/count", str(folder / "a.jpg")]) == 1  # no key
    assert "403" in capsys.readouterr().out
