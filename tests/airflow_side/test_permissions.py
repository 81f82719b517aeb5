"""infra/pipeline.yaml: valid under cfn-lint, least privilege, and exactly what the DAGs were recorded doing.

Every test that runs the DAGs against the local stack already holds each call it made against these
policies (the `permitted_calls_only` fixture). Here: the ledger of those calls and the policies agree
both ways (nothing used is missing, nothing granted is unused), the grants are scoped, the outputs are
what the Airflow Variables need, and the policy evaluation itself refuses what IAM refuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from standin import iam, sar
from standin.aws_calls import WORKER_ACCESS_KEY_ID, CallLog, read_calls
from tests.airflow_side.conftest import ENDPOINT

CFN_LINT = Path(sys.executable).with_name("cfn-lint")


@pytest.fixture(scope="module")
def template() -> dict:
    return iam.load_template()


@pytest.fixture(scope="module")
def ledger() -> dict:
    return iam.load_ledger()


def test_the_pipeline_template_passes_cfn_lint():
    result = subprocess.run(
        [str(CFN_LINT), "--format", "parseable", str(iam.PIPELINE_TEMPLATE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def documents_of(stack: iam.Stack, principal: str) -> list[dict]:
    logical = iam.PRINCIPALS[principal]
    if logical in stack.managed_policies:
        return iam.worker_documents(stack)
    return stack.roles[logical]["policies"]


def test_every_recorded_action_is_granted_and_every_grant_is_recorded(pipeline_stack, ledger):
    for principal in iam.PRINCIPALS:
        granted = iam.granted_actions(documents_of(pipeline_stack, principal))
        assert not [a for a in granted if "*" in a], f"{principal}: no wildcard actions"
        used = set(ledger[principal])
        aws_only = set(ledger["aws-only"].get(principal, {}))
        assert used <= granted, f"{principal} is recorded doing what no policy grants: {sorted(used - granted)}"
        assert granted <= used | aws_only, (
            f"{principal} is granted what the DAGs never do: {sorted(granted - used - aws_only)}"
        )
        assert all(ledger[principal].values()), f"{principal}: every recorded action says why"


# AWS's reference lets ListModelPackages be scoped to a model package, an optional type its request never
# names (it names a group, which the reference does not list for it): AWS can only authorise it on "*".
UNNAMED_BY_THE_REQUEST = {"sagemaker:ListModelPackages"}


def test_a_list_call_scoped_only_by_what_its_request_never_names_is_recorded_on_every_resource():
    from standin.sagemaker.responses import authorizations

    assert sar.resource_types("sagemaker:ListModelPackages") == {"model-package": False}
    request = {"ModelPackageGroupName": "bin-counter", "ModelApprovalStatus": "Approved", "SortOrder": "Descending"}
    assert authorizations("ListModelPackages", request) == [("sagemaker:ListModelPackages", "*")]


def test_grants_are_scoped_to_the_bucket_prefixes_and_the_project_names(pipeline_stack):
    bucket = pipeline_stack.outputs["BucketName"]
    assert bucket == "bin-counter-000000000000-us-east-1", "the default name carries the account and region"
    for principal in iam.PRINCIPALS:
        for document in documents_of(pipeline_stack, principal):
            for statement in iam.statements(document):
                assert statement["Effect"] == "Allow" and "NotAction" not in statement
                for resource in iam.as_list(statement["Resource"]):
                    if resource.startswith("arn:aws:s3:::"):
                        assert resource.removeprefix("arn:aws:s3:::").split("/")[0] == bucket, resource
                        assert not resource.endswith(f"{bucket}/*"), (
                            f"{resource}: objects are granted by prefix, never the whole bucket"
                        )
                    elif resource == "*":
                        # Only actions IAM cannot scope: AWS's reference lists no resource type for them,
                        # or only types their request never names.
                        actions = iam.as_list(statement["Action"])
                        scopable = [a for a in actions if sar.resource_types(a) and a not in UNNAMED_BY_THE_REQUEST]
                        assert not scopable, f"{principal}: {scopable} on every resource"


def test_the_roles_trust_only_their_service_and_the_workers_pass_only_them(pipeline_stack):
    trusted = {logical: role["trust"]["Statement"][0]["Principal"] for logical, role in pipeline_stack.roles.items()}
    assert trusted == {
        "SageMakerExecutionRole": {"Service": "sagemaker.amazonaws.com"},
        "ApiFunctionRole": {"Service": "lambda.amazonaws.com"},
    }
    worker = documents_of(pipeline_stack, "airflow-worker")
    sagemaker_role = pipeline_stack.outputs["SageMakerRoleArn"]
    function_role = pipeline_stack.outputs["ApiFunctionRoleArn"]
    to = {"iam:PassedToService": "sagemaker.amazonaws.com"}
    assert iam.is_allowed(worker, "iam:PassRole", sagemaker_role, to)
    assert not iam.is_allowed(worker, "iam:PassRole", sagemaker_role, {"iam:PassedToService": "lambda.amazonaws.com"})
    assert not iam.is_allowed(worker, "iam:PassRole", sagemaker_role)  # no service named: no pass
    assert iam.is_allowed(worker, "iam:PassRole", function_role, {"iam:PassedToService": "lambda.amazonaws.com"})
    assert not iam.is_allowed(worker, "iam:PassRole", "arn:aws:iam::000000000000:role/Admin", to)


def test_the_outputs_are_the_variables_the_dags_read(pipeline_stack):
    from bin_counter.account import sagemaker_settings

    variable = json.loads(pipeline_stack.outputs["SageMakerVariable"])
    settings = sagemaker_settings(variable, pipeline_stack.outputs["Region"])
    assert settings["role_arn"] == pipeline_stack.outputs["SageMakerRoleArn"]
    assert settings["lambda_role_arn"] == pipeline_stack.outputs["ApiFunctionRoleArn"]
    assert pipeline_stack.outputs["AlertsTopicArn"] == "arn:aws:sns:us-east-1:000000000000:bc-local-alerts"
    # Every worker policy is an output to attach.
    arns = {pipeline_stack.managed_policies[logical]["arn"] for logical in iam.WORKER_POLICIES}
    assert arns == {pipeline_stack.outputs["WorkerPolicyArn"], pipeline_stack.outputs["WorkerScalingPolicyArn"]}


def test_the_api_stack_defaults_to_this_stacks_names(template):
    parameters = template["Parameters"]
    api = iam.load_template(iam.ROOT / "lambda" / "template.yaml")["Parameters"]
    assert api["EndpointName"]["Default"] == parameters["EndpointName"]["Default"]
    assert api["FunctionName"]["Default"] == parameters["FunctionName"]["Default"]


WORKER = documents_of(iam.render(iam.load_template()), "airflow-worker")
ARN = "arn:aws:sagemaker:us-east-1:000000000000"


@pytest.mark.parametrize(
    ("action", "resource", "allowed"),
    [
        ("s3:PutObject", "arn:aws:s3:::bin-counter-000000000000-us-east-1/datasets/v1/dataset.json", True),
        ("S3:putobject", "arn:aws:s3:::bin-counter-000000000000-us-east-1/datasets/v1/dataset.json", True),  # any case
        ("s3:PutObject", "arn:aws:s3:::bin-counter-000000000000-us-east-1/elsewhere/x", False),
        ("s3:PutObject", "arn:aws:s3:::someone-elses-bucket/datasets/v1/dataset.json", False),
        ("s3:DeleteObject", "arn:aws:s3:::bin-counter-000000000000-us-east-1/datasets/v1/dataset.json", False),
        ("s3:DeleteBucket", "arn:aws:s3:::bin-counter-000000000000-us-east-1", False),
        ("sagemaker:CreateTrainingJob", f"{ARN}:training-job/bin-counter-0123456789ab-final", True),
        ("sagemaker:CreateTrainingJob", f"{ARN}:training-job/another-teams-job", False),
        ("sagemaker:DeleteEndpoint", f"{ARN}:endpoint/bin-counter", True),
        ("sagemaker:DeleteEndpoint", f"{ARN}:endpoint/production-fraud-model", False),
        ("sagemaker:InvokeEndpoint", f"{ARN}:endpoint/bin-counter-other", False),
        ("lambda:DeleteFunction", "arn:aws:lambda:us-east-1:000000000000:function:bin-counter-api", False),
    ],
)
def test_the_evaluation_refuses_what_iam_refuses(action, resource, allowed):
    assert iam.is_allowed(WORKER, action, resource) is allowed


def test_an_explicit_deny_wins_and_unknown_conditions_are_not_waved_through():
    allow = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    deny = {"Statement": {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "arn:aws:s3:::b/*"}}
    assert iam.is_allowed([allow], "s3:DeleteObject", "arn:aws:s3:::b/k")
    assert not iam.is_allowed([allow, deny], "s3:DeleteObject", "arn:aws:s3:::b/k")
    ip_bound = {
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": "*",
                "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
            }
        ]
    }
    with pytest.raises(ValueError, match="IpAddress is not evaluated here"):
        iam.is_allowed([ip_bound], "s3:GetObject", "arn:aws:s3:::b/k")


def test_a_call_without_its_permission_fails_the_check(tmp_path, pipeline_stack, ledger):
    """What the per-test check does with a new boto3 call: not in the ledger, or not granted, fails."""
    log = tmp_path / "calls.jsonl"
    calls = CallLog(log)
    bucket = pipeline_stack.outputs["BucketName"]
    calls.record(WORKER_ACCESS_KEY_ID, [("s3:GetObject", "arn:aws:s3:::test-bucket/datasets/v1/dataset.json")], "moto")
    calls.record("testing", [("iam:CreateUser", "*")], "moto")  # the tests' own calls are nobody's
    assert (
        iam.refused_calls(read_calls(log), pipeline_stack, WORKER_ACCESS_KEY_ID, ledger, {"test-bucket": bucket}) == []
    )
    calls.record(
        WORKER_ACCESS_KEY_ID, [("sagemaker:CreateProcessingJob", f"{ARN}:processing-job/bin-counter-x")], "standin"
    )
    calls.record(WORKER_ACCESS_KEY_ID, [("s3:PutObject", "arn:aws:s3:::test-bucket/elsewhere/x")], "moto")
    role = pipeline_stack.outputs["ApiFunctionRoleArn"]
    calls.record(role, [("sagemaker:InvokeEndpoint", f"{ARN}:endpoint/another-endpoint")], "standin")
    refused = iam.refused_calls(read_calls(log), pipeline_stack, WORKER_ACCESS_KEY_ID, ledger, {"test-bucket": bucket})
    assert len(refused) == 3, refused
    new_call, wrong_prefix, other_endpoint = (
        next(r for r in refused if text in r)
        for text in (
            "airflow-worker: sagemaker:CreateProcessingJob is not in infra/aws-actions.json",
            "airflow-worker: s3:PutObject would be refused on AWS",
            "api-function-role: sagemaker:InvokeEndpoint would be refused",
        )
    )
    assert wrong_prefix.endswith(f"e.g. arn:aws:s3:::{bucket}/elsewhere/x")
    assert other_endpoint.endswith(f"{ARN}:endpoint/another-endpoint") and new_call


def test_the_settings_task_refuses_a_missing_a_foreign_or_a_distant_bucket(s3, bucket, moto_endpoint):
    import boto3
    from botocore.exceptions import ClientError

    from bin_counter.account import SettingsError, check_bucket

    assert check_bucket(s3, bucket, "us-east-1") == "us-east-1"
    with pytest.raises(
        SettingsError,
        match=r"does not exist: deploy infra/pipeline\.yaml and set the bucket "
        r"Param to its output BucketName",
    ):
        check_bucket(s3, "bin-counter-no-such-bucket", "us-east-1")
    distant = boto3.client("s3", endpoint_url=moto_endpoint, region_name="eu-west-1")
    distant.create_bucket(Bucket=f"{bucket}-eu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with pytest.raises(
        SettingsError,
        match=rf"{bucket}-eu is in eu-west-1, but the Airflow connection's region "
        r"is us-east-1: SageMaker jobs read their data from their own region",
    ):
        check_bucket(s3, f"{bucket}-eu", "us-east-1")

    class Foreign:  # what S3 answers for a bucket name that another account holds
        def head_bucket(self, Bucket):
            raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")

    with pytest.raises(SettingsError, match="may be someone else's"):
        check_bucket(Foreign(), "bin-counter", "us-east-1")


def test_sagemaker_and_lambda_refuse_a_role_they_cannot_assume(standin, pipeline_stack, job_inputs):
    """The first real run's old failure: the DAG gave the Lambda function the SageMaker role, which Lambda
    refuses (its trust policy names SageMaker only), after the endpoint had already switched."""
    import boto3
    from botocore.exceptions import ClientError

    from bin_counter.api_function import function_zip
    from tests.airflow_side.conftest import job_config

    aws_lambda = boto3.client("lambda", endpoint_url=standin["endpoint"], region_name="us-east-1")
    sm = boto3.client("sagemaker", endpoint_url=standin["endpoint"], region_name="us-east-1")
    sagemaker_role, function_role = (pipeline_stack.outputs[k] for k in ("SageMakerRoleArn", "ApiFunctionRoleArn"))
    missing = "arn:aws:iam::000000000000:role/never-created"
    for role in (sagemaker_role, missing):
        with pytest.raises(ClientError, match="The role defined for the function cannot be assumed by Lambda"):
            aws_lambda.create_function(
                FunctionName="api",
                Runtime="python3.12",
                Role=role,
                Handler="handler.handler",
                Code={"ZipFile": function_zip()},
            )
    for role in (function_role, missing):
        with pytest.raises(
            ClientError,
            match=rf"Could not assume role {role}\. Please ensure that the role exists "
            r"and allows principal 'sagemaker\.amazonaws\.com'",
        ):
            sm.create_training_job(**{**job_config(job_inputs, "refused-role"), "RoleArn": role})
        with pytest.raises(ClientError, match="Could not assume role"):
            sm.create_model(
                ModelName="refused",
                ExecutionRoleArn=role,
                PrimaryContainer={"Image": "local", "ModelDataUrl": "s3://b/m.tar.gz"},
            )
    assert not sm.list_training_jobs()["TrainingJobSummaries"]  # refused at the request: nothing ran
    created = aws_lambda.create_function(
        FunctionName="api",
        Runtime="python3.12",
        Role=function_role,
        Handler="handler.handler",
        Code={"ZipFile": function_zip()},
    )
    assert created["Role"] == function_role


def test_repointing_an_existing_function_is_allowed_to_the_worker(standin, pipeline_stack, worker_client):
    """api_function's other path (a function that serves another endpoint is repointed), made with the
    worker's rights so that its calls are held against the worker's policy."""
    from bin_counter.api_function import ensure_function

    aws_lambda = worker_client("lambda", standin["endpoint"])
    role, function = pipeline_stack.outputs["ApiFunctionRoleArn"], pipeline_stack.outputs["FunctionName"]
    endpoint = pipeline_stack.outputs["EndpointName"]
    ensure_function(aws_lambda, function, "bin-counter-old", role)
    ensure_function(aws_lambda, function, endpoint, role)
    variables = aws_lambda.get_function(FunctionName=function)["Configuration"]["Environment"]["Variables"]
    assert variables["ENDPOINT_NAME"] == endpoint


# AWS's Service Authorization Reference (standin/sar.py) decides which actions exist, which resource types
# each is authorised on, and which condition keys it takes: the ledger, the grants and the call log are
# held against it, not against our reading of AWS's documentation.


def test_every_ledger_action_and_every_grant_is_one_aws_lists(pipeline_stack, ledger):
    recorded = {a for principal in iam.PRINCIPALS for a in ledger[principal]}
    recorded |= {a for actions in ledger["aws-only"].values() for a in actions}
    assert [a for a in sorted(recorded) if sar.privilege(a) is None] == []
    for principal in iam.PRINCIPALS:
        assert iam.grant_problems(documents_of(pipeline_stack, principal)) == [], principal


def test_a_misspelt_action_a_wrong_resource_type_and_an_unknown_condition_key_are_caught():
    def grant(action, resource, condition=None):
        statement = {"Sid": "S", "Effect": "Allow", "Action": action, "Resource": resource}
        return iam.grant_problems([{"Statement": [{**statement, **({"Condition": condition} if condition else {})}]}])

    assert grant("sagemaker:CreateEndpoint", f"{ARN}:endpoint-config/bin-counter-*") == []
    assert "it spells it sagemaker:CreateEndpoint" in grant("sagemaker:createEndpoint", f"{ARN}:endpoint/x")[0]
    assert "no action in AWS's Service Authorization Reference" in grant("sagemaker:CreateEndpoints", "*")[0]
    wrong_type = grant("sagemaker:CreateModel", f"{ARN}:endpoint-config/bin-counter-*")
    assert wrong_type == [
        f"S: {ARN}:endpoint-config/bin-counter-* matches no ARN of a resource type sagemaker:CreateModel "
        "is authorised on (['model'])"
    ]
    assert grant("s3:ListBucket", "arn:aws:s3:::bucket/datasets/*"), "objects are no bucket"
    assert "grant it on" in grant("sagemaker:ListModels", f"{ARN}:model/*")[0]
    role = "arn:aws:iam::000000000000:role/r"
    assert grant("iam:PassRole", role, {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}) == []
    assert "no condition key of iam:PassRole" in grant("iam:PassRole", role, {"StringEquals": {"iam:PassedTo": "x"}})[0]


def without_statement(template: dict, sid: str | tuple[str, ...], stack: iam.Stack) -> iam.Stack:
    """The stack rendered from `template` without the worker policy's statement `sid` (or statements),
    with `stack`'s names."""
    import copy

    sids = {sid} if isinstance(sid, str) else set(sid)
    changed = copy.deepcopy(template)
    document = changed["Resources"]["AirflowWorkerPolicy"]["Properties"]["PolicyDocument"]
    document["Statement"] = [s for s in document["Statement"] if s.get("Sid") not in sids]
    names = {name: stack.outputs[name] for name in ("EndpointName", "FunctionName") if name in stack.outputs}
    return iam.render(changed, names)


def test_deploying_is_authorised_on_the_endpoint_and_its_configuration(tmp_path, template, pipeline_stack, ledger):
    """F2: AWS authorises CreateEndpoint and UpdateEndpoint on the endpoint configuration too (both
    resource types required in AWS's reference); the call log names both, and the worker may use both."""
    from standin.sagemaker.responses import authorizations

    endpoint = pipeline_stack.outputs["EndpointName"]
    request = {"EndpointName": endpoint, "EndpointConfigName": "bin-counter-0123456789ab-Config"}
    for operation in ("CreateEndpoint", "UpdateEndpoint"):
        assert authorizations(operation, request) == [
            (f"sagemaker:{operation}", f"{ARN}:endpoint/{endpoint}"),
            (f"sagemaker:{operation}", f"{ARN}:endpoint-config/bin-counter-0123456789ab-config"),
        ]
    log = tmp_path / "calls.jsonl"
    CallLog(log).record(WORKER_ACCESS_KEY_ID, lambda: authorizations("UpdateEndpoint", request), "standin")
    assert iam.refused_calls(read_calls(log), pipeline_stack, WORKER_ACCESS_KEY_ID, ledger) == []
    before = without_statement(template, "ServeTheEndpointsConfigurations", pipeline_stack)  # before the fix
    refused = iam.refused_calls(read_calls(log), before, WORKER_ACCESS_KEY_ID, ledger)
    assert refused == [
        "airflow-worker: sagemaker:UpdateEndpoint would be refused on AWS (AccessDenied): infra/pipeline.yaml "
        f"does not allow it; 1 resource(s), e.g. {ARN}:endpoint-config/bin-counter-0123456789ab-config"
    ]


def test_the_registry_is_authorised_on_its_group_and_its_versions(tmp_path, template, pipeline_stack, ledger):
    """The Model Registry calls the DAGs make (common35.md's interface 3), recorded on the resources AWS's
    reference names for them: the group for CreateModelPackageGroup, DescribeModelPackageGroup and
    CreateModelPackage (the version does not exist yet; the reference lists the group as its resource),
    the version's ARN, model-package/<group>/<version> in lowercase, for the calls that name a version."""
    from standin.sagemaker.responses import authorizations

    group, version = f"{ENDPOINT}-Models", f"{ARN}:model-package/{ENDPOINT}-models/3"
    calls = [
        ("CreateModelPackageGroup", {"ModelPackageGroupName": group}),
        ("DescribeModelPackageGroup", {"ModelPackageGroupName": group}),
        ("CreateModelPackage", {"ModelPackageGroupName": group, "ModelApprovalStatus": "PendingManualApproval"}),
        ("DescribeModelPackage", {"ModelPackageName": version}),
        ("ListModelPackages", {"ModelPackageGroupName": group, "ModelApprovalStatus": "Approved"}),
        ("UpdateModelPackage", {"ModelPackageArn": version, "ModelApprovalStatus": "Approved"}),
    ]
    recorded = [entry for operation, request in calls for entry in authorizations(operation, request)]
    group_arn = f"{ARN}:model-package-group/{ENDPOINT}-models"
    assert [resource for _, resource in recorded] == [group_arn, group_arn, group_arn, version, "*", version]
    assert all(sar.resource_problem(action, resource) is None for action, resource in recorded)
    log = tmp_path / "calls.jsonl"
    CallLog(log).record(WORKER_ACCESS_KEY_ID, recorded, "standin")
    assert iam.refused_calls(read_calls(log), pipeline_stack, WORKER_ACCESS_KEY_ID, ledger) == []
    before = without_statement(
        template, ("KeepTheModelRegistry", "RegisterApproveAndReadModelVersions"), pipeline_stack
    )
    refused = iam.refused_calls(read_calls(log), before, WORKER_ACCESS_KEY_ID, ledger)
    assert [line.split(" would be refused")[0] for line in refused] == [
        f"airflow-worker: sagemaker:{operation}"
        for operation in sorted(
            (
                "CreateModelPackageGroup",
                "DescribeModelPackageGroup",
                "CreateModelPackage",
                "DescribeModelPackage",
                "UpdateModelPackage",
            )
        )
    ]
    # Another project's registry stays out of reach.
    worker = documents_of(pipeline_stack, "airflow-worker")
    assert not iam.is_allowed(worker, "sagemaker:UpdateModelPackage", f"{ARN}:model-package/other-models/1")


def test_the_endpoints_alarms_are_recorded_on_their_arns_and_granted(
    tmp_path, moto_endpoint, aws_call_log, template, pipeline_stack, ledger
):
    """CloudWatch's calls, as boto3 sends them (RPC v2 CBOR since botocore 1.37, signed as "monitoring"),
    reach the call log as IAM names them: cloudwatch:<Operation> on alarm:<name> for each alarm named,
    as AWS's reference requires. The worker may define, read and delete its endpoint's alarms only."""
    import boto3

    from standin.moto_server import query_actions

    endpoint = pipeline_stack.outputs["EndpointName"]
    names = [f"{endpoint}-invocation-5xx-errors", f"{endpoint}-model-latency"]
    cloudwatch = boto3.client(
        "cloudwatch",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id=WORKER_ACCESS_KEY_ID,
        aws_secret_access_key="local",
    )
    start = aws_call_log.stat().st_size if aws_call_log.exists() else 0
    for name, metric, statistic in zip(names, ("Invocation5XXErrors", "ModelLatency"), ("Sum", "Average"), strict=True):
        cloudwatch.put_metric_alarm(
            AlarmName=name,
            Namespace="AWS/SageMaker",
            MetricName=metric,
            Dimensions=[{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": "AllTraffic"}],
            Statistic=statistic,
            Period=60,
            EvaluationPeriods=1,
            DatapointsToAlarm=1,
            Threshold=1,
            ComparisonOperator="GreaterThanOrEqualToThreshold",
            TreatMissingData="notBreaching",
        )
    assert [a["AlarmName"] for a in cloudwatch.describe_alarms(AlarmNames=names)["MetricAlarms"]] == sorted(names)
    cloudwatch.delete_alarms(AlarmNames=names)
    calls = [c for c in read_calls(aws_call_log, start) if c["caller"] == WORKER_ACCESS_KEY_ID]
    arns = [f"arn:aws:cloudwatch:us-east-1:000000000000:alarm:{name}" for name in names]
    assert [(c["action"], c["resource"]) for c in calls] == [
        ("cloudwatch:PutMetricAlarm", arns[0]),
        ("cloudwatch:PutMetricAlarm", arns[1]),
        ("cloudwatch:DescribeAlarms", arns[0]),
        ("cloudwatch:DescribeAlarms", arns[1]),
        ("cloudwatch:DeleteAlarms", arns[0]),
        ("cloudwatch:DeleteAlarms", arns[1]),
    ]
    assert iam.refused_calls(calls, pipeline_stack, WORKER_ACCESS_KEY_ID, ledger) == []
    before = without_statement(template, "DefineTheEndpointsAlarms", pipeline_stack)
    refused = iam.refused_calls(calls, before, WORKER_ACCESS_KEY_ID, ledger)
    assert [line.split(" would be refused")[0] for line in refused] == [
        "airflow-worker: cloudwatch:DeleteAlarms",
        "airflow-worker: cloudwatch:DescribeAlarms",
        "airflow-worker: cloudwatch:PutMetricAlarm",
    ]
    # The Query protocol (older SDKs, the CLI) is read the same way; a DescribeAlarms naming no alarm is
    # recorded on "*", which the check refuses: AWS requires the alarm.
    form = {"Action": ["DescribeAlarms"], "AlarmNames.member.2": [names[1]], "AlarmNames.member.1": [names[0]]}
    assert query_actions("cloudwatch", form) == [("cloudwatch:DescribeAlarms", arn) for arn in arns]
    unnamed = query_actions("cloudwatch", {"Action": ["DescribeAlarms"], "AlarmNamePrefix": [endpoint]})
    assert unnamed == [("cloudwatch:DescribeAlarms", "*")]
    assert "does not name (*)" in sar.resource_problem("cloudwatch:DescribeAlarms", "*")
    worker = documents_of(pipeline_stack, "airflow-worker")
    other = "arn:aws:cloudwatch:us-east-1:000000000000:alarm:another-endpoint-model-latency"
    assert not iam.is_allowed(worker, "cloudwatch:PutMetricAlarm", other)


def test_sagemaker_reads_the_rollback_alarms_with_the_execution_role(pipeline_stack, ledger):
    """Deployment guardrails: "Ensure that your IAM execution role has permission to perform the
    cloudwatch:DescribeAlarms action on the auto-rollback alarms you specify"
    (docs.aws.amazon.com/sagemaker/latest/dg/deployment-guardrails-configuration.html). SageMaker does it on
    AWS, so the ledger lists it as AWS-only."""
    endpoint = pipeline_stack.outputs["EndpointName"]
    role = documents_of(pipeline_stack, "sagemaker-execution-role")
    alarm = f"arn:aws:cloudwatch:us-east-1:000000000000:alarm:{endpoint}-invocation-5xx-errors"
    assert sar.resource_problem("cloudwatch:DescribeAlarms", alarm) is None
    assert iam.is_allowed(role, "cloudwatch:DescribeAlarms", alarm)
    assert not iam.is_allowed(role, "cloudwatch:DescribeAlarms", alarm.replace(endpoint, "another-endpoint"))
    assert not iam.is_allowed(role, "cloudwatch:PutMetricAlarm", alarm)
    # The stand-in reads them so during a rollout (the call log records it under this role).
    assert "cloudwatch:DescribeAlarms" in ledger["sagemaker-execution-role"]


def test_a_required_resource_the_request_does_not_name_fails_the_check(tmp_path, pipeline_stack, ledger):
    from standin.sagemaker.responses import authorizations

    log = tmp_path / "calls.jsonl"
    unnamed = authorizations("UpdateEndpoint", {"EndpointName": pipeline_stack.outputs["EndpointName"]})
    assert unnamed[1] == ("sagemaker:UpdateEndpoint", "*")
    CallLog(log).record(WORKER_ACCESS_KEY_ID, unnamed, "standin")
    CallLog(log).record(WORKER_ACCESS_KEY_ID, [("iam:PassRole", "arn:aws:iam::0:role/r", {"iam:PassedTo": "x"})], "s")
    refused = iam.refused_calls(read_calls(log), pipeline_stack, WORKER_ACCESS_KEY_ID, ledger)
    assert len(refused) == 2, refused
    assert refused[0].startswith(
        "airflow-worker: the call log disagrees with AWS's Service Authorization Reference: iam:PassedTo is no "
        "condition key of iam:PassRole"
    )
    assert refused[1].startswith(
        "airflow-worker: the call log disagrees with AWS's Service Authorization Reference: sagemaker:UpdateEndpoint "
        "is authorised on its endpoint and its endpoint-config, which the call log does not name (*)"
    )


def served_sagemaker_operations() -> list[str]:
    from standin.sagemaker.responses import SageMakerResponse

    return [name.removeprefix("op_") for name in dir(SageMakerResponse) if name.startswith("op_")] + ["InvokeEndpoint"]


def test_every_served_request_names_each_resource_aws_requires_and_hands_roles_as_aws_lists():
    """For every operation the stand-in serves, each resource type AWS's reference requires is named by a
    field of the request (botocore's input shape), so the call log can build its ARN; and the operations
    whose resources AWS lists iam:PassRole for are the ones whose role is recorded as passed."""
    import botocore.session

    from standin.awslambda.responses import OPERATIONS
    from standin.sagemaker.responses import PASSED_ROLES

    session = botocore.session.get_session()
    services = {"sagemaker": session.get_service_model("sagemaker"), "lambda": session.get_service_model("lambda")}
    runtime = session.get_service_model("sagemaker-runtime")
    operations = [("sagemaker", op) for op in served_sagemaker_operations()]
    operations += [("lambda", op) for op in sorted(set(OPERATIONS.values()))]
    for service, operation in operations:
        model = runtime if operation == "InvokeEndpoint" else services[service]
        api_name = {"InvokeFunction": "Invoke"}.get(operation, operation)  # lambda:InvokeFunction is Invoke's
        fields = {name.lower() for name in model.operation_model(api_name).input_shape.members}
        for kind in sar.required_types(f"{service}:{operation}"):
            variables = sar._VARIABLE.findall(sar.arn_format(f"{service}:{operation}", kind))
            named = [v for v in variables if v not in sar.PLACEMENT]
            assert all(v.lower() in fields for v in named), f"{operation} does not name its {kind} ({named})"
    passing = {op for _, op in operations if sar.dependent_types(f"sagemaker:{op}", "iam:PassRole")}
    assert passing == set(PASSED_ROLES)


def test_the_worker_may_list_sagemakers_quotas_as_the_call_log_records_them(pipeline_stack):
    from bin_counter.account import QUOTA_ACTIONS
    from standin.moto_server import json_actions

    worker = documents_of(pipeline_stack, "airflow-worker")
    for action in QUOTA_ACTIONS:  # what the settings task calls
        service, operation = action.split(":")
        # AWS's reference lists no resource type for them: recorded, and granted, on "*".
        assert json_actions(service, operation, {"ServiceCode": "sagemaker"}) == [(action, "*")]
        assert iam.is_allowed(worker, action, "*")
    # A call on one quota is recorded on the quota's ARN, built from the request as the reference writes it.
    quota = {"ServiceCode": "sagemaker", "QuotaCode": "L-1"}
    assert json_actions("servicequotas", "GetServiceQuota", quota) == [
        ("servicequotas:GetServiceQuota", "arn:aws:servicequotas:us-east-1:000000000000:sagemaker/L-1")
    ]


def test_the_bucket_refuses_plain_http_and_the_alerts_are_encrypted(pipeline_stack, template):
    (bucket_policy,) = pipeline_stack.bucket_policies.values()
    everything = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    bucket = pipeline_stack.outputs["BucketName"]
    for resource in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/datasets/v1/dataset.json"):
        assert not iam.is_allowed(
            [everything, bucket_policy], "s3:GetObject", resource, {"aws:SecureTransport": "false"}
        )
        assert iam.is_allowed([everything, bucket_policy], "s3:GetObject", resource, {"aws:SecureTransport": "true"})
    # The stack's own key: CloudWatch's alarms may use it (they cannot use SNS's AWS managed key), and the
    # account's principals through SNS only, as with the AWS managed key: no KMS grant for the worker.
    assert template["Resources"]["AlertsTopic"]["Properties"]["KmsMasterKeyId"] == {"Ref": "AlertsKey"}
    by_sid = {statement["Sid"]: statement for statement in pipeline_stack.key_policies["AlertsKey"]["Statement"]}
    assert by_sid["CloudWatchAlarmsPublish"]["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert set(by_sid["CloudWatchAlarmsPublish"]["Action"]) == {"kms:GenerateDataKey*", "kms:Decrypt"}
    assert by_sid["TheAccountPublishesThroughSns"]["Condition"]["StringEquals"] == {
        "kms:CallerAccount": "000000000000",
        "kms:ViaService": "sns.us-east-1.amazonaws.com",
    }
    assert not [a for a in iam.granted_actions(documents_of(pipeline_stack, "airflow-worker")) if a.startswith("kms:")]


def test_sagemakers_log_groups_expire_and_are_the_ones_its_role_writes(pipeline_stack):
    groups = pipeline_stack.log_groups.values()
    names = {group["LogGroupName"] for group in groups}
    endpoint_logs = f"/aws/sagemaker/Endpoints/{pipeline_stack.outputs['EndpointName']}"
    assert names == {"/aws/sagemaker/TrainingJobs", "/aws/sagemaker/TransformJobs", endpoint_logs}
    assert {group["RetentionInDays"] for group in groups} == {"30"}
    role = documents_of(pipeline_stack, "sagemaker-execution-role")
    for name in names:
        stream = f"arn:aws:logs:us-east-1:000000000000:log-group:{name}:log-stream:job/algo-1"
        assert iam.is_allowed(role, "logs:PutLogEvents", stream), name


def test_the_worker_policy_fits_iams_size_limit(pipeline_stack):
    # IAM refuses a managed policy over 6,144 characters, whitespace not counted (IAM and STS quotas).
    documents = documents_of(pipeline_stack, "airflow-worker")
    assert len(documents) == len(iam.WORKER_POLICIES)
    for document in documents:
        assert len(json.dumps(document, separators=(",", ":"))) <= 6144


def test_a_trust_policy_is_read_as_iam_matches_actions():
    from standin.roles import trusted_services

    def trust(action):
        statement = {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": action}
        return {"Version": "2012-10-17", "Statement": [statement]}

    # IAM matches actions case-insensitively and with wildcards: each of these lets SageMaker assume the role.
    for action in ("sts:AssumeRole", "STS:assumerole", "sts:*", ["sts:Assume*"]):
        assert trusted_services(trust(action)) == {"sagemaker.amazonaws.com"}, action
    assert trusted_services(trust("sts:AssumeRoleWithWebIdentity")) == set()


def test_the_sagemaker_budget_exists_only_with_an_address_to_warn(template):
    # W4: the endpoint bills around the clock; the budget e-mails before the month's SageMaker cost
    # passes what was set, and is left out when nobody is named to hear it.
    budget = template["Resources"]["SageMakerBudget"]
    for email, exists in (("", False), ("ops@example.com", True)):
        resolve = iam._Resolver(template, {"BudgetEmail": email}, "000000000000", "eu-west-1", "bin-counter")
        assert resolve.conditions[budget["Condition"]] is exists
    subscribers = [s for n in budget["Properties"]["NotificationsWithSubscribers"] for s in n["Subscribers"]]
    by_mail = {"SubscriptionType": "EMAIL", "Address": {"Ref": "BudgetEmail"}}
    assert subscribers and all(s == by_mail for s in subscribers)
