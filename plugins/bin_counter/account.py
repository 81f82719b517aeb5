"""The account a run uses, checked before anything is started: the roles, AWS's framework images for
the region and the instance types, and the bucket. Each refusal says what to set, usually a stack
output of infra/pipeline.yaml."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

from botocore.exceptions import BotoCoreError, ClientError

from bin_counter.paths import CODE_DIR

# The SageMaker PyTorch images the jobs and the endpoint run: one framework version for which the SDK
# lists both a training and an inference image. sagemaker_code/framework.json is the one place for it:
# .venv-container is built to match it (the Makefile, requirements-container.txt), so the code is tested
# locally on the torch and the Python these images have.
FRAMEWORK_FILE = CODE_DIR / "framework.json"
FRAMEWORK_SPEC = json.loads(FRAMEWORK_FILE.read_text())
FRAMEWORK, FRAMEWORK_VERSION, PY_VERSION = (FRAMEWORK_SPEC[k] for k in ("framework", "framework_version", "py_version"))


log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """An account setting the run cannot start without; the message says what to set."""


STACK_HINT = '(infra/pipeline.yaml\'s outputs; see docs/infra/README.md, "Run it on AWS")'


def instance_processor(instance_type: str) -> str:
    """ "cpu", "gpu", "inf" (Inferentia) or "trn" (Trainium): what an `ml.<family>.<size>` instance type
    computes on, by the SageMaker SDK's rule (`sagemaker.core.image_uris._processor`: the family's
    prefix). Kept here rather than imported because MWAA's constraints leave the SDK out
    (docs/infra/README.md, "On MWAA"); tests/airflow_side/test_account.py holds it equal to the SDK's on
    every instance type botocore lists."""
    parts = instance_type.split(".")
    family = parts[1] if len(parts) == 3 and parts[0] == "ml" else ""
    if not family:
        raise SettingsError(f"{instance_type!r} is not a SageMaker instance type (ml.<family>.<size>)")
    for prefix in ("inf", "trn"):
        if family.startswith(prefix):
            return prefix
    return "gpu" if family[0] in ("g", "p") else "cpu"


def check_endpoint_instance_type(endpoint_instance_type: str) -> None:
    """Refuse an accelerated endpoint type: the serving graph runs on the CPU only
    (sagemaker_code/serving_graph.py), so a GPU would be paid and idle, and TorchServe would start one
    worker per GPU (its default_workers_per_model) on one CPU thread: slower than a CPU type."""
    processor = instance_processor(endpoint_instance_type)
    if processor != "cpu":
        raise SettingsError(
            f"endpoint_instance_type {endpoint_instance_type} is a {processor.upper()} instance, but the model "
            "is served on the CPU only: its accelerator would be paid for and never used. Choose a CPU type "
            "(ml.m5.large, ml.c5.xlarge, ...)"
        )


def framework_images(region: str, training_instance_type: str, endpoint_instance_type: str) -> dict[str, str]:
    """AWS's PyTorch training and inference images for this region and these instance types (GPU images
    for GPU instances), as the SageMaker SDK lists them; SettingsError, saying what is supported, else."""
    try:
        from sagemaker.core import image_uris  # the SDK takes seconds to import: only in the task that asks
    except ImportError as exc:  # MWAA: its constraints leave the SDK out (docs/infra/README.md, "On MWAA")
        raise SettingsError(
            "the SageMaker SDK is not installed here, so it cannot name AWS's images: add training_image and "
            "inference_image to the Airflow Variable bin_counter_sagemaker (docs/infra/README.md, 'On MWAA')"
        ) from exc

    images = {}
    for key, scope, instance_type in (
        ("training_image", "training", training_instance_type),
        ("inference_image", "inference", endpoint_instance_type),
    ):
        try:
            images[key] = image_uris.retrieve(
                FRAMEWORK,
                region=region,
                version=FRAMEWORK_VERSION,
                py_version=PY_VERSION,
                instance_type=instance_type,
                image_scope=scope,
            )
        except ValueError as exc:
            raise SettingsError(
                f"no SageMaker {FRAMEWORK} {FRAMEWORK_VERSION} {PY_VERSION} {scope} image for "
                f"{instance_type} in {region}: {exc}"
            ) from exc
    return images


def sagemaker_settings(
    variable: Mapping | None,
    region: str | None,
    training_instance_type: str = "ml.m5.xlarge",
    endpoint_instance_type: str = "ml.m5.large",
) -> dict:
    """Account settings from the `bin_counter_sagemaker` Variable: role_arn and lambda_role_arn (both
    required), and optionally training_image and inference_image (default: AWS's PyTorch images for the
    region and the instance types, from the SageMaker SDK)."""
    variable = dict(variable or {})
    # Two roles, because each service accepts only a role whose trust policy names it: Lambda refuses
    # the SageMaker role, and would do so after the endpoint had already switched.
    missing = [k for k in ("role_arn", "lambda_role_arn") if not variable.get(k)]
    if missing:
        raise SettingsError(
            f"the Airflow Variable bin_counter_sagemaker lacks {' and '.join(missing)}: set it to the stack "
            f"output SageMakerVariable {STACK_HINT}, JSON like "
            '{"role_arn": "arn:aws:iam::<account>:role/<SageMaker execution role>", '
            '"lambda_role_arn": "arn:aws:iam::<account>:role/<API function role>"}'
        )
    check_endpoint_instance_type(endpoint_instance_type)
    region = region or "us-east-1"
    # The registry's account differs by region (af-south-1, eu-south-1, China, ...): the SDK knows it.
    images = (
        {}
        if {"training_image", "inference_image"} <= set(variable)
        else framework_images(region, training_instance_type, endpoint_instance_type)
    )
    return {
        "region": region,
        "role_arn": variable["role_arn"],
        "lambda_role_arn": variable["lambda_role_arn"],
        **images,
        **{k: variable[k] for k in ("training_image", "inference_image") if k in variable},
    }


def check_bucket(s3, bucket: str, region: str) -> str:
    """Fail early unless `bucket` exists, is ours to use, and is in the connection's `region` (SageMaker
    reads training data only from its own region). Returns the bucket's region."""
    try:
        s3.head_bucket(Bucket=bucket)
        location = s3.get_bucket_location(Bucket=bucket).get("LocationConstraint")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise SettingsError(
                f"the bucket {bucket} does not exist: deploy infra/pipeline.yaml and set the "
                f"bucket Param to its output BucketName {STACK_HINT}"
            ) from exc
        if code in ("403", "AccessDenied"):
            raise SettingsError(
                f"the bucket {bucket} exists but these credentials may not use it: S3 bucket "
                "names are global, so it may be someone else's; set the bucket Param to the stack "
                "output BucketName, and attach the outputs WorkerPolicyArn and WorkerScalingPolicyArn to the "
                f"workers {STACK_HINT}"
            ) from exc
        raise
    found = location or "us-east-1"  # S3 answers no LocationConstraint for us-east-1
    if found != region:
        raise SettingsError(
            f"the bucket {bucket} is in {found}, but the Airflow connection's region is {region}: "
            "SageMaker jobs read their data from their own region. Set the connection's region_name "
            "to the bucket's, or use a bucket in the connection's region."
        )
    return found


# -- quotas: checked before anything is paid for --------------------------------------------------
# A new account's quota for most GPU types is 0: every trial then fails with ResourceLimitExceeded
# ("The account-level service limit 'ml.g4dn.xlarge for training job usage' is 0 Instances"), and an
# endpoint that cannot start is met only after the paid training. The quotas' codes differ per
# quota and cannot be derived from their names: they are listed, once per check.
QUOTA_CONSOLE = "https://{region}.console.aws.amazon.com/servicequotas/home/services/sagemaker/quotas/{code}"
# What the check calls: the worker policy must grant both (infra/pipeline.yaml).
QUOTA_ACTIONS = ("servicequotas:ListServiceQuotas", "servicequotas:ListAWSDefaultServiceQuotas")


def quota_name(instance_type: str, usage: str) -> str:
    """SageMaker's quota for `instance_type` in a usage: "training job", "endpoint" or "transform job"."""
    return f"{instance_type} for {usage} usage"


def sagemaker_quota_needs(
    training_instance_type: str | None = None,
    training_instances: int = 0,
    endpoint_instance_type: str | None = None,
    endpoint_instances: int = 0,
    transform_instance_type: str | None = None,
    transform_instances: int = 0,
    endpoint_update: bool = True,
) -> dict[str, int]:
    """Quota name -> instances a run has at once. Training: the most at once of the tuning job (its
    trials at once x instance count) and the final job. Endpoint: for an update of an endpoint that
    serves, twice its instance count, because an update without a DeploymentConfig is a blue/green
    deployment that starts the new fleet before it retires the old one (SageMaker API reference,
    BlueGreenUpdatePolicy); for a first deployment, its instance count."""
    needs = {
        (training_instance_type, "training job"): training_instances,
        (endpoint_instance_type, "endpoint"): (2 if endpoint_update else 1) * endpoint_instances,
        (transform_instance_type, "transform job"): transform_instances,
    }
    return {quota_name(t, usage): n for (t, usage), n in needs.items() if t and n > 0}


def sagemaker_quotas(quotas_client, names: Iterable[str]) -> dict[str, dict]:
    """Quota name -> {"code", "value"} for these SageMaker quotas: the account's applied values
    (ListServiceQuotas); AWS's defaults (ListAWSDefaultServiceQuotas) for those that answer none, as
    ListServiceQuotas leaves out a quota whose applied value is not available."""
    wanted, found = set(names), {}
    for operation in ("list_service_quotas", "list_aws_default_service_quotas"):
        for page in quotas_client.get_paginator(operation).paginate(ServiceCode="sagemaker"):
            for quota in page.get("Quotas", []):
                if quota.get("QuotaName") in wanted and quota["QuotaName"] not in found:
                    found[quota["QuotaName"]] = {"code": quota["QuotaCode"], "value": quota.get("Value", 0)}
        if wanted <= set(found):
            break
    return found


def check_quotas(quotas_client, region: str, needs: Mapping[str, int]) -> dict[str, float] | None:
    """Refuse (SettingsError) when a SageMaker quota is below what the run needs at once, naming the
    quota, both numbers and the page that raises it. Returns the quotas read (name -> value).

    Where the quotas cannot be read (the permission missing, Service Quotas unreachable) it warns and
    returns None: SageMaker still enforces the quota itself, refusing the job before any instance is
    paid for, so the check only saves time and must not stop a run that its account can afford."""
    if not needs:
        return {}
    try:
        quotas = sagemaker_quotas(quotas_client, needs)
    except (ClientError, BotoCoreError) as exc:
        log.warning(
            "could not read the account's SageMaker quotas (%s); the run goes on unchecked. Grant %s to the "
            "workers (the stack's WorkerPolicyArn) to have them checked before anything starts",
            exc,
            " and ".join(QUOTA_ACTIONS),
        )
        return None
    short = []
    for name, needed in needs.items():
        if name not in quotas:
            log.warning("Service Quotas lists no SageMaker quota %r: not checked", name)
        elif quotas[name]["value"] < needed:
            link = QUOTA_CONSOLE.format(region=region, code=quotas[name]["code"])
            short.append(f"'{name}' is {quotas[name]['value']:g} and this run needs {needed}: raise it at {link}")
    if short:
        raise SettingsError(
            "the account's SageMaker quotas are too low, so the jobs would be refused with "
            f"ResourceLimitExceeded: {'; '.join(short)} (or choose an instance type the quotas allow)"
        )
    return {name: quotas[name]["value"] for name in needs if name in quotas}
