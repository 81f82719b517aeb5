"""The templates' operational alarms (infra/pipeline.yaml, lambda/template.yaml) and what raises them
locally: every alarm notifies the alerts topic and names its docs section, watches a metric the local
stack publishes as AWS names it, and, in a drill, a broken API function raises its alarm and the alert
reaches the on-call queue as CloudWatch's notification JSON."""

from __future__ import annotations

import io
import json
import re
import time
import urllib.error
import urllib.request
import zipfile
from datetime import UTC, datetime

import boto3
import pytest

from standin import iam
from standin.cloudwatch import metrics, notifications, stack_alarms
from standin.cloudwatch.evaluator import AlarmEvaluator
from standin.launch import LOCAL_STACK_PARAMETERS
from tests.airflow_side.conftest import API_KEY
from tests.conftest import REPO

OPERATIONS = REPO / "docs" / "operations.md"
# What the local stack publishes, by namespace: metric -> its dimension names.
PUBLISHED = {
    "AWS/SageMaker": {m: {"EndpointName", "VariantName"} for m in metrics.sagemaker_values(200, 0.1, 0.0, 1)},
    "AWS/Lambda": {m: {"FunctionName"} for m in metrics.lambda_values(False, 0.1, 1)},
    "AWS/ApiGateway": {m: {"ApiName", "Stage"} for m in metrics.gateway_values(200, 0.1, 0.05)},
}
# Watched on AWS, never published locally: the stand-in never throttles a function (standin/README.md).
AWS_ONLY = {("AWS/Lambda", "Throttles")}
# A drill alarms on one datapoint, so that the first failed requests raise it.
DRILL = {"AlarmEvaluationPeriods": "1", "AlarmDatapointsToAlarm": "1"}


def rendered_stacks(parameters: dict[str, str] | None = None) -> list[iam.Stack]:
    pipeline = iam.render(iam.load_template(), {**LOCAL_STACK_PARAMETERS, **(parameters or {})})
    return [pipeline, stack_alarms.api_stack(pipeline.outputs["AlertsTopicArn"], parameters)]


def slug(heading: str) -> str:
    """The anchor mkdocs gives a heading (lowercase, punctuation dropped, spaces to hyphens)."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def metric_queries(alarm: dict) -> list[dict]:
    if "Metrics" in alarm:
        return [q["MetricStat"]["Metric"] for q in alarm["Metrics"] if "MetricStat" in q]
    return [alarm]


def test_every_alarm_alerts_the_topic_and_names_a_docs_section_that_exists():
    anchors = {slug(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines() if line.startswith("#")}
    stacks = rendered_stacks()
    topic = stacks[0].outputs["AlertsTopicArn"]
    alarms = [alarm for stack in stacks for alarm in stack.alarms.values()]
    assert len(alarms) == 9
    names = [alarm["AlarmName"] for alarm in alarms]
    assert len(set(names)) == len(names)
    for alarm in alarms:
        assert alarm["AlarmActions"] == [topic] and alarm["OKActions"] == [topic], alarm["AlarmName"]
        # Not the DAGs' names (<endpoint>-*), which the workers may change or delete.
        assert alarm["AlarmName"].startswith("ops-"), alarm["AlarmName"]
        (section,) = re.findall(r"docs/operations\.md#([a-z0-9-]+)", alarm["AlarmDescription"])
        assert section in anchors, f"{alarm['AlarmName']}: no section #{section} in docs/operations.md"


def test_every_alarm_watches_a_metric_the_local_stack_publishes_as_aws_names_it():
    for stack in rendered_stacks():
        for alarm in stack.alarms.values():
            for metric in metric_queries(alarm):
                key = (metric["Namespace"], metric["MetricName"])
                dimensions = {d["Name"] for d in metric["Dimensions"]}
                if key in AWS_ONLY:
                    continue
                assert PUBLISHED[key[0]].get(key[1]) == dimensions, f"{alarm['AlarmName']}: {key} {dimensions}"


# AWS's names, written out from its pages, not from our code: "Amazon SageMaker AI metrics in Amazon
# CloudWatch" (monitoring-cloudwatch.html), "Types of metrics for Lambda functions"
# (monitoring-metrics-types.html), "Amazon API Gateway dimensions and metrics"
# (api-gateway-metrics-and-dimensions.html).
AWS_DOCUMENTED = {
    "AWS/SageMaker": {
        "Invocations",
        "Invocation4XXErrors",
        "Invocation5XXErrors",
        "InvocationModelErrors",
        "InvocationsPerInstance",
        "ModelLatency",
        "OverheadLatency",
    },
    "AWS/Lambda": {"Invocations", "Errors", "Throttles", "Duration", "ConcurrentExecutions"},
    "AWS/ApiGateway": {"Count", "4XXError", "5XXError", "Latency", "IntegrationLatency"},
}


def test_the_alarms_and_the_local_stack_use_the_names_aws_documents():
    for namespace, published in PUBLISHED.items():
        assert set(published) <= AWS_DOCUMENTED[namespace], namespace
    for stack in rendered_stacks():
        for alarm in stack.alarms.values():
            for metric in metric_queries(alarm):
                assert metric["MetricName"] in AWS_DOCUMENTED[metric["Namespace"]], alarm["AlarmName"]


def test_the_dashboards_show_the_alarms():
    for stack in rendered_stacks():
        (dashboard,) = stack.dashboards.values()
        body = json.loads(dashboard["DashboardBody"])
        shown = {
            arn.rsplit(":", 1)[-1] for w in body["widgets"] if w["type"] == "alarm" for arn in w["properties"]["alarms"]
        }
        assert shown == {alarm["AlarmName"] for alarm in stack.alarms.values()}


def test_the_notification_is_cloudwatchs_documented_one():
    # AWS's sample of the SNS message (aws/aws-lambda-go, events/testdata/
    # cloudwatch-alarm-sns-payload-single-metric.json), as the alarm it describes would be described.
    described = {
        "AlarmName": "EXAMPLE",
        "AlarmDescription": "EXAMPLE",
        "AlarmArn": "arn:aws:cloudwatch:REGION:ACCOUNT_NUMBER:alarm:EXAMPLE",
        "Namespace": "AWS/EC2",
        "MetricName": "NetworkOut",
        "Statistic": "Average",
        "Unit": "Bytes",
        "Dimensions": [{"Name": "InstanceId", "Value": "TestInstance"}],
        "Period": 60,
        "EvaluationPeriods": 1,
        "ComparisonOperator": "GreaterThanThreshold",
        "Threshold": 0.0,
    }
    reason = (
        "Threshold Crossed: 1 out of the last 1 datapoints [1234.0 (06/03/15 17:43:27)] was greater than the "
        "threshold (0.0) (minimum 1 datapoint for OK -> ALARM transition)."
    )
    changed = datetime(2015, 6, 3, 17, 43, 27, 123000, tzinfo=UTC)
    message = notifications.alarm_message(described, "INSUFFICIENT_DATA", "ALARM", reason, changed, "EXAMPLE")
    assert message == {
        "AlarmName": "EXAMPLE",
        "AlarmDescription": "EXAMPLE",
        "AWSAccountId": "000000000000",  # the sample's is 123456789012
        "NewStateValue": "ALARM",
        "NewStateReason": reason,
        "StateChangeTime": "2015-06-03T17:43:27.123+0000",
        "Region": "EXAMPLE",
        "AlarmArn": "arn:aws:cloudwatch:REGION:ACCOUNT_NUMBER:alarm:EXAMPLE",
        "OldStateValue": "INSUFFICIENT_DATA",
        "Trigger": {
            "MetricName": "NetworkOut",
            "Namespace": "AWS/EC2",
            "StatisticType": "Statistic",
            "Statistic": "AVERAGE",
            "Unit": "Bytes",
            "Dimensions": [{"value": "TestInstance", "name": "InstanceId"}],
            "Period": 60,
            "EvaluationPeriods": 1,
            "ComparisonOperator": "GreaterThanThreshold",
            "Threshold": 0.0,
            "TreatMissingData": "- TreatMissingData:                    missing",
            "EvaluateLowSampleCountPercentile": "",
        },
    }
    assert list(message) == list(json.loads(json.dumps(message)))  # the sample's key order
    # Actions: only to SNS topics, only those of the new state, none while actions are disabled.
    alarm = {"AlarmActions": ["arn:aws:sns:us-east-1:000000000000:t"], "OKActions": [], "ActionsEnabled": True}
    assert notifications.topics(alarm, "ALARM") == ["arn:aws:sns:us-east-1:000000000000:t"]
    assert notifications.topics(alarm, "OK") == []
    assert notifications.topics({**alarm, "ActionsEnabled": False}, "ALARM") == []
    assert notifications.subject("x", "ALARM", "us-east-1") == 'ALARM: "x" in US East (N. Virginia)'


def on_call_queue(moto_endpoint: str, topic: str):
    sns = boto3.client("sns", endpoint_url=moto_endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    sns.create_topic(Name=topic.rsplit(":", 1)[-1])
    queue = sqs.create_queue(QueueName="on-call-math")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    subscription = sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)["SubscriptionArn"]
    return sns, sqs, queue, subscription


def test_the_4xx_share_alarm_is_evaluated_on_its_metric_math(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    (_, api) = rendered_stacks(DRILL)
    alarm = stack_alarms.put_metric_alarm_request(api.alarms["Api4XXShareAlarm"])
    alarm["AlarmName"] += "-math-test"
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    sns, sqs, queue, subscription = on_call_queue(moto_endpoint, alarm["AlarmActions"][0])
    cloudwatch.put_metric_alarm(**alarm)
    try:
        # A closed minute: 10 requests, 3 of them 4xx (30% > 20%); the minute after it is judged.
        minute = (int(time.time()) // 60 - 3) * 60
        dimensions = [{"Name": "ApiName", "Value": "bc-local-api"}, {"Name": "Stage", "Value": "local"}]
        stamp = datetime.fromtimestamp(minute + 1, UTC)
        cloudwatch.put_metric_data(
            Namespace="AWS/ApiGateway",
            MetricData=[
                {"MetricName": "Count", "Dimensions": dimensions, "Timestamp": stamp, "Value": 10.0},
                {"MetricName": "4XXError", "Dimensions": dimensions, "Timestamp": stamp, "Value": 3.0},
            ],
        )
        evaluator = AlarmEvaluator(cloudwatch, sns)
        assert evaluator.evaluate([alarm["AlarmName"]], now=minute + 61) == {alarm["AlarmName"]: "ALARM"}
        body = json.loads(sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2)["Messages"][0]["Body"])
        message = json.loads(body["Message"])
        assert message["NewStateValue"] == "ALARM" and "30.0" in message["NewStateReason"]
        assert [q["Id"] for q in message["Trigger"]["Metrics"]] == ["share", "errors", "requests"]
        # The next minute, 1 of 10 (10%): back to OK.
        later = minute + 60
        stamp2 = datetime.fromtimestamp(later + 1, UTC)
        cloudwatch.put_metric_data(
            Namespace="AWS/ApiGateway",
            MetricData=[
                {"MetricName": "Count", "Dimensions": dimensions, "Timestamp": stamp2, "Value": 10.0},
                {"MetricName": "4XXError", "Dimensions": dimensions, "Timestamp": stamp2, "Value": 1.0},
            ],
        )
        assert evaluator.evaluate([alarm["AlarmName"]], now=later + 61) == {alarm["AlarmName"]: "OK"}
    finally:
        cloudwatch.delete_alarms(AlarmNames=[alarm["AlarmName"]])
        sns.unsubscribe(SubscriptionArn=subscription)  # the topic is the other tests' too
        sqs.delete_queue(QueueUrl=queue)


def zipped(source: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("handler.py", source)
    return buffer.getvalue()


WORKING = 'def handler(event, context):\n    return {"statusCode": 200, "body": "{}"}\n'
# A bad deployment: the zip's handler cannot be imported (Runtime.ImportModuleError on AWS).
BROKEN = "import a_module_the_zip_does_not_carry\n\ndef handler(event, context):\n    return {}\n"


def post_count(standin: str) -> int:
    request = urllib.request.Request(
        f"{standin}/count",
        data=json.dumps({"image": ""}).encode(),
        headers={"Content-Type": "application/json", "x-api-key": API_KEY},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def operational_alarms(alerts, moto_endpoint):
    """The two stacks' alarms and dashboards in moto, with the drill's one-datapoint parameters; removed
    after the test (moto outlives it, and other tests read the same alerts queue)."""
    stacks = rendered_stacks(DRILL)
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    names = stack_alarms.create(cloudwatch, stacks)
    yield names
    stack_alarms.delete(cloudwatch, stacks)


def wait_for_alarms(alerts, wanted: set[str], oks: set[str], timeout: float = 60) -> dict[str, dict]:
    """alarm name -> the first ALARM notification of each wanted alarm (the alarms notified OK are added
    to `oks`); every notification seen is checked to be CloudWatch's JSON."""
    found: dict[str, dict] = {}
    deadline = time.time() + timeout
    while not wanted <= set(found) and time.time() < deadline:
        for envelope in alerts():
            message = json.loads(envelope["Message"])
            assert envelope["Subject"] == notifications.subject(
                message["AlarmName"], message["NewStateValue"], "us-east-1"
            )
            if message["NewStateValue"] == "ALARM":
                found.setdefault(message["AlarmName"], message)
            elif message["NewStateValue"] == "OK":
                oks.add(message["AlarmName"])
    return found


@pytest.mark.standin_args("--alarm-interval", "1")
def test_a_broken_api_function_raises_its_alarms_and_the_alert_arrives(
    standin, alerts, operational_alarms, pipeline_stack, moto_endpoint
):
    function = LOCAL_STACK_PARAMETERS["FunctionName"]
    aws_lambda = boto3.client("lambda", endpoint_url=standin["endpoint"], region_name="us-east-1")
    aws_lambda.create_function(
        FunctionName=function,
        Runtime="python3.12",
        Handler="handler.handler",
        Role=pipeline_stack.roles["ApiFunctionRole"]["arn"],
        Code={"ZipFile": zipped(WORKING)},
    )
    assert post_count(standin["endpoint"]) == 200
    errors, api_5xx = f"ops-{function}-errors", f"ops-{function}-local-api-5xx"
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    # Every new alarm's first evaluation first (as CloudWatch's would be, minutes before a real incident):
    # moto creates an alarm in OK before the fixture sets INSUFFICIENT_DATA, and an evaluation that read
    # it in between leaves it there one more round. An earlier test's failures in the last closed minute
    # (moto's metrics outlive a test) keep an alarm in ALARM until that minute leaves its one period.
    deadline = time.time() + 150
    while True:
        described = cloudwatch.describe_alarms(AlarmNames=list(operational_alarms))["MetricAlarms"]
        states = {alarm["AlarmName"]: alarm["StateValue"] for alarm in described}
        if set(states.values()) == {"OK"}:
            break
        assert time.time() < deadline, f"the alarm loop did not evaluate every new alarm: {states}"
        time.sleep(0.5)
    # What those first evaluations notified (such an ALARM and its OK included) is not the drill's.
    oks: set[str] = set()
    while before := [json.loads(envelope["Message"]) for envelope in alerts()]:
        oks |= {message["AlarmName"] for message in before if message["NewStateValue"] == "OK"}
    aws_lambda.update_function_code(FunctionName=function, ZipFile=zipped(BROKEN))
    assert [post_count(standin["endpoint"]) for _ in range(3)] == [502, 502, 502]

    raised = wait_for_alarms(alerts, {errors, api_5xx}, oks)
    assert set(raised) >= {errors, api_5xx}, f"alarms raised: {sorted(raised)}"
    message = raised[errors]
    assert message["OldStateValue"] == "OK"  # a quiet function was OK before the drill
    assert oks >= set(operational_alarms), "every new alarm's first evaluation is notified"
    assert "docs/operations.md#api-function-errors" in message["AlarmDescription"]
    assert re.match(r"Threshold Crossed: 1 out of the last 1 datapoints \[[123]\.0 \(", message["NewStateReason"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", message["StateChangeTime"])
    assert message["Trigger"]["Namespace"] == "AWS/Lambda" and message["Trigger"]["MetricName"] == "Errors"
    assert message["Trigger"]["Dimensions"] == [{"value": function, "name": "FunctionName"}]
    assert "docs/operations.md#api-5xx-errors" in raised[api_5xx]["AlarmDescription"]

    # What the alarms watched is what the local stack published, as AWS names it.
    for namespace in ("AWS/Lambda", "AWS/ApiGateway"):
        listed = cloudwatch.list_metrics(Namespace=namespace)["Metrics"]
        seen = {(m["MetricName"], frozenset(d["Name"] for d in m["Dimensions"])) for m in listed}
        assert seen >= {(name, frozenset(dims)) for name, dims in PUBLISHED[namespace].items()}
    aws_lambda.delete_function(FunctionName=function)
