"""The SageMaker Model Registry through the stand-in's endpoint: moto's SageMaker backend answers it
(standin/sagemaker/forward.py), the stand-in writes each call to the call log once, as the caller's, and
the calls the DAGs make are ones infra/pipeline.yaml allows the Airflow worker (the `standin` fixture's
`permitted_calls_only`).

Where moto differs from AWS in a way the DAGs could meet, a test here shows it, so that the day moto
changes the test says so."""

from __future__ import annotations

import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from standin.aws_calls import WORKER_ACCESS_KEY_ID, read_calls
from tests.airflow_side.conftest import ENDPOINT, sagemaker_client

ACCOUNT_ARN = "arn:aws:sagemaker:us-east-1:000000000000"


def group_name() -> str:
    """A group of the test's own (the suite's moto server keeps its registry for the whole session),
    named as the worker may name one: after the stack's endpoint."""
    return f"{ENDPOINT}-models-{uuid.uuid4().hex[:12]}"


def worker_sagemaker(standin: dict):
    """A SageMaker client signed as the Airflow worker: its calls are held against the worker's policy."""
    return boto3.client(
        "sagemaker",
        endpoint_url=standin["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=WORKER_ACCESS_KEY_ID,
        aws_secret_access_key="local",
    )


def version(group: str, number: int, status: str, accuracy: float) -> dict:
    """A create_model_package request shaped as the retraining DAG registers a model (common35.md, 3)."""
    return {
        "ModelPackageGroupName": group,
        "ModelPackageDescription": f"retrain {number}",
        "InferenceSpecification": {
            "Containers": [
                {
                    "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312",
                    "ModelDataUrl": f"s3://bucket/models/run-{number}/model.tar.gz",
                    "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
                }
            ],
            "SupportedContentTypes": ["image/jpeg", "image/png"],
            "SupportedResponseMIMETypes": ["application/json"],
            "SupportedRealtimeInferenceInstanceTypes": ["ml.m5.large"],
            "SupportedTransformInstanceTypes": ["ml.m5.large"],
        },
        "ModelApprovalStatus": status,
        "ModelMetrics": {
            "ModelQuality": {
                "Statistics": {
                    "ContentType": "application/json",
                    "S3Uri": f"s3://bucket/models/run-{number}/evaluation.json",
                }
            }
        },
        "CustomerMetadataProperties": {"dataset_version": f"v{number}", "accuracy": str(accuracy)},
        "MetadataProperties": {"GeneratedBy": f"{ACCOUNT_ARN}:training-job/bin-counter-run-{number}"},
    }


def test_a_group_of_versions_approved_rejected_and_listed_newest_first(standin, aws_call_log):
    sm, group = worker_sagemaker(standin), group_name()
    start = aws_call_log.stat().st_size if aws_call_log.exists() else 0
    group_arn = sm.create_model_package_group(
        ModelPackageGroupName=group, ModelPackageGroupDescription="bin-counter's models"
    )["ModelPackageGroupArn"]
    assert group_arn == f"{ACCOUNT_ARN}:model-package-group/{group}"
    arns = [
        sm.create_model_package(**version(group, n, "PendingManualApproval", 0.8 + n / 100))["ModelPackageArn"]
        for n in (1, 2, 3)
    ]
    # Versions count from 1 in their group, and a version's ARN is model-package/<group>/<version>.
    assert arns == [f"{ACCOUNT_ARN}:model-package/{group}/{n}" for n in (1, 2, 3)]

    sm.update_model_package(
        ModelPackageArn=arns[1],
        ModelApprovalStatus="Approved",
        ApprovalDescription="the gate: better than the champion",
        CustomerMetadataProperties={"dataset_version": "v2", "accuracy": "0.82", "approved_by": "gate"},
    )
    sm.update_model_package(
        ModelPackageArn=arns[2],
        ModelApprovalStatus="Rejected",
        ApprovalDescription="rejected in the Airflow UI",
        CustomerMetadataProperties={"dataset_version": "v3", "accuracy": "0.83"},
    )
    sm.update_model_package(
        ModelPackageArn=arns[0], ModelApprovalStatus="Approved", CustomerMetadataProperties={"dataset_version": "v1"}
    )

    approved = sm.list_model_packages(
        ModelPackageGroupName=group, ModelApprovalStatus="Approved", SortBy="CreationTime", SortOrder="Descending"
    )["ModelPackageSummaryList"]
    assert [p["ModelPackageArn"] for p in approved] == [arns[1], arns[0]], "approved ones, newest first"
    assert [p["ModelPackageVersion"] for p in approved] == [2, 1]
    assert all(p["ModelPackageGroupName"] == group for p in approved)
    page = sm.list_model_packages(ModelPackageGroupName=group, SortOrder="Descending", MaxResults=2)
    rest = sm.list_model_packages(ModelPackageGroupName=group, SortOrder="Descending", NextToken=page["NextToken"])
    assert [p["ModelPackageVersion"] for p in page["ModelPackageSummaryList"] + rest["ModelPackageSummaryList"]] == [
        3,
        2,
        1,
    ]

    described = sm.describe_model_package(ModelPackageName=arns[1])
    assert described["ModelApprovalStatus"] == "Approved"
    assert described["ApprovalDescription"] == "the gate: better than the champion"
    assert described["ModelMetrics"] == version(group, 2, "Approved", 0.82)["ModelMetrics"]
    assert described["CustomerMetadataProperties"] == {
        "dataset_version": "v2",
        "accuracy": "0.82",
        "approved_by": "gate",
    }
    assert described["InferenceSpecification"]["Containers"][0]["ModelDataUrl"].endswith("run-2/model.tar.gz")
    assert described["MetadataProperties"]["GeneratedBy"].endswith("training-job/bin-counter-run-2")
    assert sm.describe_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupArn"] == group_arn
    # (Listed with the test's own client: the DAGs never list groups, so the worker may not.)
    groups = sagemaker_client(standin).list_model_package_groups(NameContains=group)["ModelPackageGroupSummaryList"]
    assert [g["ModelPackageGroupName"] for g in groups] == [group]

    # Written once each, by the stand-in, as the worker's, on the ARNs AWS's reference builds.
    calls = [c for c in read_calls(aws_call_log, start) if c["caller"] == WORKER_ACCESS_KEY_ID]
    assert {c["server"] for c in calls} == {"standin"}, "moto does not write a forwarded call again"
    assert [c["action"] for c in calls][:4] == ["sagemaker:CreateModelPackageGroup"] + 3 * [
        "sagemaker:CreateModelPackage"
    ]
    assert {c["resource"] for c in calls if c["action"] == "sagemaker:UpdateModelPackage"} == set(arns)
    assert {c["resource"] for c in calls if c["action"] == "sagemaker:CreateModelPackage"} == {group_arn}


def test_a_request_botocore_refuses_never_reaches_moto(standin):
    sm = sagemaker_client(standin)
    with pytest.raises(ClientError) as refused:
        sm.create_model_package_group(ModelPackageGroupName="bin_counter models")  # off the name's pattern
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "at 'modelPackageGroupName' failed to satisfy constraint" in refused.value.response["Error"]["Message"]
    groups = sm.list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert "bin_counter models" not in [g["ModelPackageGroupName"] for g in groups]


def test_a_version_needs_its_group_and_a_missing_one_is_a_validation_error(standin):
    """AWS: a versioned package is created in an existing group ("must be associated with a Model Group",
    docs.aws.amazon.com/sagemaker/latest/dg/model-registry-models.html); moto refuses one in a missing group."""
    sm = sagemaker_client(standin)
    with pytest.raises(ClientError) as missing_group:
        sm.create_model_package(**version(f"{ENDPOINT}-models-nowhere", 1, "Approved", 0.9))
    assert missing_group.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ClientError) as missing:
        sm.describe_model_package(ModelPackageName=f"{ACCOUNT_ARN}:model-package/{ENDPOINT}-models-nowhere/7")
    assert missing.value.response["Error"]["Code"] == "ValidationException"
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_moto_drops_metadata_an_update_does_not_repeat(standin):
    """moto 5.2.5's UpdateModelPackage sets CustomerMetadataProperties and ApprovalDescription to what the
    request carries, None when it leaves them out; AWS changes only what an update names (it has
    CustomerMetadataPropertiesToRemove for removing keys). So an update sends every key it means to keep
    (bin_counter.registry does): this test fails the day moto keeps them, and then that rule can go."""
    sm, group = worker_sagemaker(standin), group_name()
    sm.create_model_package_group(ModelPackageGroupName=group)
    arn = sm.create_model_package(**version(group, 1, "PendingManualApproval", 0.9))["ModelPackageArn"]
    sm.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Rejected")
    described = sm.describe_model_package(ModelPackageName=arn)
    assert described["ModelApprovalStatus"] == "Rejected"
    assert "CustomerMetadataProperties" not in described, "moto now keeps them: drop the rule above"


def test_the_registry_delete_calls_are_refused_as_not_served(standin):
    """moto 5.2.5 does not implement DeleteModelPackage(Group) (its server answers an HTML 500, which
    botocore retries): the stand-in refuses them as a call it does not serve, at once."""
    sm = sagemaker_client(standin)
    with pytest.raises(ClientError) as refused:
        sm.delete_model_package_group(ModelPackageGroupName=f"{ENDPOINT}-models")
    assert refused.value.response["Error"]["Code"] == "UnknownOperationException"
    assert refused.value.response["ResponseMetadata"]["RetryAttempts"] == 0
