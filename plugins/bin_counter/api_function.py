"""The API's Lambda function as the retraining DAG deploys it: its package and settings, creating it or
pointing it at the endpoint, and the smoke check sent through it after each deployment.

The function's code is `lambda/`; its limits are `lambda/function.json`, shared with
`lambda/template.yaml`, so a function the DAG creates and one the template creates run alike.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

from botocore.exceptions import ClientError

from bin_counter.dataset import DatasetNotFound
from bin_counter.paths import CODE_DIR, LAMBDA_DIR

log = logging.getLogger(__name__)

# The API's request checks and error table, which the model's serving code uses too (sagemaker_code/).
API_CONTRACT = (CODE_DIR / "api_contract.py", CODE_DIR / "api_contract.json")


# -- the function ---------------------------------------------------------------------------------
def function_zip(lambda_dir: Path = LAMBDA_DIR) -> bytes:
    """The Lambda function's deployment package: the handler and its siblings (boto3 is in the runtime)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in [*sorted(lambda_dir.glob("*.py")), *API_CONTRACT]:
            archive.writestr(zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0)), path.read_bytes())
    return buf.getvalue()


def function_settings(lambda_dir: Path = LAMBDA_DIR) -> dict:
    """lambda/function.json: the runtime, limits and settings the API function runs with on AWS."""
    return {k: v for k, v in json.loads((lambda_dir / "function.json").read_text()).items() if k != "//"}


class FunctionMissing(RuntimeError):
    """The API function is not there and is not the DAG's to create; the message says what to deploy."""


def existing_function(lambda_client, name: str) -> dict | None:
    """The function's configuration, or None where Lambda has no function of that name."""
    try:
        return lambda_client.get_function(FunctionName=name)["Configuration"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        return None


def check_function_deployed(lambda_client, name: str) -> dict:
    """Refuse (FunctionMissing) unless the API stack's function exists: for the `settings` task where
    the API stack is expected, so the run stops before anything is paid for rather than after."""
    existing = existing_function(lambda_client, name)
    if existing is None:
        raise FunctionMissing(
            f"there is no Lambda function {name}: deploy the API stack (lambda/template.yaml, with "
            f'FunctionName={name}; lambda/README.md, "Deploy") before the first retraining run. The DAG does '
            "not create it there: the stack creates the function and its log group by name, and "
            "CloudFormation refuses to create a named resource that already exists"
        )
    return existing


def ensure_function(
    lambda_client,
    name: str,
    endpoint_name: str,
    role_arn: str,
    create_missing: bool = True,
    endpoint_kind: str = "instances",
) -> str:
    """Create the API's Lambda function, or update its code and point it at `endpoint_name`.
    Returns the function's ARN.

    A new function gets lambda/function.json's runtime, limits and settings, as lambda/template.yaml's
    does. An existing function (for example the template's) keeps its role, limits and other settings:
    only the code, ENDPOINT_NAME and ENDPOINT_KIND (instances or serverless: the request limits) are the
    DAG's to change. With `create_missing` False (the API
    stack is expected to own the function), a missing one is FunctionMissing instead: a function
    created here would keep that stack from ever being created.
    """
    code = function_zip()
    settings = function_settings()
    existing = (
        existing_function(lambda_client, name) if create_missing else check_function_deployed(lambda_client, name)
    )
    if existing is None:
        created = lambda_client.create_function(
            FunctionName=name,
            Runtime=settings["Runtime"],
            Role=role_arn,
            Handler=settings["Handler"],
            Code={"ZipFile": code},
            Timeout=settings["Timeout"],
            MemorySize=settings["MemorySize"],
            Environment={
                "Variables": {**settings["Environment"], "ENDPOINT_NAME": endpoint_name, "ENDPOINT_KIND": endpoint_kind}
            },
            Description="bin-counter public API: counts items in a bin photo",
        )
        log.info("created Lambda function %s for endpoint %s", name, endpoint_name)
        arn = created["FunctionArn"]
    else:
        lambda_client.update_function_code(FunctionName=name, ZipFile=code)
        _wait_updated(lambda_client, name)
        variables = dict((existing.get("Environment") or {}).get("Variables") or {})
        wanted = {"ENDPOINT_NAME": endpoint_name, "ENDPOINT_KIND": endpoint_kind}
        if any(variables.get(k) != v for k, v in wanted.items()):
            variables.update(wanted)
            lambda_client.update_function_configuration(FunctionName=name, Environment={"Variables": variables})
        log.info("updated Lambda function %s for endpoint %s", name, endpoint_name)
        arn = existing["FunctionArn"]
    _wait_updated(lambda_client, name)
    return arn


def _wait_updated(lambda_client, name: str) -> None:
    # On AWS a function takes seconds to apply an update and refuses a second one meanwhile.
    lambda_client.get_waiter("function_updated_v2").wait(
        FunctionName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 60}
    )


# -- the smoke check -----------------------------------------------------------------------------
def smoke_images(s3, photos: list[dict], how_many: int) -> list[dict]:
    """Up to `how_many` of a split's photos (`bin_counter.dataset.photos`), one per count first:
    [{"key", "count", "base64"}]."""
    by_count: dict[int, list[dict]] = {}
    for photo in photos:
        by_count.setdefault(photo["count"], []).append(photo)
    if not by_count:
        raise DatasetNotFound("the dataset lists no test photos")
    chosen: list[dict] = []
    for i in range(max(len(group) for group in by_count.values())):
        chosen += [group[i] for _, group in sorted(by_count.items()) if i < len(group)]
    return [
        {
            "key": p["key"],
            "count": p["count"],
            "base64": base64.b64encode(s3.get_object(Bucket=p["bucket"], Key=p["object"])["Body"].read()).decode(),
        }
        for p in chosen[:how_many]
    ]


def api_event(images: list[dict]) -> dict:
    """The event API Gateway (REST, proxy integration) sends for a JSON request with these images."""
    return {
        "resource": "/count",
        "path": "/count",
        "httpMethod": "POST",
        "headers": {"Content-Type": "application/json"},
        "queryStringParameters": None,
        "requestContext": {"resourcePath": "/count", "httpMethod": "POST", "stage": "smoke-check"},
        "body": json.dumps({"images": [i["base64"] for i in images]}),
        "isBase64Encoded": False,
    }


class SmokeCheckFailed(AssertionError):
    pass


def check_answers(payload: str | bytes | Mapping, images: list[dict], classes: int | None = None) -> dict:
    """The Lambda function's answer to the smoke event, checked: a 200 with one well-formed
    prediction per image. Returns a summary of counts next to the truth."""
    response = json.loads(payload) if isinstance(payload, (str, bytes)) else dict(payload)
    if "errorMessage" in response:
        raise SmokeCheckFailed(f"the function failed: {response.get('errorType')}: {response['errorMessage']}")
    status = response.get("statusCode")
    try:
        body = json.loads(response.get("body") or "{}")
    except json.JSONDecodeError as exc:
        raise SmokeCheckFailed(f"the function answered {status} with a body that is not JSON") from exc
    if status != 200:
        raise SmokeCheckFailed(f"the API answered {status}: {body.get('error')}: {body.get('message')}")
    predictions = body.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != len(images):
        raise SmokeCheckFailed(f"expected {len(images)} predictions, got {json.dumps(body)[:300]}")
    rows = []
    for image, prediction in zip(images, predictions, strict=True):
        probabilities = prediction.get("probabilities")
        count = prediction.get("count")
        if (
            not isinstance(count, int)
            or not isinstance(probabilities, list)
            or not probabilities
            or abs(sum(probabilities) - 1) > 1e-3
            or not 0 <= count < len(probabilities)
            or (classes is not None and len(probabilities) != classes)
        ):
            raise SmokeCheckFailed(f"malformed prediction for {image['key']}: {json.dumps(prediction)[:300]}")
        rows.append(
            {
                "key": image["key"],
                "true": image["count"],
                "predicted": count,
                "confidence": prediction.get("confidence"),
            }
        )
    return {
        "model_version": body.get("model_version"),
        "request_id": body.get("request_id"),
        "correct": sum(r["true"] == r["predicted"] for r in rows),
        "images": rows,
    }
