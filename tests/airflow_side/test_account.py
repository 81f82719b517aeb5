"""Checks made before anything is paid for: the account's SageMaker quotas (issue #34, F5) and the
endpoint's instance type (W3). Service Quotas is answered by botocore's Stubber, which holds every
request and answer to AWS's own service model, where moto serves no SageMaker quotas (its backend
lists VPC's only and does not implement ListServiceQuotas); moto's server answers the "unavailable"
case as it really answers it."""

from __future__ import annotations

import logging
import re

import boto3
import botocore.session
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from bin_counter.account import (
    QUOTA_CONSOLE,
    SettingsError,
    check_endpoint_instance_type,
    check_quotas,
    instance_processor,
    sagemaker_quota_needs,
    sagemaker_settings,
)

ROLES = {
    "role_arn": "arn:aws:iam::123456789012:role/bin-counter-sagemaker",
    "lambda_role_arn": "arn:aws:iam::123456789012:role/bin-counter-api",
}


# -- W3: the endpoint's instance type -----------------------------------------------------------
def botocore_instance_types() -> set[str]:
    """Every instance type SageMaker's API model lists for training, endpoints and transform jobs."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    shapes = ("TrainingInstanceType", "ProductionVariantInstanceType", "TransformInstanceType")
    return {t for shape in shapes for t in model.shape_for(shape).enum}


def test_instance_processor_is_the_sdks_on_every_instance_type_botocore_lists():
    from sagemaker.core.image_uris import _processor  # the SDK's own rule, the oracle

    types = botocore_instance_types()
    assert len(types) > 100 and {"ml.g4dn.xlarge", "ml.inf2.xlarge", "ml.trn1.2xlarge"} <= types
    differing = {t for t in types if instance_processor(t) != _processor(t, ["cpu", "gpu", "inf", "trn"])}
    assert not differing


@pytest.mark.parametrize(
    ("endpoint", "kind"), [("ml.g4dn.xlarge", "GPU"), ("ml.p3.2xlarge", "GPU"), ("ml.inf2.xlarge", "INF")]
)
def test_an_accelerated_endpoint_type_is_refused_before_anything_starts(endpoint, kind):
    with pytest.raises(SettingsError, match=rf"endpoint_instance_type {re.escape(endpoint)} is a {kind} instance"):
        sagemaker_settings(ROLES, "us-east-1", "ml.g4dn.xlarge", endpoint)


def test_cpu_endpoint_types_pass_and_a_malformed_type_is_named():
    for endpoint in ("ml.m5.large", "ml.c5.xlarge", "ml.c7g.large", "ml.r5.large"):
        check_endpoint_instance_type(endpoint)
    with pytest.raises(SettingsError, match=r"'m5\.large' is not a SageMaker instance type"):
        check_endpoint_instance_type("m5.large")


# -- F5: quotas ---------------------------------------------------------------------------------
def quotas_client():
    return boto3.client("service-quotas", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y")


def quota(name: str, code: str, value: float) -> dict:
    return {
        "ServiceCode": "sagemaker",
        "ServiceName": "Amazon SageMaker",
        "QuotaArn": f"arn:aws:servicequotas:eu-west-1:123456789012:sagemaker/{code}",
        "QuotaCode": code,
        "QuotaName": name,
        "Value": value,
        "Unit": "None",
        "Adjustable": True,
        "GlobalQuota": False,
    }


APPLIED_PAGES = [
    [quota("ml.m5.xlarge for training job usage", "L-M5TRAIN", 4.0)],
    [quota("ml.g4dn.xlarge for training job usage", "L-G4TRAIN", 0.0), quota("Number of training jobs", "L-JOBS", 50)],
]
# ListServiceQuotas leaves out quotas without an applied value: this one is only among the defaults.
DEFAULT_PAGES = [[quota("ml.m5.large for endpoint usage", "L-M5ENDPT", 2.0)]]


def stub_listing(stubber: Stubber, operation: str, pages: list[list[dict]]) -> None:
    """Pages as AWS serves them: NextToken until the last, each request asking for the token it got."""
    for i, page in enumerate(pages):
        request = {"ServiceCode": "sagemaker", **({"NextToken": f"t{i}"} if i else {})}
        answer = {"Quotas": page, **({"NextToken": f"t{i + 1}"} if i + 1 < len(pages) else {})}
        stubber.add_response(operation, answer, request)


def test_the_run_needs_its_most_instances_at_once_and_twice_the_endpoint_for_an_update():
    needs = sagemaker_quota_needs("ml.g4dn.xlarge", 2 * 1, "ml.m5.large", 1)
    assert needs == {"ml.g4dn.xlarge for training job usage": 2, "ml.m5.large for endpoint usage": 2}
    # A first deployment starts one fleet only: an account whose quota is 1 can afford it.
    first = sagemaker_quota_needs(endpoint_instance_type="ml.m5.large", endpoint_instances=1, endpoint_update=False)
    assert first == {"ml.m5.large for endpoint usage": 1}
    assert sagemaker_quota_needs(transform_instance_type="ml.m5.xlarge", transform_instances=3) == {
        "ml.m5.xlarge for transform job usage": 3
    }


def test_a_quota_below_the_runs_needs_is_refused_with_its_name_the_numbers_and_the_link():
    client = quotas_client()
    with Stubber(client) as stubber:
        stub_listing(stubber, "list_service_quotas", APPLIED_PAGES)
        stub_listing(stubber, "list_aws_default_service_quotas", DEFAULT_PAGES)
        with pytest.raises(SettingsError) as refused:
            check_quotas(client, "eu-west-1", sagemaker_quota_needs("ml.g4dn.xlarge", 2, "ml.m5.large", 1))
        stubber.assert_no_pending_responses()
    message = str(refused.value)
    link = QUOTA_CONSOLE.format(region="eu-west-1", code="L-G4TRAIN")
    assert f"'ml.g4dn.xlarge for training job usage' is 0 and this run needs 2: raise it at {link}" in message
    assert link == "https://eu-west-1.console.aws.amazon.com/servicequotas/home/services/sagemaker/quotas/L-G4TRAIN"
    assert "endpoint usage" not in message  # the default of 2 covers an update of one instance


def test_enough_quota_passes_with_one_listing_when_every_quota_has_an_applied_value():
    client = quotas_client()
    with Stubber(client) as stubber:
        stub_listing(stubber, "list_service_quotas", APPLIED_PAGES)  # no default listing is asked for
        found = check_quotas(client, "eu-west-1", sagemaker_quota_needs("ml.m5.xlarge", 4))
        stubber.assert_no_pending_responses()
    assert found == {"ml.m5.xlarge for training job usage": 4.0}


def test_an_unknown_quota_is_warned_about_not_refused(caplog):
    client = quotas_client()
    with Stubber(client) as stubber, caplog.at_level(logging.WARNING, logger="bin_counter.account"):
        stub_listing(stubber, "list_service_quotas", APPLIED_PAGES)
        stub_listing(stubber, "list_aws_default_service_quotas", DEFAULT_PAGES)
        assert check_quotas(client, "eu-west-1", {"ml.x9.huge for training job usage": 1}) == {}
    assert "lists no SageMaker quota 'ml.x9.huge for training job usage'" in caplog.text


def test_denied_quotas_warn_and_let_the_run_go_on(caplog):
    client = quotas_client()
    with Stubber(client) as stubber, caplog.at_level(logging.WARNING, logger="bin_counter.account"):
        stubber.add_client_error("list_service_quotas", "AccessDeniedException", "not authorized", 400)
        assert check_quotas(client, "eu-west-1", sagemaker_quota_needs("ml.g4dn.xlarge", 2)) is None
    assert "servicequotas:ListServiceQuotas and servicequotas:ListAWSDefaultServiceQuotas" in caplog.text


def test_an_unavailable_service_quotas_warns_against_moto_s_server(moto_endpoint, caplog):
    """moto's server does not implement ListServiceQuotas: its answer stands for a Service Quotas that
    cannot be reached or answers an error, and the check then warns and lets the run go on."""
    client = boto3.client(
        "service-quotas",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}),
    )
    with caplog.at_level(logging.WARNING, logger="bin_counter.account"):
        assert check_quotas(client, "us-east-1", sagemaker_quota_needs("ml.g4dn.xlarge", 2)) is None
    assert "could not read the account's SageMaker quotas" in caplog.text
