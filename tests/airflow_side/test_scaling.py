"""Sizing the endpoint: the autoscaling requests (validated against botocore's Application Auto Scaling
model, then run against moto as the Airflow worker, each call held against the ledger and the worker's
policy), the serverless variant, and the rollouts a fleet's size cannot take, refused before anything
is created."""

from __future__ import annotations

import boto3
import botocore.session
import pytest
from botocore.validate import ParamValidator

from bin_counter import rollout, scaling
from tests.airflow_side.test_deploy_requests import PARAMS, ROLE, VERSION
from tests.airflow_side.test_sagemaker_config import validate

SCALED = {
    **PARAMS,
    "bucket": "bucket",
    "min_instances": None,
    "max_instances": 4,
    "target_invocations_per_instance": 900,
    "scale_in_cooldown_s": 300,
    "scale_out_cooldown_s": 60,
}
SERVERLESS = {
    **SCALED,
    "serving": "serverless",
    "rollout": "all_at_once",
    "capture_percent": 0,
    "serverless_memory_mb": 2048,
    "serverless_max_concurrency": 5,
}


def validate_autoscaling(operation: str, params: dict) -> None:
    model = botocore.session.get_session().get_service_model("application-autoscaling")
    report = ParamValidator().validate(params, model.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


def test_the_variant_scales_on_invocations_per_instance_between_its_bounds():
    built = rollout.deployment_requests(VERSION, SCALED, ROLE, "0123456789abcdef", endpoint_exists=True)["scaling"]
    validate_autoscaling("RegisterScalableTarget", built["target"])
    validate_autoscaling("PutScalingPolicy", built["policy"])
    assert built["target"] == {
        "ServiceNamespace": "sagemaker",
        "ResourceId": "endpoint/bc-endpoint/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        "MinCapacity": 2,  # empty min_instances: the deployed instance_count
        "MaxCapacity": 4,
    }
    tracking = built["policy"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
    }
    assert (tracking["TargetValue"], tracking["ScaleInCooldown"], tracking["ScaleOutCooldown"]) == (900.0, 300, 60)
    assert built["policy"]["PolicyType"] == "TargetTrackingScaling"
    off = rollout.deployment_requests(VERSION, {**SCALED, "max_instances": None}, ROLE, "x" * 16, True)
    assert off["scaling"] is None
    with pytest.raises(scaling.ScalingError, match="min_instances"):
        rollout.deployment_requests(VERSION, {**SCALED, "min_instances": 5}, ROLE, "x" * 16, True)


def test_registering_and_deregistering_run_as_the_worker_is_allowed(worker_client, moto_endpoint, s3):
    autoscaling = worker_client("application-autoscaling", moto_endpoint)
    # The test reads what is registered with its own credentials: the worker may not Describe.
    reader = boto3.client("application-autoscaling", endpoint_url=moto_endpoint, region_name="us-east-1")
    built = scaling.scaling_requests("bc-scaled", "AllTraffic", 1, 3, 600, 300, 60)
    said = scaling.apply(autoscaling, built)
    assert "between 1 and 3 instances" in said
    target = scaling.registered(reader, "bc-scaled", "AllTraffic")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    [policy] = reader.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=target["ResourceId"])[
        "ScalingPolicies"
    ]
    assert policy["PolicyName"] == "bc-scaled-invocations-per-instance"
    scaling.apply(autoscaling, scaling.scaling_requests("bc-scaled", "AllTraffic", 2, 5, 600, 300, 60))  # again
    assert scaling.registered(reader, "bc-scaled", "AllTraffic")["MaxCapacity"] == 5
    assert scaling.deregister(autoscaling, "bc-scaled", "AllTraffic") is True
    assert scaling.registered(reader, "bc-scaled", "AllTraffic") is None
    assert not reader.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert scaling.deregister(autoscaling, "bc-scaled", "AllTraffic") is False  # nothing left: no error


def test_an_update_deregisters_only_when_it_changes_what_is_scaled():
    old = {"VariantName": "AllTraffic", "InstanceType": "ml.m5.large", "InitialInstanceCount": 2}
    assert scaling.update_needs_deregistering(old, {**old, "ModelName": "new"}) is None  # a new model is allowed
    assert "instance type changes" in scaling.update_needs_deregistering(old, {**old, "InstanceType": "ml.c5.xlarge"})
    serverless = scaling.serverless_variant(old, 2048, 5)
    assert "serverless" in scaling.update_needs_deregistering(old, serverless)
    assert scaling.update_needs_deregistering(None, old) is None


def test_a_serverless_endpoint_has_a_serverless_variant_and_no_autoscaling():
    built = rollout.deployment_requests(VERSION, SERVERLESS, ROLE, "0123456789abcdef", endpoint_exists=True)
    validate("CreateEndpointConfig", built["endpoint_config"])
    validate("UpdateEndpoint", built["endpoint"])
    [variant] = built["endpoint_config"]["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 5}
    assert "InstanceType" not in variant and "InitialInstanceCount" not in variant
    assert built["scaling"] is None
    with pytest.raises(scaling.ScalingError, match="1024, 2048"):
        rollout.deployment_requests(VERSION, {**SERVERLESS, "serverless_memory_mb": 1500}, ROLE, "x" * 16, True)


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"rollout": "canary"}, "all_at_once only"),
        ({"rollout": "linear"}, "all_at_once only"),
        ({"capture_percent": 20}, "does not support data capture"),
    ],
)
def test_serverless_refuses_what_it_cannot_do_before_anything_is_created(change, refusal):
    with pytest.raises(scaling.ScalingError, match=refusal):
        rollout.deployment_requests(VERSION, {**SERVERLESS, **change}, ROLE, "x" * 16, True)


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"instance_count": 1, "rollout": "canary"}, "needs two instances or more"),
        ({"instance_count": 1, "rollout": "linear"}, "needs two instances or more"),
        ({"instance_count": 2, "rollout": "linear", "linear_step_percent": 25}, "no whole instance"),
        ({"instance_count": 3, "rollout": "canary", "canary_percent": 20}, "canary_percent to 34 or more"),
    ],
)
def test_a_canary_or_linear_step_is_whole_instances_and_a_fleet_too_small_is_refused(change, refusal):
    with pytest.raises(ValueError, match=refusal):
        rollout.deployment_requests(VERSION, {**SCALED, **change}, ROLE, "x" * 16, True)
    # One instance deploys all at once.
    rollout.deployment_requests(VERSION, {**SCALED, **change, "rollout": "all_at_once"}, ROLE, "x" * 16, True)
