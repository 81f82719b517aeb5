"""The stand-in's error answers against an oracle: moto.

Every SageMaker and Lambda operation that both the stand-in and moto serve is sent the same calls, in
the cases where AWS answers an error (a resource that does not exist, a name that exists already, a
resource in use, a value AWS refuses), to moto (its backends in process, through boto3 under
`mock_aws`: the answer moto serialises and botocore parses, as from AWS) and to a stand-in over HTTP.
Both must give the case's answer (error code and HTTP status). Where moto is known to answer otherwise
than AWS (it is more lenient: it takes duplicate names and unchecked values), the case quotes the
evidence for AWS's answer (`Case.evidence`): the stand-in must give AWS's answer, and moto must still
differ (else the mark is stale). standin/README.md ("Error shapes against moto") holds the table
that `table()` writes from CASES; `python -m tests.airflow_side.test_standin_oracle` prints it.
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore import xform_name
from botocore.exceptions import ClientError
from moto import mock_aws

from bin_counter.sagemaker_config import tuning_job_config
from standin.iam import service_role
from standin.launch import start_standin
from tests.airflow_side.conftest import CONTAINER_PYTHON, WARM, job_config
from tests.conftest import REPO

MISSING, DUPLICATE, IN_USE, INVALID = "missing resource", "duplicate create", "in use", "invalid input"
INPUTS = "oracle-inputs"  # the stand-in's transform jobs list their input at the request: it must exist
NOWHERE = "oracle-nowhere"  # no such bucket: a training job the cases start fails at its download
MOTO_ACCOUNT, STANDIN_ACCOUNT = "123456789012", "000000000000"

Params = Callable[["Side", str], dict]


@dataclass(frozen=True)
class Side:
    """What differs between the two answerers: the account their ARNs name."""

    account: str

    @property
    def role(self) -> str:
        # A role that SageMaker and Lambda may assume: the suite's moto server has it (conftest's
        # TEST_ROLES); moto's in-process IAM gets it in `moto_answer`.
        return f"arn:aws:iam::{self.account}:role/local"

    @property
    def no_role(self) -> str:
        """A role of the account that IAM does not have."""
        return f"arn:aws:iam::{self.account}:role/nobody"


@dataclass(frozen=True)
class Case:
    service: str  # the boto3 client: sagemaker or lambda
    operation: str  # the API's operation, as botocore's model names it
    case: str  # MISSING, DUPLICATE, IN_USE or INVALID
    params: Params  # the call's parameters for a side and the case's own resource name
    expected: tuple[str, int]  # the error code and HTTP status AWS answers (moto's, without evidence)
    setup: tuple[tuple[str, Params], ...] = ()  # (operation, params) that succeed first
    evidence: str = ""  # where AWS's answer is quoted, when moto's differs from it

    @property
    def id(self) -> str:
        return f"{self.operation}-{self.case.replace(' ', '-')}"


# -- requests ------------------------------------------------------------------------------------
def model(side: Side, name: str) -> dict:
    return {
        "ModelName": name,
        "ExecutionRoleArn": side.role,
        # No such artifact: an endpoint of it fails at once in the stand-in, and no worker starts.
        "PrimaryContainer": {"Image": "local/pytorch-inference:cpu", "ModelDataUrl": f"s3://{NOWHERE}/m.tar.gz"},
    }


def endpoint_config(side: Side, name: str, model_name: str | None = None) -> dict:
    variant = {
        "VariantName": "AllTraffic",
        "ModelName": model_name or name,
        "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1,
    }
    return {"EndpointConfigName": name, "ProductionVariants": [variant]}


def endpoint(side: Side, name: str, config_name: str | None = None) -> dict:
    return {"EndpointName": name, "EndpointConfigName": config_name or name}


def training(side: Side, name: str) -> dict:
    # Its channels are in a bucket that does not exist: the stand-in's job fails at its download.
    return {**job_config(NOWHERE, name), "RoleArn": side.role}


def transform(side: Side, name: str, model_name: str | None = None) -> dict:
    return {
        "TransformJobName": name,
        "ModelName": model_name or name,
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{INPUTS}/in/"}}},
        "TransformOutput": {"S3OutputPath": f"s3://{INPUTS}/out/"},
        "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1},
    }


def tuning(side: Side, name: str) -> dict:
    ranges = {"ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.001", "MaxValue": "0.01"}]}
    return tuning_job_config(name, training(side, name), ranges, "validation:accuracy", 1, 1)


def function(side: Side, name: str) -> dict:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as code:
        code.writestr("handler.py", "def handle(event, context):\n    return event\n")
    return {
        "FunctionName": name,
        "Runtime": "python3.12",
        "Handler": "handler.handle",
        "Role": side.role,
        "Code": {"ZipFile": archive.getvalue()},
    }


def invoke(side: Side, name: str) -> dict:
    return {"FunctionName": name, "Payload": b"{}"}


def new_code(side: Side, name: str) -> dict:
    return {"FunctionName": name, "ZipFile": function(side, name)["Code"]["ZipFile"]}


def renamed(request: Params, name: str) -> Params:
    """`request` for another name than the case's: one that AWS refuses, or one never created."""
    return lambda side, _: request(side, name)


def named(field: str) -> Params:
    """A request that names one resource: the case's."""
    return lambda side, name: {field: name}


def with_values(request: Params, **values) -> Params:
    return lambda side, name: {**request(side, name), **values}


def of(request: Callable[[Side, str, str], dict], other: str) -> Params:
    """`request` for the case's resource, naming `other` as the one it is made of (model, configuration)."""
    return lambda side, name: request(side, name, other)


def bad_name_of(request: Callable[[Side, str, str], dict]) -> Params:
    """`request` for a name AWS refuses, made of the case's resource (which exists: only the name is wrong)."""
    return lambda side, name: request(side, BAD_NAME, name)


# -- evidence: AWS's own answers, quoted where moto answers otherwise ----------------------------
BAD_NAME = "bad_name"  # an underscore: off every SageMaker name's pattern ^[a-zA-Z0-9](-*[a-zA-Z0-9])*
PATTERN = (
    "AWS checks the name pattern of its model server-side: 'ValidationException ... 1 validation error detected: "
    "Value ... at 'modelName' failed to satisfy constraint: Member must satisfy regular expression pattern: "
    "^[a-zA-Z0-9](-*[a-zA-Z0-9])*' (aws-samples/sagemaker-ml-workflow-with-apache-airflow#3; trainingJobName: "
    "aws/sagemaker-python-sdk#384); moto checks no SageMaker name"
)
MAX_RESULTS = (
    "botocore's model gives MaxResults 1..100 and AWS checks its model's constraints server-side (moto does so "
    "for ListTrainingJobs, 'Member must have value less than or equal to 100'); moto's other List calls do not"
)
EVIDENCE = {
    "model": 'astronomer/astronomer-providers#1055: "An error occurred (ValidationException) when calling the '
    'CreateModel operation: Cannot create already existing model ..."; moto replaces the model',
    "endpoint-config": 'awslabs/spot-tagging-bot-for-digital-assets#2: "(ValidationException) when calling the '
    'CreateEndpointConfig operation: Cannot create already existing endpoint configuration ..."; moto replaces it',
    "endpoint": 'aws/amazon-sagemaker-examples#2491: "(ValidationException) when calling the CreateEndpoint '
    "operation: Cannot create already existing endpoint ...\" (the Amazon provider's SageMakerEndpointOperator "
    "matches these words to update instead); moto replaces the endpoint",
    "training-job": 'SuperCowPowers/workbench#384: "(ResourceInUse) when calling the CreateTrainingJob operation: '
    'Training job names must be unique ..."; moto replaces the job',
    "transform-job": "botocore's model lists ResourceInUse for CreateTransformJob, as for CreateTrainingJob, and "
    "names are unique per account and region (apache/airflow#21941: a retried task's CreateTransformJob fails on "
    "its name); moto replaces the job",
    "transform-model": "the API reference: 'ModelName must be the name of an existing Amazon SageMaker model'; "
    'AWS\'s words "Could not find model \\"arn:...:model/...\\"." are quoted in aws/deep-learning-containers#586, '
    "but no request-time answer with its code is (botocore's model also lists ResourceNotFound): the stand-in "
    "keeps ValidationException, as for CreateEndpointConfig (where moto agrees); moto takes any model name",
    "function-name": 'excamera/mu#6, aws-samples/aws-cdk-examples#88: "(ValidationException) when calling the '
    "CreateFunction operation: 1 validation error detected: Value ... at 'functionName' failed to satisfy "
    'constraint: Member must satisfy regular expression pattern ..."; moto takes any name',
    "function-zip": 'github-aws-runners/terraform-aws-github-runner#2269: "InvalidParameterValueException: Could '
    'not unzip uploaded file. Please check your file, then try to upload again." with StatusCode 400; moto '
    "stores any bytes",
}
ROLE_REFUSED = (
    'awslabs/predictive-maintenance-using-machine-learning#3: "(ValidationException) when calling the '
    "CreateTransformJob operation: Could not assume role ... Please ensure that the role exists and allows "
    "principal 'sagemaker.amazonaws.com' to assume the role.\" (SageMaker assumes a request's role at the "
    "request); moto checks no SageMaker role"
)
VALIDATION = ("ValidationException", 400)
IN_USE_400 = ("ResourceInUse", 400)
NOT_FOUND_404 = ("ResourceNotFoundException", 404)
OK = ("OK", 200)


def max_101(side: Side, name: str) -> dict:
    return {"MaxResults": 101}


CONFIG_FIRST = (("CreateModel", model), ("CreateEndpointConfig", endpoint_config))
ENDPOINT_FIRST = (*CONFIG_FIRST, ("CreateEndpoint", endpoint))
NOBODY = "no-such-resource"
# Models, endpoint configurations and endpoints.
SERVING_CASES = [
    Case("sagemaker", "CreateModel", DUPLICATE, model, VALIDATION, CONFIG_FIRST[:1], EVIDENCE["model"]),
    Case(
        "sagemaker",
        "CreateModel",
        MISSING + " (its role)",
        lambda side, name: {**model(side, name), "ExecutionRoleArn": side.no_role},
        VALIDATION,
        evidence=ROLE_REFUSED,
    ),
    Case("sagemaker", "CreateModel", INVALID, renamed(model, BAD_NAME), VALIDATION, evidence=PATTERN),
    Case("sagemaker", "DescribeModel", MISSING, named("ModelName"), VALIDATION),
    Case("sagemaker", "DeleteModel", MISSING, named("ModelName"), VALIDATION),
    # AWS deletes a model that a configuration names, as moto does (DeleteModel's reference).
    Case("sagemaker", "DeleteModel", IN_USE, named("ModelName"), OK, CONFIG_FIRST),
    Case("sagemaker", "ListModels", INVALID, max_101, VALIDATION, evidence=MAX_RESULTS),
    Case(
        "sagemaker",
        "CreateEndpointConfig",
        DUPLICATE,
        endpoint_config,
        VALIDATION,
        CONFIG_FIRST,
        EVIDENCE["endpoint-config"],
    ),
    Case("sagemaker", "CreateEndpointConfig", MISSING + " (its model)", of(endpoint_config, NOBODY), VALIDATION),
    Case(
        "sagemaker",
        "CreateEndpointConfig",
        INVALID,
        bad_name_of(endpoint_config),
        VALIDATION,
        CONFIG_FIRST[:1],
        PATTERN,
    ),
    Case("sagemaker", "DescribeEndpointConfig", MISSING, named("EndpointConfigName"), VALIDATION),
    Case("sagemaker", "DeleteEndpointConfig", MISSING, named("EndpointConfigName"), VALIDATION),
    # AWS deletes a configuration an endpoint uses ("It does not delete endpoints created using the
    # configuration", DeleteEndpointConfig's reference), as moto does.
    Case("sagemaker", "DeleteEndpointConfig", IN_USE, named("EndpointConfigName"), OK, ENDPOINT_FIRST),
    Case("sagemaker", "ListEndpointConfigs", INVALID, max_101, VALIDATION, evidence=MAX_RESULTS),
    Case("sagemaker", "CreateEndpoint", DUPLICATE, endpoint, VALIDATION, ENDPOINT_FIRST, EVIDENCE["endpoint"]),
    Case("sagemaker", "CreateEndpoint", MISSING + " (its configuration)", of(endpoint, NOBODY), VALIDATION),
    Case("sagemaker", "CreateEndpoint", INVALID, bad_name_of(endpoint), VALIDATION, CONFIG_FIRST, PATTERN),
    Case("sagemaker", "DescribeEndpoint", MISSING, named("EndpointName"), VALIDATION),
    Case("sagemaker", "DeleteEndpoint", MISSING, named("EndpointName"), VALIDATION),
    Case("sagemaker", "ListEndpoints", INVALID, max_101, VALIDATION, evidence=MAX_RESULTS),
]


# Training, transform and tuning jobs: the first of a duplicate pair runs, and fails at its download.
JOB_CASES = [
    Case(
        "sagemaker",
        "CreateTrainingJob",
        DUPLICATE,
        training,
        IN_USE_400,
        (("CreateTrainingJob", training),),
        EVIDENCE["training-job"],
    ),
    Case("sagemaker", "CreateTrainingJob", INVALID, renamed(training, BAD_NAME), VALIDATION, evidence=PATTERN),
    Case("sagemaker", "DescribeTrainingJob", MISSING, named("TrainingJobName"), VALIDATION),
    Case("sagemaker", "ListTrainingJobs", INVALID, max_101, VALIDATION),
    Case(
        "sagemaker",
        "CreateTransformJob",
        DUPLICATE,
        transform,
        IN_USE_400,
        (("CreateModel", model), ("CreateTransformJob", transform)),
        EVIDENCE["transform-job"],
    ),
    Case(
        "sagemaker",
        "CreateTransformJob",
        MISSING + " (its model)",
        transform,
        VALIDATION,
        evidence=EVIDENCE["transform-model"],
    ),
    Case(
        "sagemaker",
        "CreateTransformJob",
        INVALID,
        bad_name_of(transform),
        VALIDATION,
        (("CreateModel", model),),
        PATTERN,
    ),
    Case("sagemaker", "DescribeTransformJob", MISSING, named("TransformJobName"), VALIDATION),
    Case("sagemaker", "ListTransformJobs", INVALID, max_101, VALIDATION),
    # moto answers as AWS does (aws/amazon-sagemaker-examples#2440: "(ResourceInUse) when calling the
    # CreateHyperParameterTuningJob operation: A hyperparameter tuning job with the name, ..., already exists.").
    Case(
        "sagemaker",
        "CreateHyperParameterTuningJob",
        DUPLICATE,
        tuning,
        IN_USE_400,
        (("CreateHyperParameterTuningJob", tuning),),
    ),
    Case(
        "sagemaker",
        "CreateHyperParameterTuningJob",
        INVALID,
        renamed(tuning, BAD_NAME),
        VALIDATION,
        evidence=PATTERN,
    ),
    # Audit findings F1 and L1: ResourceNotFound here, not ValidationException.
    Case(
        "sagemaker",
        "DescribeHyperParameterTuningJob",
        MISSING,
        named("HyperParameterTuningJobName"),
        ("ResourceNotFound", 400),
    ),
    Case("sagemaker", "ListHyperParameterTuningJobs", INVALID, max_101, VALIDATION, evidence=MAX_RESULTS),
]


# The Model Registry: moto's own answers, forwarded by the stand-in (standin/sagemaker/forward.py): the
# cases check that the forwarding keeps moto's error intact, and that botocore's checks still come first.
def registry_version(side: Side, name: str) -> dict:
    """A version of the model package group `name` (CreateModelPackage, as the retraining DAG registers)."""
    return {
        "ModelPackageGroupName": name,
        "InferenceSpecification": {
            "Containers": [{"Image": "pytorch-inference:2.6.0-cpu-py312", "ModelDataUrl": "s3://b/model.tar.gz"}],
            "SupportedContentTypes": ["image/jpeg"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
        "ModelApprovalStatus": "PendingManualApproval",
    }


def version_arn(field: str, **values) -> Params:
    """A request naming version 1 of the group `name` by its ARN."""
    return lambda side, name: {
        field: f"arn:aws:sagemaker:us-east-1:{side.account}:model-package/{name}/1",
        **values,
    }


REGISTRY_CASES = [
    Case("sagemaker", "DescribeModelPackageGroup", MISSING, named("ModelPackageGroupName"), VALIDATION),
    Case("sagemaker", "CreateModelPackage", MISSING + " (its group)", registry_version, VALIDATION),
    Case("sagemaker", "DescribeModelPackage", MISSING, version_arn("ModelPackageName"), VALIDATION),
    Case(
        "sagemaker",
        "UpdateModelPackage",
        MISSING,
        version_arn("ModelPackageArn", ModelApprovalStatus="Approved"),
        VALIDATION,
    ),
    Case(
        "sagemaker",
        "CreateModelPackageGroup",
        INVALID,
        renamed(named("ModelPackageGroupName"), BAD_NAME),
        VALIDATION,
        evidence=PATTERN,
    ),
    Case("sagemaker", "ListModelPackages", INVALID, max_101, VALIDATION, evidence=MAX_RESULTS),
]


LAMBDA_CASES = [
    Case(
        "lambda",
        "CreateFunction",
        DUPLICATE,
        function,
        ("ResourceConflictException", 409),
        (("CreateFunction", function),),
    ),
    Case(
        "lambda",
        "CreateFunction",
        MISSING + " (its role)",
        lambda side, name: {**function(side, name), "Role": side.no_role},
        ("InvalidParameterValueException", 400),
    ),
    Case(
        "lambda",
        "CreateFunction",
        INVALID,
        renamed(function, "bad name"),
        VALIDATION,
        evidence=EVIDENCE["function-name"],
    ),
    Case(
        "lambda",
        "CreateFunction",
        INVALID + " (not a zip)",
        with_values(function, Code={"ZipFile": b"not a zip"}),
        ("InvalidParameterValueException", 400),
        evidence=EVIDENCE["function-zip"],
    ),
    Case("lambda", "GetFunction", MISSING, named("FunctionName"), NOT_FOUND_404),
    Case("lambda", "GetFunctionConfiguration", MISSING, named("FunctionName"), NOT_FOUND_404),
    Case("lambda", "UpdateFunctionCode", MISSING, new_code, NOT_FOUND_404),
    Case(
        "lambda",
        "UpdateFunctionConfiguration",
        MISSING,
        with_values(named("FunctionName"), Timeout=5),
        NOT_FOUND_404,
    ),
    Case("lambda", "DeleteFunction", MISSING, named("FunctionName"), NOT_FOUND_404),
    Case("lambda", "Invoke", MISSING, invoke, NOT_FOUND_404),
]


CASES = [*SERVING_CASES, *JOB_CASES, *REGISTRY_CASES, *LAMBDA_CASES]
# What the stand-in serves and moto does not (moto raises NotImplementedError, or answers without
# looking): no oracle there, the stand-in's answers rest on the evidence in its own code.
NOT_IN_MOTO = {
    "UpdateEndpoint": "not implemented",
    "StopTrainingJob": "not implemented",
    "StopTransformJob": "not implemented",
    "StopHyperParameterTuningJob": "not implemented",
    "ListTrainingJobsForHyperParameterTuningJob": "not implemented",
    "ListTags": "moto fails on a resource that does not exist (AttributeError), it gives no answer",
    "InvokeEndpoint": "moto's SageMaker Runtime answers any endpoint name with canned results",
    "Invoke (a payload that is not JSON)": "moto runs functions in Docker only, and fails before answering",
}


def case_name(index: int) -> str:
    # Short (a tuning job's name has at most 32 characters) and the case's own in the shared stand-in.
    return f"oracle-{index:02d}"


# -- the two answerers ---------------------------------------------------------------------------
Outcome = tuple[str, int]  # the error code ("OK" for none) and the HTTP status


def answer(client, operation: str, params: dict) -> Outcome:
    try:
        response = getattr(client, xform_name(operation))(**params)
    except ClientError as exc:
        return exc.response["Error"]["Code"], exc.response["ResponseMetadata"]["HTTPStatusCode"]
    return "OK", response["ResponseMetadata"]["HTTPStatusCode"]


def outcome(client, case: Case, side: Side, name: str) -> Outcome:
    for operation, params in case.setup:
        assert answer(client, operation, params(side, name))[0] == "OK", f"setup {operation} failed"
    return answer(client, case.operation, case.params(side, name))


def moto_answer(case: Case, name: str) -> Outcome:
    """moto's answer, from a fresh account of its own (in process: nothing of the stand-in's goes there)."""
    with mock_aws():
        # moto's Lambda refuses a role its IAM does not have, as the stand-in does.
        service_role(
            boto3.client("iam", region_name="us-east-1"), "local", "sagemaker.amazonaws.com", "lambda.amazonaws.com"
        )
        return outcome(boto3.client(case.service, region_name="us-east-1"), case, Side(MOTO_ACCOUNT), name)


@pytest.fixture(scope="module")
def standin_clients(tmp_path_factory, moto_endpoint):
    """boto3 clients of one stand-in for every case (each case names its own resources). Its jobs never
    reach a container (their inputs do not exist), so any Python runs them."""
    python = CONTAINER_PYTHON if CONTAINER_PYTHON.exists() else Path(sys.executable)
    keys = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    with pytest.MonkeyPatch.context() as env:  # the stand-in's own credentials, for IAM's role lookups
        env.setenv("AWS_ACCESS_KEY_ID", keys["aws_access_key_id"])
        env.setenv("AWS_SECRET_ACCESS_KEY", keys["aws_secret_access_key"])
        proc, endpoint = start_standin(tmp_path_factory.mktemp("oracle"), moto_endpoint, python, extra_args=WARM)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, **keys)
    s3.create_bucket(Bucket=INPUTS)
    s3.put_object(Bucket=INPUTS, Key="in/photo.jpg", Body=b"\xff\xd8")
    yield {service: boto3.client(service, endpoint_url=endpoint, **keys) for service in ("sagemaker", "lambda")}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.id for c in CASES])
def test_the_standin_answers_errors_as_moto_or_as_the_evidence_says(index, standin_clients):
    case, name = CASES[index], case_name(index)
    moto = moto_answer(case, name)
    standin = outcome(standin_clients[case.service], case, Side(STANDIN_ACCOUNT), name)
    assert standin == case.expected, f"{case.id}: the stand-in answers {standin}, AWS {case.expected}"
    if case.evidence:
        assert moto != case.expected, f"{case.id}: moto now answers as AWS does {moto}: drop the case's evidence"
    else:
        assert moto == case.expected, f"{case.id}: moto answers {moto}, not {case.expected}"


# -- the README's table --------------------------------------------------------------------------
README = REPO / "standin" / "README.md"
BEGIN, END = "<!-- oracle table: begin -->", "<!-- oracle table: end -->"


def table() -> str:
    """The README's table: each case, the answer the stand-in gives, and whether moto agrees."""
    rows = ["| Operation | Case | Stand-in's answer | Against moto |", "|---|---|---|---|"]
    for case in CASES:
        code, status = case.expected
        verdict = f"different: {case.evidence}" if case.evidence else "same"
        rows.append(f"| {case.operation} | {case.case} | `{code}` {status} | {verdict} |")
    rows += [f"| {operation} | any | | not in moto: {why} |" for operation, why in NOT_IN_MOTO.items()]
    return "\n".join(rows)


def test_the_readme_table_is_the_cases_table():
    text = README.read_text()
    found = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    assert found, f"standin/README.md has no {BEGIN} ... {END}"
    assert found.group(1) == table(), "standin/README.md: paste `python -m tests.airflow_side.test_standin_oracle`"


def test_a_tuning_job_that_does_not_exist_is_none_to_the_resumable_operators():
    """Audit finding F1: the tune task looks for its tuning job before it creates it; moto, like AWS,
    answers ResourceNotFound for one that does not exist (training and transform jobs: ValidationException)."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from bin_counter.sagemaker_operators import describe_or_none

    with mock_aws():
        hook = SageMakerHook(aws_conn_id=None, region_name="us-east-1")
        assert describe_or_none(hook.describe_tuning_job, "never-created") is None
        assert describe_or_none(hook.describe_training_job, "never-created") is None
        assert describe_or_none(hook.describe_transform_job, "never-created") is None


if __name__ == "__main__":
    print(table())
