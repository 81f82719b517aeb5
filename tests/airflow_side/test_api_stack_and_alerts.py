"""What a run on a real account must not do with the API function and the alerts (issue #34): create
the function the API stack is to own (F9), log the smoke check's photos (W8), e-mail the account id
(K3). Lambda and SNS are moto's server; the Lambda invocation is botocore's Stubber, held to AWS's
service model (moto runs functions only in Docker)."""

from __future__ import annotations

import base64
import io
import json
import types

import boto3
import pytest
import structlog
from airflow.sdk import DAG
from airflow.sdk.execution_time.context import VariableAccessor
from botocore.response import StreamingBody
from botocore.stub import Stubber

from bin_counter.alerts import failure_alert, mask_account_ids
from bin_counter.api_function import (
    FunctionMissing,
    check_function_deployed,
    ensure_function,
    function_settings,
    function_zip,
)
from bin_counter.lambda_operators import DigestLambdaInvokeFunctionOperator, payload_digest
from tests.airflow_side.conftest import API_FUNCTION_ROLE


# -- F9: the API stack owns the function ---------------------------------------------------------
def admin_lambda(moto_endpoint: str):
    return boto3.client(
        "lambda",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_where_the_api_stack_is_expected_a_missing_function_is_refused_not_created(moto_endpoint):
    # moto's server answers Lambda's API but its call log does not map Lambda's actions (the stand-in's
    # does: test_api_handler.py holds ensure_function's calls to the worker policy), so no worker_client.
    aws_lambda = admin_lambda(moto_endpoint)
    with pytest.raises(
        FunctionMissing, match=r"deploy the API stack \(lambda/template\.yaml, with FunctionName=api-f9"
    ):
        ensure_function(aws_lambda, "api-f9", "bin-counter", API_FUNCTION_ROLE, create_missing=False)
    with pytest.raises(FunctionMissing, match="CloudFormation refuses to create a named resource"):
        check_function_deployed(aws_lambda, "api-f9")
    names = [f["FunctionName"] for f in aws_lambda.list_functions()["Functions"]]
    assert "api-f9" not in names  # nothing the stack would then collide with


def test_the_stacks_function_once_there_passes_the_check(moto_endpoint):
    settings = function_settings()
    stack = admin_lambda(moto_endpoint)  # the stack's doing
    stack.create_function(
        FunctionName="api-f9-stack",
        Runtime=settings["Runtime"],
        Role=API_FUNCTION_ROLE,
        Handler=settings["Handler"],
        Code={"ZipFile": function_zip()},
    )
    found = check_function_deployed(stack, "api-f9-stack")
    assert found["FunctionName"] == "api-f9-stack"


# -- W8: the smoke check's photos stay out of the log ---------------------------------------------
def invoked(operator, answer: dict) -> tuple[str, list[dict]]:
    """Run the operator's execute with Lambda's answer stubbed; returns its result and its log events."""
    client = boto3.client("lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    body = json.dumps(answer).encode()
    with Stubber(client) as stubber:
        stubber.add_response(
            "invoke",
            {"StatusCode": 200, "ExecutedVersion": "$LATEST", "Payload": StreamingBody(io.BytesIO(body), len(body))},
            {"FunctionName": "bin-counter-api", "Payload": operator.payload.encode()},  # the photos are sent
        )
        operator.hook.__dict__["conn"] = client  # the hook's cached client: AWS itself is what is stubbed
        with structlog.testing.capture_logs() as events:
            result = operator.execute({})
    return result, events


def test_invoke_api_logs_a_digest_of_the_payload_not_the_photos():
    photo = base64.b64encode(b"\x89PNG" + bytes(range(256)) * 40).decode()
    payload = json.dumps({"body": json.dumps({"images": [photo] * 3})})
    operator = DigestLambdaInvokeFunctionOperator(
        task_id="invoke_api", function_name="bin-counter-api", payload=payload
    )
    result, events = invoked(operator, {"statusCode": 200, "body": "{}"})
    logged = json.dumps(events, default=str)
    assert json.loads(result) == {"statusCode": 200, "body": "{}"}
    assert photo[:64] not in logged and payload_digest(payload) in logged
    assert any("Invoking AWS Lambda function" in e["event"] for e in events)  # the provider's line, changed


# -- K3: alerts name the resources but not the account -----------------------------------------
def test_a_failure_alert_keeps_the_reason_and_masks_the_account_id(
    aws_connection, moto_endpoint, pipeline_stack, monkeypatch
):
    sns = boto3.client("sns", endpoint_url=moto_endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    # The stack's topic: the worker policy lets the workers publish to it only.
    topic = sns.create_topic(Name=pipeline_stack.outputs["AlertsTopicArn"].rsplit(":", 1)[1])["TopicArn"]
    queue = sqs.create_queue(QueueName="on-call-k3")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_ALERTS_TOPIC", topic)
    reason = (
        "An error occurred (AccessDeniedException) when calling the CreateTrainingJob operation: User: "
        "arn:aws:sts::123456789012:assumed-role/bin-counter-worker/i-0abc is not authorized to perform: "
        "iam:PassRole on resource: arn:aws:iam::123456789012:role/bin-counter-SageMakerExecutionRole; image "
        "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6.0-gpu-py312"
    )
    context = {
        "dag": DAG("bin_count_retrain", schedule=None),
        "ti": types.SimpleNamespace(task_id="tune", try_number=2, log_url="http://airflow/log"),
        "run_id": "manual__2026-01-15",
        "exception": PermissionError(reason),
        "var": {"json": VariableAccessor(deserialize_json=True), "value": VariableAccessor(deserialize_json=False)},
    }
    failure_alert()(context)
    message = json.loads(sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)["Messages"][0]["Body"])["Message"]
    assert "123456789012" not in message and "763104351884" not in message
    assert "arn:aws:iam::<account>:role/bin-counter-SageMakerExecutionRole" in message
    assert "AccessDeniedException" in message and "iam:PassRole" in message and "Task:   tune (try 2)" in message


def test_masking_leaves_other_numbers_alone():
    assert mask_account_ids("bucket bin-counter-123456789012-eu-west-1, 3 of 1234567890123") == (
        "bucket bin-counter-<account>-eu-west-1, 3 of 1234567890123"
    )
