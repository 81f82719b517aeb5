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

from standin import iam
from standin.aws_calls import WORKER_ACCESS_KEY_ID, CallLog, read_calls

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
        return [stack.managed_policies[logical]["document"]]
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
                        actions = iam.as_list(statement["Action"])
                        assert set(actions) <= UNSCOPABLE, f"{principal}: {actions} on every resource"


# Actions IAM cannot scope to a resource (the Service Authorization Reference lists none for them).
UNSCOPABLE = {
    "sagemaker:ListModels",
    "sagemaker:ListEndpointConfigs",
    "sagemaker:ListEndpoints",
    "ecr:GetAuthorizationToken",
    "cloudwatch:PutMetricData",
}


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
    assert pipeline_stack.outputs["AlertsTopicArn"] == "arn:aws:sns:us-east-1:000000000000:bin-counter-alerts"


def test_the_template_defaults_name_what_the_dags_use(template, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(iam.ROOT / "dags")).dags["bin_count_retrain"]
    parameters = template["Parameters"]
    assert parameters["EndpointName"]["Default"] == dag.params["endpoint_name"]
    assert parameters["FunctionName"]["Default"] == dag.params["function_name"]
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
    role = pipeline_stack.outputs["ApiFunctionRoleArn"]
    ensure_function(aws_lambda, "bin-counter-api", "bin-counter-old", role)
    ensure_function(aws_lambda, "bin-counter-api", "bin-counter", role)
    variables = aws_lambda.get_function(FunctionName="bin-counter-api")["Configuration"]["Environment"]["Variables"]
    assert variables["ENDPOINT_NAME"] == "bin-counter"
