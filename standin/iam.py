"""What IAM would decide: infra/pipeline.yaml's roles and policies as a deployed stack would hold them,
and whether a policy allows an action on a resource.

The local stack answers every call; AWS answers AccessDenied to a principal whose policies do not allow
it. The tests use this module to hold every call the DAGs make (`standin.aws_calls`) against the
policies that would apply on AWS, and the local stack uses the rendered stack's outputs for its
Variables, so that what docs/infra/README.md tells a user to copy is what the tests ran with.

The evaluation follows IAM's documented logic for identity policies, strictly: an explicit Deny wins;
else an Allow whose Action, Resource and every Condition match; else denied. A Condition on a key the
request does not carry does not match, and condition operators other than StringEquals, StringLike, their
negations and Bool are refused, so nothing passes here that AWS might refuse.

What AWS authorises is AWS's word, not ours: every recorded call and every grant is held against AWS's
Service Authorization Reference (`standin.sar`): the action must exist as spelt, a call must name each
resource type the reference marks required for it (CreateEndpoint: the endpoint and the endpoint
configuration), a grant's Resource must be able to match an ARN of a type the action is authorised on,
and a condition key must be one the reference lists for the action (or a global aws:* key).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from standin import sar

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_TEMPLATE = ROOT / "infra" / "pipeline.yaml"
ACTIONS_LEDGER = ROOT / "infra" / "aws-actions.json"


@dataclass
class Stack:
    """A rendered stack: each IAM role's and managed policy's ARN and documents, and the outputs."""

    roles: dict[str, dict] = field(default_factory=dict)  # logical id -> {"arn", "trust", "policies"}
    managed_policies: dict[str, dict] = field(default_factory=dict)  # logical id -> {"arn", "document"}
    bucket_policies: dict[str, dict] = field(default_factory=dict)  # logical id -> its PolicyDocument
    key_policies: dict[str, dict] = field(default_factory=dict)  # logical id -> a KMS key's KeyPolicy
    log_groups: dict[str, dict] = field(default_factory=dict)  # logical id -> its Properties
    alarms: dict[str, dict] = field(default_factory=dict)  # logical id -> an AWS::CloudWatch::Alarm's Properties
    dashboards: dict[str, dict] = field(default_factory=dict)  # logical id -> a Dashboard's Properties
    outputs: dict[str, str] = field(default_factory=dict)

    def policies_of_role(self, role_arn: str) -> list[dict] | None:
        for role in self.roles.values():
            if role["arn"] == role_arn:
                return role["policies"]
        return None


def load_template(path: Path = PIPELINE_TEMPLATE) -> dict:
    from cfnlint.decode import cfn_yaml  # a test-and-lint tool: imported only where a template is read

    return cfn_yaml.load(str(path))


class _Resolver:
    """CloudFormation's intrinsic functions, for the ones our templates use."""

    def __init__(self, template: dict, parameters: Mapping[str, str], account: str, region: str, stack_name: str):
        self.template, self.stack_name = template, stack_name
        defaults = {k: str(v.get("Default", "")) for k, v in template.get("Parameters", {}).items()}
        self.values = {
            **defaults,
            **{k: str(v) for k, v in parameters.items()},
            "AWS::AccountId": account,
            "AWS::Region": region,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": stack_name,
        }
        self.conditions = {name: self(body) for name, body in template.get("Conditions", {}).items()}

    def physical(self, logical: str) -> str:
        """What Ref answers for a resource, with CloudFormation's own naming where the template names none."""
        resource = self.template["Resources"][logical]
        kind, props = resource["Type"], resource.get("Properties", {})
        account, region = self.values["AWS::AccountId"], self.values["AWS::Region"]
        generated = f"{self.stack_name}-{logical}"
        if kind == "AWS::S3::Bucket":
            return self(props["BucketName"]) if "BucketName" in props else generated.lower()
        if kind == "AWS::SNS::Topic":
            return f"arn:aws:sns:{region}:{account}:{self(props.get('TopicName', generated))}"
        if kind == "AWS::IAM::ManagedPolicy":
            return f"arn:aws:iam::{account}:policy/{self(props.get('ManagedPolicyName', generated))}"
        if kind == "AWS::IAM::Role":
            return self(props.get("RoleName", generated))
        return generated

    def attribute(self, logical: str, name: str) -> str:
        kind = self.template["Resources"][logical]["Type"]
        if (kind, name) == ("AWS::S3::Bucket", "Arn"):
            return f"arn:aws:s3:::{self.physical(logical)}"
        if (kind, name) == ("AWS::IAM::Role", "Arn"):
            return f"arn:aws:iam::{self.values['AWS::AccountId']}:role/{self.physical(logical)}"
        raise ValueError(f"Fn::GetAtt {logical}.{name} is not rendered here")

    def _sub(self, text: str, variables: Mapping) -> str:
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name in variables:
                return str(self(variables[name]))
            if name in self.values:
                return self.values[name]
            logical, _, attribute = name.partition(".")
            return self.attribute(logical, attribute) if attribute else self.physical(logical)

        return re.sub(r"\$\{([^}!]+)\}", replace, text)

    def __call__(self, node):
        if isinstance(node, list):
            return [self(n) for n in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, value),) = node.items()
            if key == "Ref":
                return self.values[value] if value in self.values else self.physical(value)
            if key == "Fn::GetAtt":
                logical, name = value if isinstance(value, list) else value.split(".", 1)
                return self.attribute(logical, name)
            if key == "Fn::Sub":
                text, variables = (value, {}) if isinstance(value, str) else value
                return self._sub(text, variables)
            if key == "Fn::If":
                name, then, otherwise = value
                return self(then) if self.conditions[name] else self(otherwise)
            if key == "Fn::Equals":
                left, right = self(value)
                return str(left) == str(right)
            if key == "Fn::Not":
                return not self(value[0])
            if key == "Fn::Join":
                separator, parts = value
                return separator.join(str(p) for p in self(parts))
        return {k: self(v) for k, v in node.items()}


def render(
    template: dict,
    parameters: Mapping[str, str] | None = None,
    account: str = "000000000000",
    region: str = "us-east-1",
    stack_name: str = "bin-counter",
) -> Stack:
    """The stack's IAM, log groups, alarms, dashboards and outputs as CloudFormation would create them
    from `template`."""
    resolve = _Resolver(template, parameters or {}, account, region, stack_name)
    stack = Stack()
    for logical, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Role":
            stack.roles[logical] = {
                "arn": resolve.attribute(logical, "Arn"),
                "trust": resolve(props["AssumeRolePolicyDocument"]),
                "policies": [resolve(p["PolicyDocument"]) for p in props.get("Policies", [])],
            }
        elif resource["Type"] == "AWS::IAM::ManagedPolicy":
            stack.managed_policies[logical] = {
                "arn": resolve.physical(logical),
                "document": resolve(props["PolicyDocument"]),
            }
        elif resource["Type"] == "AWS::S3::BucketPolicy":
            stack.bucket_policies[logical] = resolve(props["PolicyDocument"])
        elif resource["Type"] == "AWS::Logs::LogGroup":
            stack.log_groups[logical] = resolve(props)
        elif resource["Type"] == "AWS::KMS::Key":
            stack.key_policies[logical] = resolve(props["KeyPolicy"])
        elif resource["Type"] == "AWS::CloudWatch::Alarm":
            stack.alarms[logical] = resolve(props)
        elif resource["Type"] == "AWS::CloudWatch::Dashboard":
            stack.dashboards[logical] = resolve(props)
    stack.outputs = {name: resolve(output["Value"]) for name, output in template.get("Outputs", {}).items()}
    return stack


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def statements(document: Mapping) -> list[dict]:
    return as_list(document.get("Statement", []))


def action_matches(patterns, action: str) -> bool:
    # Actions are case-insensitive in IAM; resources are not.
    return any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in as_list(patterns))


def _resource_matches(patterns, resource: str) -> bool:
    return any(fnmatch.fnmatchcase(resource, p) for p in as_list(patterns))


CONDITION_OPERATORS = {
    "StringEquals": lambda value, wanted: value in wanted,
    "StringNotEquals": lambda value, wanted: value not in wanted,
    "StringLike": lambda value, wanted: any(fnmatch.fnmatchcase(value, w) for w in wanted),
    "StringNotLike": lambda value, wanted: not any(fnmatch.fnmatchcase(value, w) for w in wanted),
    # IAM compares a Bool condition's "true"/"false" case-insensitively (aws:SecureTransport).
    "Bool": lambda value, wanted: str(value).lower() in {str(w).lower() for w in wanted},
}


def _conditions_match(conditions: Mapping, context: Mapping[str, str]) -> bool:
    for operator, tests in conditions.items():
        if operator not in CONDITION_OPERATORS:
            raise ValueError(
                f"condition operator {operator} is not evaluated here: use one of "
                f"{sorted(CONDITION_OPERATORS)} or extend standin/iam.py"
            )
        for key, wanted in tests.items():
            if key not in context or not CONDITION_OPERATORS[operator](context[key], as_list(wanted)):
                return False
    return True


def statement_applies(statement: Mapping, action: str, resource: str, context: Mapping[str, str]) -> bool:
    if "Action" in statement and not action_matches(statement["Action"], action):
        return False
    if "NotAction" in statement and action_matches(statement["NotAction"], action):
        return False
    if "Resource" in statement and not _resource_matches(statement["Resource"], resource):
        return False
    if "NotResource" in statement and _resource_matches(statement["NotResource"], resource):
        return False
    return _conditions_match(statement.get("Condition", {}), context)


def is_allowed(
    documents: Iterable[Mapping], action: str, resource: str, context: Mapping[str, str] | None = None
) -> bool:
    """IAM's decision for an identity with these policy documents."""
    context = context or {}
    applicable = [s for d in documents for s in statements(d) if statement_applies(s, action, resource, context)]
    if any(s["Effect"] == "Deny" for s in applicable):
        return False
    return any(s["Effect"] == "Allow" for s in applicable)


def granted_actions(documents: Iterable[Mapping]) -> set[str]:
    """Every action an Allow statement names (wildcards kept as written)."""
    return {
        action
        for document in documents
        for s in statements(document)
        if s["Effect"] == "Allow"
        for action in as_list(s.get("Action", []))
    }


def load_ledger(path: Path = ACTIONS_LEDGER) -> dict:
    return json.loads(path.read_text())


# Who is who in the call log: the workers sign with their access key; SageMaker and Lambda act as roles.
PRINCIPALS = {
    "airflow-worker": "AirflowWorkerPolicy",
    "sagemaker-execution-role": "SageMakerExecutionRole",
    "api-function-role": "ApiFunctionRole",
}


# The workers' managed policies, all attached to them: IAM holds one to 6,144 characters.
WORKER_POLICIES = ("AirflowWorkerPolicy", "AirflowWorkerScalingPolicy")


def worker_documents(stack: Stack) -> list[dict]:
    """The documents of the workers' managed policies in `stack`."""
    policies = stack.managed_policies
    return [policies[logical]["document"] for logical in WORKER_POLICIES if logical in policies]


def identities(stack: Stack, worker_key_id: str) -> dict[str, tuple[str, list[dict]]]:
    """caller (as standin.aws_calls.caller reads it) -> (principal name, its policy documents)."""
    found = {worker_key_id: ("airflow-worker", worker_documents(stack))}
    for name, logical in PRINCIPALS.items():
        if logical in stack.roles:
            found[stack.roles[logical]["arn"]] = (name, stack.roles[logical]["policies"])
    return found


def _aliased(resource: str, bucket_alias: Mapping[str, str]) -> str:
    for test_bucket, stack_bucket in bucket_alias.items():
        for separator in ("/", ""):
            prefix = f"arn:aws:s3:::{test_bucket}{separator}"
            if resource.startswith(prefix) and (separator or resource == prefix):
                return f"arn:aws:s3:::{stack_bucket}{separator}" + resource[len(prefix) :]
    return resource


def _key_problem(action: str, key: str) -> str | None:
    if key.startswith("aws:") or key in sar.condition_keys(action):
        return None
    listed = sorted(sar.condition_keys(action))
    return f"{key} is no condition key of {action} (AWS's Service Authorization Reference lists {listed})"


def reference_problem(action: str, resource: str, context: Mapping[str, str] | None = None) -> str | None:
    """Why one recorded (action, resource, condition context) is not what AWS would authorise, by AWS's
    Service Authorization Reference; None if it is."""
    problem = sar.resource_problem(action, resource)
    if problem is None:
        problem = next(filter(None, (_key_problem(action, key) for key in context or {})), None)
    return problem


def grant_problems(documents: Iterable[Mapping]) -> list[str]:
    """What in these policy documents AWS's Service Authorization Reference contradicts: an action it does
    not list as spelt, a Resource that can match no ARN of a type the action is authorised on (a grant
    on the wrong resource type), a condition key the action does not take."""
    found = []
    for document in documents:
        for statement in statements(document):
            keys = [key for tests in statement.get("Condition", {}).values() for key in tests]
            for action in as_list(statement.get("Action", [])):
                if sar.privilege(action) is None:
                    problems = [sar.resource_problem(action, "*")]
                else:
                    problems = [sar.grant_problem(action, p) for p in as_list(statement.get("Resource", []))]
                    problems += [_key_problem(action, key) for key in keys]
                found += [f"{statement.get('Sid', 'a statement')}: {p}" for p in problems if p]
    return found


def refused_calls(
    calls: Iterable[Mapping],
    stack: Stack,
    worker_key_id: str,
    ledger: Mapping,
    bucket_alias: Mapping[str, str] | None = None,
) -> list[str]:
    """What AWS would refuse, or what nobody wrote down, among recorded calls: each call of a known
    principal must be in the ledger under that principal and allowed by its policies. `bucket_alias`
    maps a test's own bucket to the stack's (tests make a bucket each; the stack has one). One line
    per principal and action, with an example resource and how many there were."""
    who = identities(stack, worker_key_id)
    problems: dict[str, list[str]] = {}
    for call in calls:
        if call["caller"] not in who:
            continue  # the tests' own set-up and checks, which no policy of ours covers
        principal, documents = who[call["caller"]]
        resource = _aliased(call["resource"], bucket_alias or {})
        mismatch = reference_problem(call["action"], call["resource"], call.get("context"))
        if mismatch:
            problem = f"{principal}: the call log disagrees with AWS's Service Authorization Reference: {mismatch}"
        elif call["action"] not in ledger.get(principal, {}):
            problem = (
                f"{principal}: {call['action']} is not in infra/aws-actions.json: record it there (why the "
                "DAGs need it) and grant it in infra/pipeline.yaml"
            )
        elif not is_allowed(documents, call["action"], resource, call.get("context")):
            problem = (
                f"{principal}: {call['action']} would be refused on AWS (AccessDenied): "
                "infra/pipeline.yaml does not allow it"
            )
        else:
            continue
        problems.setdefault(problem, []).append(resource)
    return [
        f"{problem}; {len(set(found))} resource(s), e.g. {sorted(found)[0]}"
        for problem, found in sorted(problems.items())
    ]


def create_roles(iam_client, stack: Stack) -> dict[str, str]:
    """Create the stack's roles, with their trust and inline policies, in an IAM (the local stack's
    moto server), as CloudFormation would on AWS; a role that exists already is left as it is.
    Returns logical id -> role ARN."""
    created = {}
    for logical, role in stack.roles.items():
        name = role["arn"].rsplit("/", 1)[-1]
        with contextlib.suppress(iam_client.exceptions.EntityAlreadyExistsException):
            iam_client.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(role["trust"]))
        for number, document in enumerate(role["policies"]):
            iam_client.put_role_policy(
                RoleName=name, PolicyName=f"{name}-{number}", PolicyDocument=json.dumps(document)
            )
        created[logical] = role["arn"]
    return created


def service_role(iam_client, name: str, *services: str) -> str:
    """A role that `services` may assume and that grants nothing: for tests and benchmarks whose calls
    no policy of ours is meant to cover. Returns its ARN."""
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": list(services)}, "Action": "sts:AssumeRole"}],
    }
    try:
        return iam_client.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    except iam_client.exceptions.EntityAlreadyExistsException:
        return iam_client.get_role(RoleName=name)["Role"]["Arn"]
