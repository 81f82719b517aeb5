"""Sizing the endpoint to its traffic: target-tracking autoscaling of the variant's instance count
(Application Auto Scaling), and what a serverless endpoint asks instead.

From SageMaker's guide, "Automatic scaling of Amazon SageMaker AI models"
(https://docs.aws.amazon.com/sagemaker/latest/dg/endpoint-auto-scaling.html) and the Application Auto
Scaling guide (https://docs.aws.amazon.com/autoscaling/application/userguide/services-that-can-integrate-sagemaker.html):
- a variant is the scalable target `endpoint/<endpoint>/variant/<variant>` of service namespace
  `sagemaker`, dimension `sagemaker:variant:DesiredInstanceCount`, between MinCapacity and MaxCapacity;
- a target-tracking policy on the predefined metric `SageMakerVariantInvocationsPerInstance` (the
  average invocations per instance per minute) keeps it near TargetValue, with ScaleInCooldown and
  ScaleOutCooldown;
- registering creates the service-linked role AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint
  (principal sagemaker.application-autoscaling.amazonaws.com) the first time, so the caller needs
  iam:CreateServiceLinkedRole on it (endpoint-auto-scaling-prerequisites.html);
- "If the update would change the instance type for any model that is a target for auto scaling, the
  update fails ... delete any scaling policies configured for it and deregister the variant as a
  scalable target ... After you update the endpoint, you can register the updated variant"; changing
  the model only is allowed (https://docs.aws.amazon.com/sagemaker/latest/dg/endpoint-scaling-update.html).

Request builders are validated against botocore's model by the tests; the two steps act on them.
"""

from __future__ import annotations

from collections.abc import Mapping

from botocore.exceptions import ClientError

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC = "SageMakerVariantInvocationsPerInstance"
SERVICE_LINKED_ROLE_PRINCIPAL = "sagemaker.application-autoscaling.amazonaws.com"


class ScalingError(ValueError):
    """Autoscaling settings that cannot work, said before anything is created."""


def resource_id(endpoint_name: str, variant: str) -> str:
    return f"endpoint/{endpoint_name}/variant/{variant}"


def policy_name(endpoint_name: str) -> str:
    return f"{endpoint_name}-invocations-per-instance"


def scaling_requests(
    endpoint_name: str,
    variant: str,
    min_instances: int,
    max_instances: int,
    target_invocations: float,
    scale_in_cooldown_s: int,
    scale_out_cooldown_s: int,
) -> dict:
    """RegisterScalableTarget and PutScalingPolicy (target tracking) for the variant's instance count."""
    if min_instances > max_instances:
        raise ScalingError(
            f"min_instances ({min_instances}) is above max_instances ({max_instances}): Application Auto "
            "Scaling keeps the instance count between them"
        )
    target = {
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource_id(endpoint_name, variant),
        "ScalableDimension": DIMENSION,
    }
    return {
        "target": {**target, "MinCapacity": min_instances, "MaxCapacity": max_instances},
        "policy": {
            **target,
            "PolicyName": policy_name(endpoint_name),
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": float(target_invocations),
                "PredefinedMetricSpecification": {"PredefinedMetricType": METRIC},
                "ScaleInCooldown": scale_in_cooldown_s,
                "ScaleOutCooldown": scale_out_cooldown_s,
            },
        },
    }


def registered(autoscaling, endpoint_name: str, variant: str) -> dict | None:
    """The variant's scalable target, if one is registered (for reading by hand and in tests: the DAGs
    need no Describe permission, see `deregister`)."""
    found = autoscaling.describe_scalable_targets(
        ServiceNamespace=NAMESPACE, ResourceIds=[resource_id(endpoint_name, variant)], ScalableDimension=DIMENSION
    )["ScalableTargets"]
    return found[0] if found else None


def _absent(exc: ClientError) -> bool:
    # botocore's model lists ObjectNotFoundException for a target or policy that does not exist; moto
    # answers ValidationException "No scalable target found ..." / "No scaling policy found ...".
    error = exc.response["Error"]
    return error["Code"] == "ObjectNotFoundException" or (
        error["Code"] == "ValidationException" and error.get("Message", "").startswith("No scal")
    )


def deregister(autoscaling, endpoint_name: str, variant: str) -> bool:
    """Delete the variant's policy (the one `apply` puts, by name) and deregister it; False when nothing
    was registered. By name rather than listed first: the worker's policy holds no Describe grant."""
    target = {
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource_id(endpoint_name, variant),
        "ScalableDimension": DIMENSION,
    }
    try:
        autoscaling.delete_scaling_policy(**target, PolicyName=policy_name(endpoint_name))
    except ClientError as exc:
        if not _absent(exc):
            raise
    try:
        autoscaling.deregister_scalable_target(**target)
    except ClientError as exc:
        if not _absent(exc):
            raise
        return False
    return True


def update_needs_deregistering(serving_variant: Mapping | None, new_variant: Mapping) -> str | None:
    """Why the update must deregister the variant first (AWS refuses an update that changes a scaled
    variant's instance type; a serverless variant has no instance count to scale), else None (a new
    model on the same instances is allowed)."""
    if serving_variant is None:
        return None
    if "ServerlessConfig" in new_variant:
        return "the endpoint becomes serverless: it has no instance count to scale"
    if serving_variant.get("InstanceType") != new_variant.get("InstanceType"):
        return (
            f"the instance type changes ({serving_variant.get('InstanceType') or 'serverless'} to "
            f"{new_variant.get('InstanceType')}): SageMaker refuses that update while the variant is scaled"
        )
    return None


def apply(autoscaling, built: Mapping) -> str:
    """Register the variant (RegisterScalableTarget updates a registered one's capacities) and put its
    policy (PutScalingPolicy replaces a policy of that name); what was done, in on-call's words."""
    autoscaling.register_scalable_target(**built["target"])
    autoscaling.put_scaling_policy(**built["policy"])
    target, tracking = built["target"], built["policy"]["TargetTrackingScalingPolicyConfiguration"]
    return (
        f"{target['ResourceId']} scales between {target['MinCapacity']} and {target['MaxCapacity']} instances, "
        f"keeping {METRIC} near {tracking['TargetValue']:g} per minute (scale out after "
        f"{tracking['ScaleOutCooldown']} s, in after {tracking['ScaleInCooldown']} s)"
    )


# -- serverless ------------------------------------------------------------------------------------
# ProductionVariantServerlessConfig (botocore's model and
# https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_ProductionVariantServerlessConfig.html):
# MemorySizeInMB "in 1 GB increments: 1024 MB, 2048 MB, 3072 MB, 4096 MB, 5120 MB, or 6144 MB",
# MaxConcurrency 1 to 200.
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)
SERVERLESS_MAX_CONCURRENCY = (1, 200)


def serverless_variant(variant: Mapping, memory_mb: int, max_concurrency: int) -> dict:
    """The production variant as a serverless one: ServerlessConfig instead of an instance type and count."""
    if memory_mb not in SERVERLESS_MEMORY_MB:
        raise ScalingError(
            f"serverless_memory_mb {memory_mb}: choose one of {', '.join(map(str, SERVERLESS_MEMORY_MB))}"
        )
    low, high = SERVERLESS_MAX_CONCURRENCY
    if not low <= max_concurrency <= high:
        raise ScalingError(f"serverless_max_concurrency {max_concurrency}: choose {low} to {high}")
    kept = {k: v for k, v in variant.items() if k not in ("InstanceType", "InitialInstanceCount")}
    return {**kept, "ServerlessConfig": {"MemorySizeInMB": memory_mb, "MaxConcurrency": max_concurrency}}


def check_serverless(params: Mapping) -> None:
    """Refuse what a serverless endpoint cannot do, before anything is created: a canary or linear
    rollout (their steps are shares of the variant's instances, which a serverless variant does not
    have) and data capture ("Feature exclusions": Serverless Inference does not support data capture,
    https://docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints.html)."""
    if params["rollout"] != "all_at_once":
        raise ScalingError(
            f"serving serverless takes rollout all_at_once only, not {params['rollout']}: a canary or linear step "
            "is a share of the variant's instances, and a serverless endpoint has none. The update is still "
            "blue/green, baked under the alarms"
        )
    if params.get("capture_percent"):
        raise ScalingError(
            f"serving serverless cannot capture requests (capture_percent {params['capture_percent']}): SageMaker "
            "Serverless Inference does not support data capture. Set capture_percent to 0, or serve on instances"
        )


def autoscaling_for(endpoint_name: str, variant: str, params: Mapping) -> dict | None:
    """The run's autoscaling requests; None for a serverless endpoint (it scales by itself, up to
    MaxConcurrency) or when max_instances is empty (autoscaling off)."""
    if params.get("serving") == "serverless" or params.get("max_instances") is None:
        return None
    return scaling_requests(
        endpoint_name,
        variant,
        params.get("min_instances") or params["instance_count"],
        params["max_instances"],
        params.get("target_invocations_per_instance", 900),
        params.get("scale_in_cooldown_s", 300),
        params.get("scale_out_cooldown_s", 60),
    )
