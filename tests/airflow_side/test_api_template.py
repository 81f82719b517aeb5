"""lambda/template.yaml: valid under cfn-lint, least privilege (with the role infra/pipeline.yaml gives
it), and consistent with the handler, the local gateway and the retraining DAG that the template sits
beside."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from cfnlint.decode import cfn_yaml

from standin import gateway, iam
from tests.airflow_side.conftest import lambda_handler
from tests.conftest import REPO

TEMPLATE = REPO / "lambda" / "template.yaml"
CFN_LINT = Path(sys.executable).with_name("cfn-lint")
ALLOWED_ACTIONS = {"sagemaker:InvokeEndpoint", "logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}


@pytest.fixture(scope="module")
def template() -> dict:
    return cfn_yaml.load(str(TEMPLATE))


def resources_of(template: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CFN_LINT), "--format", "parseable", str(path)], capture_output=True, text=True)


def test_the_template_passes_cfn_lint():
    result = lint(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path):
    # The check above is only worth something if the linter really reads the template.
    broken = tmp_path / "template.yaml"
    broken.write_text(TEMPLATE.read_text().replace("      Role: !Ref FunctionRoleArn\n", "", 1))
    result = lint(broken)
    assert result.returncode != 0 and "Role" in result.stdout, result.stdout


def statements(policy_document: dict) -> list[dict]:
    found = policy_document["Statement"]
    return found if isinstance(found, list) else [found]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_the_function_may_invoke_one_endpoint_and_write_its_own_logs_only(template):
    # The API stack creates no IAM at all: the function runs as the pipeline stack's ApiFunctionRole.
    for kind in ("AWS::IAM::Role", "AWS::IAM::Policy", "AWS::IAM::ManagedPolicy", "AWS::IAM::User", "AWS::IAM::Group"):
        assert not resources_of(template, kind), kind
    assert template["Resources"]["ApiFunction"]["Properties"]["Role"] == {"Ref": "FunctionRoleArn"}

    pipeline = iam.load_template()
    roles = resources_of(pipeline, "AWS::IAM::Role")
    role = roles["ApiFunctionRole"]["Properties"]
    assert "ManagedPolicyArns" not in role and "PermissionsBoundary" not in role
    trust = statements(role["AssumeRolePolicyDocument"])
    assert trust == [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]
    granted = {}
    for policy in role["Policies"]:
        for statement in statements(policy["PolicyDocument"]):
            assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
            for action in as_list(statement["Action"]):
                assert action in ALLOWED_ACTIONS, f"the role grants {action}"
                granted.setdefault(action, []).extend(as_list(statement["Resource"]))
    assert set(granted) == ALLOWED_ACTIONS
    assert granted["sagemaker:InvokeEndpoint"] == [
        {"Fn::Sub": "arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/${EndpointName}"}
    ]
    function_logs = (
        "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:/aws/lambda/${FunctionName}:*"
    )
    for action in ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"):
        assert granted[action] == [{"Fn::Sub": function_logs}]
    # This stack's log group is the one the role may write to (both name it after FunctionName).
    log_group = template["Resources"]["FunctionLogGroup"]["Properties"]
    assert log_group["LogGroupName"] == {"Fn::Sub": "/aws/lambda/${FunctionName}"}

    # API Gateway may call the function for POST /count on this API only.
    permission = template["Resources"]["ApiInvokesFunction"]["Properties"]
    assert permission["Principal"] == "apigateway.amazonaws.com"
    assert permission["SourceArn"]["Fn::Sub"].endswith(":${Api}/${StageName}/POST/count")


def test_the_api_requires_a_key_and_is_throttled(template):
    methods = resources_of(template, "AWS::ApiGateway::Method")
    post = [m["Properties"] for m in methods.values() if m["Properties"]["HttpMethod"] == "POST"]
    assert len(post) == 1 and post[0]["ApiKeyRequired"] is True
    assert post[0]["Integration"]["Type"] == "AWS_PROXY"
    # Only the CORS preflight goes without a key, and it never reaches the function.
    for method in methods.values():
        if not method["Properties"]["ApiKeyRequired"]:
            assert method["Properties"]["HttpMethod"] == "OPTIONS"
            assert method["Properties"]["Integration"]["Type"] == "MOCK"
    plan = resources_of(template, "AWS::ApiGateway::UsagePlan")["ApiUsagePlan"]["Properties"]
    assert plan["Throttle"] == {"RateLimit": {"Ref": "RateLimit"}, "BurstLimit": {"Ref": "BurstLimit"}}
    assert plan["Quota"]["Limit"] == {"Ref": "DailyQuota"}
    stage = template["Resources"]["ApiStage"]["Properties"]
    assert stage["MethodSettings"][0]["ThrottlingRateLimit"] == {"Ref": "RateLimit"}


def test_the_local_gateway_and_the_handler_match_the_template(template):
    api = template["Resources"]["Api"]["Properties"]
    assert tuple(api["BinaryMediaTypes"]) == gateway.BINARY_MEDIA_TYPES
    path_part = template["Resources"]["CountResource"]["Properties"]["PathPart"]
    assert f"/{path_part}" == gateway.ROUTE

    function = template["Resources"]["ApiFunction"]["Properties"]
    handler_source = (REPO / "lambda" / "handler.py").read_text()
    function_source = "".join(p.read_text() for p in sorted((REPO / "lambda").glob("*.py")))
    module, name = function["Handler"].split(".")
    assert module == "handler" and f"\ndef {name}(" in handler_source
    # Every setting the template passes is one the handler documents and reads.
    for variable in function["Environment"]["Variables"]:
        assert re.search(rf"\b{variable}\b", handler_source.split('"""', 2)[1]), f"{variable} not documented"
        assert f'"{variable}"' in function_source, f"{variable} not read by the function's code"


def test_the_template_and_the_dag_created_function_share_one_set_of_limits(template):
    from bin_counter.api_function import function_settings

    function = template["Resources"]["ApiFunction"]["Properties"]
    settings = function_settings()
    for field in ("Runtime", "Handler", "Timeout", "MemorySize"):
        assert function[field] == settings[field], field
    variables = function["Environment"]["Variables"]
    parameters = template["Parameters"]
    resolved = {k: str(parameters[v["Ref"]]["Default"]) if isinstance(v, dict) else v for k, v in variables.items()}
    assert {k: resolved[k] for k in settings["Environment"]} == settings["Environment"]


def test_the_endpoint_calls_retries_included_fit_in_the_function_and_the_function_in_the_gateway():
    handler = lambda_handler()
    from bin_counter.api_function import function_settings

    settings = function_settings()
    env = settings["Environment"]
    budget = handler.retry_budget_s(
        float(env["INVOKE_CONNECT_TIMEOUT_S"]), float(env["INVOKE_TIMEOUT_S"]), int(env["INVOKE_ATTEMPTS"])
    )
    # Room for the handler's own work (decoding, base64) and a cold start's client creation.
    assert budget + 2 <= settings["Timeout"] < 29, (budget, settings["Timeout"])
    # The handler's defaults are the same numbers: a function without these settings is within budget too.
    assert handler.invoke_settings() == (
        float(env["INVOKE_CONNECT_TIMEOUT_S"]),
        float(env["INVOKE_TIMEOUT_S"]),
        int(env["INVOKE_ATTEMPTS"]),
    )
    # The budget is botocore's: one more attempt adds its timeouts and its longest backoff.
    assert handler.retry_budget_s(2, 8, 3) - handler.retry_budget_s(2, 8, 2) >= 10 + 2


def test_the_api_template_defaults_to_the_pipeline_stacks_names(template):
    # The DAGs take the names from the pipeline stack's Variable (tests/airflow_side/test_stack_names.py);
    # the API stack deployed with its defaults must front the same endpoint and function.
    parameters = iam.load_template(REPO / "infra" / "pipeline.yaml")["Parameters"]
    for name in ("EndpointName", "FunctionName"):
        assert template["Parameters"][name]["Default"] == parameters[name]["Default"]
    assert re.fullmatch(template["Parameters"]["EndpointName"]["AllowedPattern"], parameters["EndpointName"]["Default"])


def test_an_endpoint_the_function_may_not_call_answers_without_account_details(monkeypatch):
    # AWS refuses InvokeEndpoint to a role that does not grant it, with a message naming the role and
    # the account; the local stack never refuses, so AWS's answer is stubbed here.
    from botocore.stub import Stubber

    handler = lambda_handler()
    monkeypatch.setenv("ENDPOINT_NAME", "bin-counter")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = handler.boto3.client("sagemaker-runtime", aws_access_key_id="x", aws_secret_access_key="x")
    monkeypatch.setattr(handler, "_runtime", client)
    denied = (
        "User: arn:aws:sts::123456789012:assumed-role/bin-counter-api/fn is not authorized to perform: "
        "sagemaker:InvokeEndpoint on resource: arn:aws:sagemaker:us-east-1:123456789012:endpoint/bin-counter"
    )
    with Stubber(client) as stub:
        stub.add_client_error("invoke_endpoint", "AccessDeniedException", denied, 400)
        with pytest.raises(handler.ApiError) as raised:
            handler.invoke([b"\xff\xd8\xff photo"], single=True)
    assert (raised.value.status, raised.value.code) == (502, "api_misconfigured")
    assert "123456789012" not in raised.value.message and "arn:" not in raised.value.message
