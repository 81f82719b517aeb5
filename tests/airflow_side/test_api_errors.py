"""The API function's answers to bad requests and to its endpoint's failures, without an endpoint:
only the boto3 sagemaker-runtime client, which is AWS itself, is stubbed. Every code it answers is a
code of sagemaker_code/api_contract.json, the table the model reads too; the packaged function and the
model's code both carry that table; lambda/README.md's copy of it is generated from it."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import Stubber

from bin_counter.api_function import function_zip
from bin_counter.retrain import code_archive
from scripts import api_contract_table
from standin.awslambda.exceptions import MAX_REQUEST_PAYLOAD_BYTES
from standin.gateway import Gateway
from standin.sagemaker.exceptions import MAX_INVOKE_BODY_BYTES
from tests.airflow_side.conftest import lambda_handler
from tests.conftest import REPO, REQUEST_FAULTS, json_of_images, make_bin_image, png_padded_to

CONTRACT_FILE = REPO / "sagemaker_code" / "api_contract.json"
CONTRACT = json.loads(CONTRACT_FILE.read_text())
ERRORS = CONTRACT["errors"]
ACCOUNT = "123456789012"
JPEG = make_bin_image(2, 5)


@pytest.fixture
def api(monkeypatch):
    """(handler module, Stubber of its sagemaker-runtime client): a stub without responses fails any
    call, so a test that adds none proves the function answered without calling the model."""
    handler = lambda_handler()
    monkeypatch.setenv("ENDPOINT_NAME", "bin-counter")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = handler.boto3.client("sagemaker-runtime", aws_access_key_id="x", aws_secret_access_key="x")
    monkeypatch.setattr(handler, "_runtime", client)
    with Stubber(client) as stub:
        yield handler, stub
        stub.assert_no_pending_responses()


def event(body: bytes, content_type: str | None, **extra) -> dict:
    """API Gateway's REST event: JSON as text, anything else base64-encoded (a binary media type)."""
    text = content_type == "application/json"
    return {
        "httpMethod": "POST",
        "path": "/count",
        "headers": {"Content-Type": content_type} if content_type else {},
        "body": body.decode() if text else base64.b64encode(body).decode(),
        "isBase64Encoded": not text,
        "queryStringParameters": None,
        **extra,
    }


def answer(handler, request: dict) -> tuple[int, dict, str]:
    response = handler.handler(request, None)
    assert response["headers"]["Content-Type"] == "application/json"
    return response["statusCode"], json.loads(response["body"]), response["body"]


API_FAULTS = [case for case in REQUEST_FAULTS if "api" in ERRORS[case[3]]["checked_by"]]


@pytest.mark.parametrize(("name", "body", "content_type", "code"), API_FAULTS, ids=[c[0] for c in API_FAULTS])
def test_every_bad_request_gets_the_tables_code_without_calling_the_model(api, name, body, content_type, code):
    handler, _ = api
    status, answered, _ = answer(handler, event(body, content_type))
    assert (status, answered["error"]) == (ERRORS[code]["status"], code), answered
    assert answered["message"] and answered["request_id"] == "local"


@pytest.mark.parametrize(
    ("request_event", "status", "code"),
    [
        (event(JPEG, "image/jpeg", httpMethod="GET"), 405, "method_not_allowed"),
        ({**event(JPEG, "image/jpeg"), "body": "%%%not base64%%%"}, 400, "malformed_base64"),
        (event(JPEG, "image/jpeg", queryStringParameters={"expected": "three"}), 400, "malformed_expected"),
        (
            event(
                json.dumps({"images": [base64.b64encode(JPEG).decode()] * 2, "expected": [1]}).encode(),
                "application/json",
            ),
            400,
            "malformed_expected",
        ),
        # HTTP API payload 2.0: lower-case headers, the method under requestContext.
        (
            {
                "version": "2.0",
                "headers": {"content-type": "image/gif"},
                "requestContext": {"http": {"method": "POST"}},
                "body": base64.b64encode(JPEG).decode(),
                "isBase64Encoded": True,
            },
            415,
            "unsupported_content_type",
        ),
    ],
    ids=["GET", "body not base64", "expected not a number", "expected not one per image", "HTTP API"],
)
def test_the_events_own_faults(api, request_event, status, code):
    handler, _ = api
    answered_status, answered, _ = answer(handler, request_event)
    assert (answered_status, answered["error"]) == (status, code) == (ERRORS[code]["status"], code)


def model_error(stub, status: int, body: str) -> None:
    """InvokeEndpoint's ModelError as AWS raises it: the container's status and body, a message naming
    the account and the endpoint's log group."""
    message = (
        f"Received {'client' if status < 500 else 'server'} error ({status}) from primary with message "
        f'"{body}". See https://us-east-1.console.aws.amazon.com/cloudwatch/home?region=us-east-1#logEventViewer:'
        f"group=/aws/sagemaker/Endpoints/bin-counter in account {ACCOUNT} for more information."
    )
    stub.add_client_error(
        "invoke_endpoint",
        "ModelError",
        message,
        424,
        modeled_fields={
            "OriginalStatusCode": status,
            "OriginalMessage": body,
            "LogStreamArn": f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/bin-counter",
        },
    )


def toolkit_body(code: str, message: str) -> str:
    """The inference toolkit's body for a BaseInferenceToolkitError: message, newline, traceback."""
    first = json.dumps({"error": code, "message": message}, separators=(",", ":"))
    return (
        f'{first}\nTraceback (most recent call last):\n  File "/opt/ml/model/code/inference.py", line 180, in '
        f"predict_fn\n    raise RequestError(...)\ninference.RequestError: {ERRORS[code]['status']} {code}"
    )


def assert_nothing_of_the_endpoint(raw: str) -> None:
    for leak in ("Traceback", "inference.py", ACCOUNT, "arn:", "console.aws", "Received"):
        assert leak not in raw, f"{leak!r} reached the client: {raw}"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("too_many_pixels", "image 0 has more than 40000000 pixels"),
        ("corrupt_image", "image 0 could not be decoded"),
        ("truncated_image", "image 0 is cut short (no JPEG end marker)"),
    ],
)
def test_a_model_refusal_reaches_the_client_as_its_code_and_nothing_else(api, code, message):
    handler, stub = api
    model_error(stub, ERRORS[code]["status"], toolkit_body(code, message))
    status, answered, raw = answer(handler, event(JPEG, "image/jpeg"))
    assert (status, answered["error"], answered["message"]) == (ERRORS[code]["status"], code, message)
    assert_nothing_of_the_endpoint(raw)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        # An older model's body starts with prose; the code it meant cannot be read.
        (
            413,
            "image 0: image rejected as a decompression bomb\nTraceback (most recent call last): ...",
            "rejected_by_model",
        ),
        (400, f'{{"error": "arn:aws:iam::{ACCOUNT}:role/x", "message": "x"}}\nTraceback ...', "rejected_by_model"),
        # A model that fails: its exception text and traceback stay in the logs.
        (
            500,
            'CUDA error: device-side assert\nTraceback (most recent call last):\n  File "/opt/ml/code/inference.py"',
            "model_error",
        ),
        (500, toolkit_body("truncated_image", "image 0 is cut short"), "model_error"),
    ],
)
def test_a_model_answer_the_function_cannot_read_is_not_passed_on(api, status, body, code):
    handler, stub = api
    model_error(stub, status, body)
    answered_status, answered, raw = answer(handler, event(JPEG, "image/jpeg"))
    assert (answered_status, answered["error"]) == (ERRORS[code]["status"], code)
    assert answered["message"] == ERRORS[code]["message"]
    assert_nothing_of_the_endpoint(raw)
    assert "device-side" not in raw and "decompression" not in raw


@pytest.mark.parametrize(
    ("aws_code", "aws_status", "code"),
    [
        ("AccessDeniedException", 400, "api_misconfigured"),
        ("ThrottlingException", 400, "throttled"),
        ("ValidationError", 400, "endpoint_unavailable"),
        ("ModelNotReadyException", 424, "endpoint_unavailable"),
        ("InternalFailure", 500, "model_error"),
    ],
)
def test_aws_refusals_get_the_tables_code_without_the_account(api, aws_code, aws_status, code):
    handler, stub = api
    said = (
        f"User: arn:aws:sts::{ACCOUNT}:assumed-role/bin-counter-api/fn is not authorized to perform: "
        f"sagemaker:InvokeEndpoint on resource: arn:aws:sagemaker:us-east-1:{ACCOUNT}:endpoint/bin-counter"
    )
    stub.add_client_error("invoke_endpoint", aws_code, said, aws_status)
    status, answered, raw = answer(handler, event(JPEG, "image/jpeg"))
    assert (status, answered["error"]) == (ERRORS[code]["status"], code)
    assert answered["message"] == ERRORS[code]["message"]
    assert_nothing_of_the_endpoint(raw)
    assert (ERRORS["api_misconfigured"]["status"], ERRORS["throttled"]["status"]) == (502, 429)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (ReadTimeoutError(endpoint_url="https://runtime.sagemaker.us-east-1.amazonaws.com"), "endpoint_timeout"),
        (ConnectTimeoutError(endpoint_url="https://runtime.sagemaker.us-east-1.amazonaws.com"), "endpoint_timeout"),
        (
            EndpointConnectionError(endpoint_url="https://runtime.sagemaker.us-east-1.amazonaws.com"),
            "endpoint_unreachable",
        ),
    ],
)
def test_an_endpoint_that_does_not_answer(api, monkeypatch, failure, code):
    handler, _ = api

    def invoke_endpoint(**_):
        raise failure

    monkeypatch.setattr(handler._runtime, "invoke_endpoint", invoke_endpoint)
    status, answered, _ = answer(handler, event(JPEG, "image/jpeg"))
    assert (status, answered["error"]) == (ERRORS[code]["status"], code)
    assert ERRORS["endpoint_timeout"]["status"] == 504


def test_a_good_request_goes_to_the_model_once(api):
    handler, stub = api
    prediction = {
        "count": 2,
        "probabilities": [0.1, 0.2, 0.6, 0.1],
        "confidence": 0.6,
        "expected_count": 1.7,
        "model_version": "m",
    }
    data = json.dumps(prediction).encode()
    stub.add_response(
        "invoke_endpoint",
        {"Body": StreamingBody(io.BytesIO(data), len(data))},
        {
            "EndpointName": "bin-counter",
            "Body": JPEG,
            "ContentType": "image/jpeg",
            "Accept": "application/json",
            # The request id, so that the endpoint's data capture joins the function's verdict log line.
            "InferenceId": "local",
        },
    )
    status, answered, _ = answer(handler, event(JPEG, "image/png", queryStringParameters={"expected": "2"}))
    assert status == 200 and answered["count"] == 2 and answered["verdict"] == "match"


# What API Gateway's event may carry on AWS beyond the local gateway's (its request context, and
# headers and query string of up to 10240 bytes each, twice): lambda/README.md, "Request size".
EVENT_MARGIN = 64 * 1024
LIMITS = CONTRACT["limits"]


def gateway_event(body: bytes, content_type: str) -> bytes:
    """The event the local API gateway sends for a POST /count, as Lambda receives it."""
    headers = {
        "Host": "api.example.com",
        "User-Agent": "bin-counter-client",
        "Accept": "*/*",
        "Content-Type": content_type,
        "x-api-key": "k" * 40,
        "Content-Length": str(len(body)),
    }
    return json.dumps(Gateway(None, "api").event("POST", "/count", headers, body)).encode()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (png_padded_to(LIMITS["max_image_bytes"]), "image/png"),
        (
            json.dumps({"image": base64.b64encode(png_padded_to(LIMITS["max_image_bytes"])).decode()}).encode(),
            "application/json",
        ),
        (json_of_images(LIMITS["max_images"], LIMITS["max_request_bytes"]), "application/json"),
    ],
    ids=["the largest image", "the largest image as JSON", "the largest JSON of the most images"],
)
def test_the_largest_requests_the_api_takes_fit_what_aws_takes(api, monkeypatch, body, content_type):
    """Every request within our limits is one AWS lets through: its API Gateway event is under Lambda's
    limit with the margin to spare, and what the function sends on is under InvokeEndpoint's. One byte
    more is our 413, from the function, which AWS still lets reach it."""
    handler, _ = api
    forwarded = []

    def invoke_endpoint(**params):
        forwarded.append(len(params["Body"]))
        single = params["ContentType"] != "application/json"
        prediction = {"count": 1, "probabilities": [0.2, 0.8], "confidence": 0.8, "expected_count": 0.8}
        answer = prediction if single else {"predictions": [prediction] * len(json.loads(params["Body"])["images"])}
        data = json.dumps({**answer, "model_version": "m"}).encode()
        return {"Body": StreamingBody(io.BytesIO(data), len(data))}

    monkeypatch.setattr(handler._runtime, "invoke_endpoint", invoke_endpoint)
    request = gateway_event(body, content_type)
    assert len(request) + EVENT_MARGIN < MAX_REQUEST_PAYLOAD_BYTES
    status, answered, _ = answer(handler, json.loads(request))
    assert status == 200, answered
    assert forwarded[-1] <= LIMITS["max_request_bytes"] + LIMITS["max_images"] < MAX_INVOKE_BODY_BYTES - EVENT_MARGIN

    if content_type == "image/png":
        bigger, what, limit = png_padded_to(len(body) + 1), "image 0", LIMITS["max_image_bytes"]
    else:
        limit = LIMITS["max_request_bytes"]
        bigger, what = body + b" " * (limit + 1 - len(body)), "the request"
    request = gateway_event(bigger, content_type)
    assert len(request) + EVENT_MARGIN < MAX_REQUEST_PAYLOAD_BYTES
    status, answered, _ = answer(handler, json.loads(request))
    assert (status, answered["error"], answered["message"]) == (
        413,
        "too_large",
        f"{what} is {len(bigger)} bytes; the limit is {limit}",
    )
    assert len(forwarded) == 1


def test_a_serverless_endpoints_smaller_body_is_refused_by_the_function_with_the_tables_error(api, monkeypatch):
    """ENDPOINT_KIND serverless (the deploy DAG's serving Param): the largest JSON the function takes goes
    on within the serverless endpoint's 4 MB, and one byte more is our 413 with that kind's limit, not a
    ValidationError from SageMaker passed on as a 502."""
    from standin.sagemaker.serverless import MAX_BODY_BYTES

    handler, _ = api
    monkeypatch.setenv("ENDPOINT_KIND", "serverless")
    limit = CONTRACT["limits_by_endpoint"]["serverless"]["max_request_bytes"]
    forwarded = []

    def invoke_endpoint(**params):
        forwarded.append(len(params["Body"]))
        prediction = {"count": 1, "probabilities": [0.2, 0.8], "confidence": 0.8, "expected_count": 0.8}
        data = json.dumps(
            {"predictions": [prediction] * len(json.loads(params["Body"])["images"]), "model_version": "m"}
        )
        return {"Body": StreamingBody(io.BytesIO(data.encode()), len(data))}

    monkeypatch.setattr(handler._runtime, "invoke_endpoint", invoke_endpoint)
    largest = json_of_images(LIMITS["max_images"], limit)
    status, answered, _ = answer(handler, event(largest, "application/json"))
    assert status == 200, answered
    assert forwarded == [forwarded[0]] and forwarded[0] <= MAX_BODY_BYTES
    bigger = largest + b" "
    status, answered, _ = answer(handler, event(bigger, "application/json"))
    assert (status, answered["error"], answered["message"]) == (
        413,
        "too_large",
        f"the request is {len(bigger)} bytes; the limit is {limit}",
    )
    monkeypatch.setenv("ENDPOINT_KIND", "instances")  # the same request to an instance endpoint goes on
    assert answer(handler, event(bigger, "application/json"))[0] == 200


def test_without_an_endpoint_the_function_says_so(api, monkeypatch):
    handler, _ = api
    monkeypatch.delenv("ENDPOINT_NAME")
    status, answered, _ = answer(handler, event(JPEG, "image/jpeg"))
    assert (status, answered["error"]) == (503, "not_configured")


def raised_codes(source: str, kind: str) -> set[str]:
    return set(re.findall(rf'{kind}\(\s*"([a-z0-9_]+)"', source))


def test_every_code_raised_is_the_tables_and_every_code_of_the_table_is_raised():
    shared = (REPO / "sagemaker_code" / "api_contract.py").read_text()  # both layers run its checks
    function = shared + "".join(p.read_text() for p in sorted((REPO / "lambda").glob("*.py")))
    model = shared + (REPO / "sagemaker_code" / "inference.py").read_text()
    preprocessing = (REPO / "sagemaker_code" / "preprocessing.py").read_text()
    by_function = raised_codes(function, "ApiError")
    by_model = (
        raised_codes(model, "RequestError")
        | raised_codes(model, "ApiError")
        | raised_codes(preprocessing, "ImageRejected")
    )
    assert by_function <= set(ERRORS) and by_model <= set(ERRORS)
    assert {c for c, e in ERRORS.items() if "api" in e["checked_by"]} == by_function
    assert {c for c, e in ERRORS.items() if "model" in e["checked_by"]} == by_model
    for code, entry in ERRORS.items():
        assert 400 <= entry["status"] < 600 and entry["message"], code


def test_the_function_zip_and_the_models_code_carry_the_table(tmp_path):
    table = CONTRACT_FILE.read_bytes()
    checks = (REPO / "sagemaker_code" / "api_contract.py").read_bytes()
    with zipfile.ZipFile(io.BytesIO(function_zip())) as archive:
        assert archive.read("api_contract.json") == table and archive.read("api_contract.py") == checks
        archive.extractall(tmp_path / "function")  # noqa: S202 - our own zip
    # The packaged function reads the table from beside itself, as on Lambda (no checkout around it).
    script = "import handler, api_contract; print(api_contract.contract_path())"
    found = subprocess.run(
        [sys.executable, "-E", "-c", script], cwd=tmp_path / "function", capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == str((tmp_path / "function" / "api_contract.json").resolve())
    # The training code's sourcedir.tar.gz, from which train.py copies SERVING_CODE into the model's code/.
    with tarfile.open(fileobj=io.BytesIO(code_archive())) as source:
        assert source.extractfile("api_contract.json").read() == table
        assert source.extractfile("api_contract.py").read() == checks
    train = (REPO / "sagemaker_code" / "train.py").read_text()
    serving_code = re.search(r"^SERVING_CODE = \(([^)]*)\)", train, re.M).group(1)
    assert all(f'"{name}"' in serving_code for name in ("inference.py", "api_contract.py", "api_contract.json"))


def test_lambda_readme_shows_the_table_as_generated():
    assert api_contract_table.main(["--check"]) == 0
    readme = (REPO / "lambda" / "README.md").read_text()
    for code in ERRORS:
        assert f"`{code}`" in readme
    # The main README points at that table instead of copying it.
    main_readme = (REPO / "README.md").read_text()
    assert "lambda/README.md#errors-and-limits-one-table-for-the-function-and-the-model" in main_readme
    assert "`too_many_pixels`" not in main_readme
