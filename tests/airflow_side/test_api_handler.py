"""lambda/handler.py run as a Lambda function by the stand-in, in front of a real endpoint serving
a model train.py made: API Gateway proxy events in, status codes and JSON bodies out; then the
same through the local API gateway over HTTP, and the CLI client."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import urllib.error
import urllib.request

import boto3
import pytest

from bin_counter import api_client
from bin_counter.api_function import ensure_function, function_zip
from standin.launch import LOCAL_STACK_PARAMETERS, start_standin
from tests.airflow_side.conftest import (
    API_FUNCTION_ROLE,
    API_KEY,
    ENDPOINT,
    FUNCTION,
    WARM,
    deployed_model,
    sagemaker_client,
    serving_endpoint,
    wait_endpoint,
)
from tests.conftest import REPO, json_of_images, make_bin_image, png_claiming_size, png_padded_to

# That role may invoke the stack's one endpoint only (AWS would answer AccessDenied for any other), so
# the functions pointed at other endpoints to see how the handler reports them run as another role.
OTHER_ENDPOINTS_ROLE = "arn:aws:iam::000000000000:role/test-functions-for-other-endpoints"
IMPATIENT = LOCAL_STACK_PARAMETERS["FunctionName"]
LIMITS = json.loads((REPO / "sagemaker_code" / "api_contract.json").read_text())["limits"]


def rest_event(
    body: bytes | str, content_type: str | None, binary: bool = True, method: str = "POST", query: dict | None = None
) -> dict:
    """What API Gateway's REST API sends (payload 1.0): binary bodies base64-encoded."""
    if binary:
        body = base64.b64encode(body if isinstance(body, bytes) else body.encode()).decode()
    return {
        "resource": "/count",
        "path": "/count",
        "httpMethod": method,
        "headers": {"Content-Type": content_type} if content_type else {},
        "queryStringParameters": query,
        "body": body,
        "isBase64Encoded": binary,
    }


def http_api_event(body: str, content_type: str) -> dict:
    """HTTP API payload 2.0: lower-case headers, the method under requestContext.http."""
    return {
        "version": "2.0",
        "routeKey": "POST /count",
        "rawPath": "/count",
        "headers": {"content-type": content_type},
        "requestContext": {"http": {"method": "POST", "path": "/count"}},
        "body": body,
        "isBase64Encoded": False,
    }


def call(aws_lambda, event: dict, function: str = FUNCTION) -> tuple[int, dict]:
    answer = json.loads(aws_lambda.invoke(FunctionName=function, Payload=json.dumps(event))["Payload"].read())
    assert "errorMessage" not in answer, answer  # never an unhandled exception
    assert answer["headers"]["Content-Type"] == "application/json"
    return answer["statusCode"], json.loads(answer["body"])


def test_the_api_counts_and_refuses_bad_requests_precisely(local_stack_connection, job_inputs, tmp_path):
    stack = local_stack_connection
    serving_endpoint(sagemaker_client(stack), job_inputs, "api-model", ENDPOINT)
    aws_lambda = boto3.client("lambda", endpoint_url=stack["endpoint"], region_name="us-east-1")
    ensure_function(aws_lambda, FUNCTION, ENDPOINT, API_FUNCTION_ROLE)
    jpeg = make_bin_image(2, 5)

    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"))
    assert status == 200, body
    assert body["model_version"] == "api-model" and 0 <= body["count"] <= 2 and body["request_id"]
    assert abs(sum(body["probabilities"]) - 1) < 1e-3 and 0 < body["confidence"] <= 1

    images = [base64.b64encode(make_bin_image(c, c)).decode() for c in range(3)]
    status, body = call(
        aws_lambda, rest_event(json.dumps({"images": images, "expected": [0, 1, 2]}), "application/json", binary=False)
    )
    assert status == 200, body
    assert len(body["predictions"]) == 3
    assert all(
        p["verdict"] in ("match", "mismatch", "uncertain") and 0 <= p["expected_probability"] <= 1
        for p in body["predictions"]
    )

    status, body = call(aws_lambda, http_api_event(json.dumps({"image": images[0]}), "application/json"))
    assert status == 200 and "count" in body

    bad = {
        "empty body": (rest_event(b"", "image/jpeg"), 400, "empty_body"),
        "text": (rest_event(b"hello, this is not an image", "image/jpeg"), 415, "not_an_image"),
        "truncated JPEG": (rest_event(jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "truncated_image"),
        "wrong content type": (rest_event(jpeg, "text/plain"), 415, "unsupported_content_type"),
        "malformed base64": (
            rest_event(json.dumps({"image": "%%%not base64%%%"}), "application/json", binary=False),
            400,
            "malformed_base64",
        ),
        "malformed JSON": (rest_event("{not json", "application/json", binary=False), 400, "malformed_json"),
        "too many images": (
            rest_event(json.dumps({"images": images * 3}), "application/json", binary=False),
            413,
            "too_many_images",
        ),
        "GET": (rest_event(jpeg, "image/jpeg", method="GET"), 405, "method_not_allowed"),
        "bad expected": (rest_event(jpeg, "image/jpeg", query={"expected": "three"}), 400, "malformed_expected"),
        # The handler cannot see pixel dimensions without an image library; the model refuses the
        # decompression bomb, and the API passes its code on (the first line of the toolkit-shaped body).
        "huge image": (rest_event(png_claiming_size(50_000, 50_000), "image/png"), 413, "too_many_pixels"),
    }
    for case, (event, expected_status, expected_error) in bad.items():
        status, body = call(aws_lambda, event)
        assert (status, body.get("error")) == (expected_status, expected_error), f"{case}: {body}"
        assert body["message"] and body["request_id"], case

    # An endpoint that does not exist: the API says it is unavailable, not that it crashed.
    ensure_function(aws_lambda, "bin-counter-api-nowhere", "no-such-endpoint", OTHER_ENDPOINTS_ROLE)
    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"), function="bin-counter-api-nowhere")
    assert (status, body["error"]) == (503, "endpoint_unavailable"), body

    # One structured log line per request, without the image bytes.
    log = (stack["state"] / "lambda" / FUNCTION / "function.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) >= 3 + len(bad)
    assert {"request_id", "status", "latency_ms", "model_version"} <= set(lines[0])
    assert lines[0]["event"] == "answer" and [set(a) for a in lines[0]["answers"]] == [
        {"count", "confidence", "expected", "verdict"}
    ]
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

    # Sizes (lambda/README.md, "Request size"), through the gateway: a request at our limits is
    # counted; one byte over them is our 413, from the function; an event over Lambda's limit (a 4.8 MB
    # image is 6.4 MB of base64) is API Gateway's own 413, as on AWS.
    def send(data: bytes, content_type: str) -> tuple[int, dict]:
        request = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": content_type, "x-api-key": API_KEY},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    image_limit, request_limit = LIMITS["max_image_bytes"], LIMITS["max_request_bytes"]
    status, body = send(png_padded_to(image_limit, 2, 5), "image/png")
    assert status == 200 and body["model_version"] == "api-model", body
    status, body = send(png_padded_to(image_limit + 1, 2, 5), "image/png")
    assert (status, body["error"], body["message"]) == (
        413,
        "too_large",
        f"image 0 is {image_limit + 1} bytes; the limit is {image_limit}",
    )
    status, body = send(png_padded_to(4_650_000), "image/png")  # over ours, and still AWS lets it through
    assert (status, body["error"]) == (413, "too_large"), body
    largest = json_of_images(2, request_limit)
    status, body = send(largest, "application/json")
    assert status == 200 and len(body["predictions"]) == 2, body
    status, body = send(largest + b" ", "application/json")
    assert (status, body["error"], body["message"]) == (
        413,
        "too_large",
        f"the request is {request_limit + 1} bytes; the limit is {request_limit}",
    )
    assert send(png_padded_to(4_800_000), "image/png") == (413, {"message": "Request Too Long"})


def test_the_cli_client_counts_a_folder_through_the_gateway(local_stack_connection, job_inputs, tmp_path, capsys):
    stack = local_stack_connection
    serving_endpoint(sagemaker_client(stack), job_inputs, "cli-model", ENDPOINT)
    aws_lambda = boto3.client("lambda", endpoint_url=stack["endpoint"], region_name="us-east-1")
    ensure_function(aws_lambda, FUNCTION, ENDPOINT, API_FUNCTION_ROLE)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(make_bin_image(1, 1))
    (folder / "b.png").write_bytes(make_bin_image(2, 2, fmt="PNG"))
    (folder / "c.jpg").write_bytes(b"not really a jpeg")
    code = api_client.main(
        ["--url", f"{stack['endpoint']}/count", "--api-key", API_KEY, "--expected", "1", str(folder)]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 1  # one image failed
    assert len(lines) == 3
    assert lines[0].startswith(f"{folder / 'a.jpg'}: ") and "items (confidence" in lines[0]
    assert "expected 1:" in lines[0]
    assert "items (confidence" in lines[1] and "model cli-model" in lines[1]
    assert lines[2] == f"{folder / 'c.jpg'}: 415 not_an_image: image 0 is neither JPEG nor PNG"
    assert api_client.main(["--url", f"{stack['endpoint']}/count", str(folder / "a.jpg")]) == 1  # no key
    assert "403" in capsys.readouterr().out


@pytest.fixture
def throttling_stack(tmp_path, moto_endpoint, aws_connection, container_python):
    """A stand-in whose endpoints take a burst of two InvokeEndpoint calls, then one per 20 s, and
    answer ThrottlingException beyond that, as SageMaker does past an account's rate."""
    proc, endpoint = start_standin(
        tmp_path / "state",
        moto_endpoint,
        container_python,
        extra_args=(*WARM, "--invoke-rate", "0.05", "--invoke-burst", "2"),
    )
    yield {"endpoint": endpoint, "state": tmp_path / "state"}
    proc.terminate()
    proc.wait(timeout=10)


def with_failing_predict(artifact: bytes) -> bytes:
    """The same model.tar.gz with an inference.py whose predict_fn fails: a model that loads and then
    breaks on every request, as a model with a bug in its serving code does."""
    failing = b"\n\ndef predict_fn(input_object, model):\n    raise RuntimeError('CUDA error: device-side assert')\n"
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(artifact)) as source, tarfile.open(fileobj=out, mode="w:gz") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("code/inference.py"):
                data += failing
                member.size = len(data)
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def test_endpoint_failures_reach_the_client_as_504_502_and_429(throttling_stack, job_inputs, s3):
    stack, sm = throttling_stack, sagemaker_client(throttling_stack)
    serving_endpoint(sm, job_inputs, "err-model", ENDPOINT)
    aws_lambda = boto3.client("lambda", endpoint_url=stack["endpoint"], region_name="us-east-1")
    jpeg = make_bin_image(2, 5)

    # The function the template creates has its own limits; the DAG's update keeps them and only
    # repoints the endpoint. It has the stack's name: its role may write that function's log group only.
    aws_lambda.create_function(
        FunctionName=IMPATIENT,
        Runtime="python3.12",
        Role=API_FUNCTION_ROLE,
        Handler="handler.handler",
        Timeout=7,
        Code={"ZipFile": function_zip()},
        Environment={"Variables": {"ENDPOINT_NAME": "elsewhere", "INVOKE_TIMEOUT_S": "0.001", "INVOKE_ATTEMPTS": "1"}},
    )
    ensure_function(aws_lambda, IMPATIENT, ENDPOINT, API_FUNCTION_ROLE)
    configuration = aws_lambda.get_function_configuration(FunctionName=IMPATIENT)
    assert configuration["Environment"]["Variables"] == {
        "ENDPOINT_NAME": ENDPOINT,
        "ENDPOINT_KIND": "instances",  # the deploy DAG's serving Param: the request limits
        "INVOKE_TIMEOUT_S": "0.001",
        "INVOKE_ATTEMPTS": "1",
    }
    assert configuration["Timeout"] == 7

    # An endpoint slower than the function's read timeout: 504, and the function itself still answers.
    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"), function=IMPATIENT)
    assert (status, body["error"]) == (504, "endpoint_timeout"), body

    # A model that fails on every request: 502 model_error; what it said (its exception and traceback)
    # goes to the function's log, not to the client.
    artifact = sm.describe_training_job(TrainingJobName="err-model")["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = artifact.removeprefix("s3://").split("/", 1)
    s3.put_object(
        Bucket=bucket,
        Key="failing/model.tar.gz",
        Body=with_failing_predict(s3.get_object(Bucket=bucket, Key=key)["Body"].read()),
    )
    deployed_model(sm, "failing", artifact=f"s3://{bucket}/failing/model.tar.gz")
    sm.create_endpoint(EndpointName="bin-counter-failing", EndpointConfigName="failing")
    assert wait_endpoint(sm, "bin-counter-failing")["EndpointStatus"] == "InService"
    ensure_function(aws_lambda, "api-failing", "bin-counter-failing", OTHER_ENDPOINTS_ROLE)
    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"), function="api-failing")
    assert (status, body["error"]) == (502, "model_error"), body
    assert "device-side assert" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    assert "device-side assert" in (stack["state"] / "lambda" / "api-failing" / "function.log").read_text()

    # Throttled: the second call of the burst succeeds; the next one is throttled on every one of
    # its three attempts (standard-mode backoff, a few seconds against one token per 20 s): 429.
    # Under a test role: the stack's role may write the stack's function's log group only.
    ensure_function(aws_lambda, "api-throttled", ENDPOINT, OTHER_ENDPOINTS_ROLE)
    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"), function="api-throttled")
    assert status == 200, body
    status, body = call(aws_lambda, rest_event(jpeg, "image/jpeg"), function="api-throttled")
    assert (status, body["error"]) == (429, "throttled"), body
