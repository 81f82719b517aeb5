"""The account a run uses, checked before anything is started: the roles, AWS's framework images for
the region and the instance types, and the bucket. Each refusal says what to set, usually a stack
output of infra/pipeline.yaml."""

from __future__ import annotations

import json
from collections.abc import Mapping

from botocore.exceptions import ClientError

from bin_counter.paths import CODE_DIR

# The SageMaker PyTorch images the jobs and the endpoint run: one framework version for which the SDK
# lists both a training and an inference image. sagemaker_code/framework.json is the one place for it:
# .venv-container is built to match it (the Makefile, requirements-container.txt), so the code is tested
# locally on the torch and the Python these images have.
FRAMEWORK_FILE = CODE_DIR / "framework.json"
FRAMEWORK_SPEC = json.loads(FRAMEWORK_FILE.read_text())
FRAMEWORK, FRAMEWORK_VERSION, PY_VERSION = (FRAMEWORK_SPEC[k] for k in ("framework", "framework_version", "py_version"))


class SettingsError(ValueError):
    """An account setting the run cannot start without; the message says what to set."""


STACK_HINT = '(infra/pipeline.yaml\'s outputs; see docs/infra/README.md, "Run it on AWS")'


def framework_images(region: str, training_instance_type: str, endpoint_instance_type: str) -> dict[str, str]:
    """AWS's PyTorch training and inference images for this region and these instance types (GPU images
    for GPU instances), as the SageMaker SDK lists them; SettingsError, saying what is supported, else."""
    from sagemaker.core import image_uris  # the SDK takes seconds to import: only in the task that asks

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
                f"output BucketName, and attach the output WorkerPolicyArn to the workers {STACK_HINT}"
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
