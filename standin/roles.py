"""Whether a service may assume a role, as SageMaker and Lambda decide before they accept one.

AWS refuses a job, a model or a function whose role does not exist or whose trust policy does not name
the service ("Could not assume role ...", "The role defined for the function cannot be assumed by
Lambda."), at the request, before anything runs. The stand-in asks IAM on the moto server, so the
local stack refuses what AWS refuses: the roles must be created there first, as infra/pipeline.yaml
creates them on AWS (`standin.iam.create_roles`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import unquote

import boto3
from botocore.exceptions import ClientError

from standin.iam import action_matches, as_list, statements


def trusted_services(trust_policy: Mapping) -> set[str]:
    """The services a role's trust policy lets assume it."""
    found: set[str] = set()
    for statement in statements(trust_policy):
        # IAM's own matching: actions are case-insensitive and may be wildcards ("sts:*").
        if statement.get("Effect") == "Allow" and action_matches(statement.get("Action", []), "sts:AssumeRole"):
            found |= set(as_list((statement.get("Principal") or {}).get("Service", [])))
    return found


class RoleCheck:
    """Looks roles up in IAM (the moto server); `enabled=False` accepts any role, more leniently than AWS."""

    def __init__(self, aws_endpoint: str | None, region: str = "us-east-1", enabled: bool = True) -> None:
        self.enabled = enabled and aws_endpoint is not None
        self.iam = boto3.client("iam", endpoint_url=aws_endpoint, region_name=region) if self.enabled else None

    def refusal(self, role_arn: str, service: str) -> str | None:
        """None if `service` (e.g. "sagemaker.amazonaws.com") may assume `role_arn`, else why not."""
        if not self.enabled or self.iam is None:
            return None
        name = role_arn.rsplit("/", 1)[-1]
        try:
            document = self.iam.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "NoSuchEntity":
                return f"the role {role_arn} does not exist"
            raise
        if isinstance(document, str):  # IAM sends it URL-encoded; boto3 usually decodes it
            document = json.loads(unquote(document))
        if service not in trusted_services(document):
            return f"the role {role_arn} does not trust {service}"
        return None
