"""The templates' alarms and dashboards in the local stack: infra/pipeline.yaml's and
lambda/template.yaml's AWS::CloudWatch::Alarm and AWS::CloudWatch::Dashboard resources, rendered as
CloudFormation would create them (`standin.iam.render`) and made with the calls CloudFormation makes
(PutMetricAlarm, PutDashboard) on moto, where the stand-in's alarm loop evaluates them. No
CloudFormation runs locally; this is what deploying the two stacks would leave in CloudWatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from standin import iam
from standin.gateway import LOCAL_STAGE
from standin.launch import LOCAL_STACK_PARAMETERS

API_TEMPLATE = iam.ROOT / "lambda" / "template.yaml"
INTEGERS = ("Period", "EvaluationPeriods", "DatapointsToAlarm")
# AWS::CloudWatch::Alarm properties that PutMetricAlarm takes as they are (the rest are numbers).
PASSED = (
    "AlarmName",
    "AlarmDescription",
    "Namespace",
    "MetricName",
    "Dimensions",
    "Statistic",
    "ExtendedStatistic",
    "Unit",
    "ComparisonOperator",
    "TreatMissingData",
    "AlarmActions",
    "OKActions",
    "InsufficientDataActions",
    "ActionsEnabled",
)


def api_stack(alerts_topic_arn: str, parameters: Mapping[str, str] | None = None) -> iam.Stack:
    """lambda/template.yaml as the local stack would deploy it: the pipeline stack's endpoint and
    function names, the local gateway's stage, and the alerts topic; `parameters` override."""
    local = {
        "EndpointName": LOCAL_STACK_PARAMETERS["EndpointName"],
        "FunctionName": LOCAL_STACK_PARAMETERS["FunctionName"],
        "StageName": LOCAL_STAGE,
        "AlertsTopicArn": alerts_topic_arn,
        **(parameters or {}),
    }
    return iam.render(iam.load_template(API_TEMPLATE), local)


def _metric_query(query: Mapping) -> dict:
    if "MetricStat" not in query:
        return dict(query)
    stat = dict(query["MetricStat"])
    stat["Period"] = int(stat["Period"])
    return {**query, "MetricStat": stat}


def put_metric_alarm_request(properties: Mapping) -> dict:
    """PutMetricAlarm's arguments for a rendered AWS::CloudWatch::Alarm (CloudFormation passes its
    properties through; parameters render as text, the API wants numbers)."""
    request = {k: properties[k] for k in PASSED if k in properties}
    request.update({k: int(properties[k]) for k in INTEGERS if k in properties})
    request["Threshold"] = float(properties["Threshold"])
    if "Metrics" in properties:
        request["Metrics"] = [_metric_query(q) for q in properties["Metrics"]]
    return request


def create(cloudwatch, stacks: Iterable[iam.Stack]) -> list[str]:
    """Create (or update) every alarm and dashboard of `stacks` through `cloudwatch`; the alarm names.
    A new alarm starts in INSUFFICIENT_DATA, as on CloudWatch (moto starts it in OK), so that its first
    evaluation is a state change, notified as CloudWatch notifies it."""
    names = []
    for stack in stacks:
        for properties in stack.alarms.values():
            request = put_metric_alarm_request(properties)
            name = request["AlarmName"]
            new = not cloudwatch.describe_alarms(AlarmNames=[name])["MetricAlarms"]
            cloudwatch.put_metric_alarm(**request)
            if new:
                cloudwatch.set_alarm_state(
                    AlarmName=name, StateValue="INSUFFICIENT_DATA", StateReason="Unchecked: Initial alarm creation"
                )
            names.append(name)
        for dashboard in stack.dashboards.values():
            cloudwatch.put_dashboard(DashboardName=dashboard["DashboardName"], DashboardBody=dashboard["DashboardBody"])
    return names


def delete(cloudwatch, stacks: Iterable[iam.Stack]) -> None:
    """Delete what `create` made (as deleting the stacks would)."""
    stacks = list(stacks)
    alarms = [p["AlarmName"] for stack in stacks for p in stack.alarms.values()]
    dashboards = [d["DashboardName"] for stack in stacks for d in stack.dashboards.values()]
    if alarms:
        cloudwatch.delete_alarms(AlarmNames=alarms)
    if dashboards:
        cloudwatch.delete_dashboards(DashboardNames=dashboards)
