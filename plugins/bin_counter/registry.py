"""The SageMaker Model Registry as the list of our models: every retraining run registers the model its
gate chose as a version of the endpoint's model package group, with the evaluation report (the new
model and the serving one on the same test photos) in S3 as its ModelMetrics; the gate or a person
decides its approval status; `bin_count_deploy` deploys only approved versions.

Standard library and boto3 clients passed in: DAG tasks and tests call these functions.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Mapping

from botocore.exceptions import ClientError

from bin_counter.artifacts import put_once
from bin_counter.paths import CODE_DIR

APPROVED, REJECTED, PENDING = "Approved", "Rejected", "PendingManualApproval"
# One group per endpoint: the versions that endpoint may serve, its lineage and its rollback targets.
GROUP_SUFFIX = "-models"
EVALUATIONS_PREFIX = "models/evaluations"
# What the comparison table shows, in this order: (metric, label, higher is better).
TABLE_METRICS = (
    ("accuracy", "accuracy (exact count)", True),
    ("rmse", "RMSE (items)", False),
    ("mae", "MAE (items)", False),
    ("within_1", "within one item", True),
)
VERSION_ARN = re.compile(r"^arn:aws[a-z-]*:sagemaker:[^:]+:\d{12}:model-package/[^/]+/\d+$")


class RegistryError(ValueError):
    """A model package version that cannot be deployed, said in the on-call person's terms."""


def group_name(endpoint_name: str) -> str:
    """The model package group of an endpoint's models (at most 63 characters, as SageMaker allows)."""
    return f"{endpoint_name}{GROUP_SUFFIX}"[:63]


def model_card(archive: bytes) -> dict:
    """model_card.json from a model.tar.gz written by train.py (its `metrics` hold the test scores)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "model_card.json"), None)
        card = None if member is None else tar.extractfile(member)
        if card is None:
            raise ValueError("not a model.tar.gz written by train.py: it has no model_card.json")
        return json.loads(card.read())


def evaluation_report(card_metrics: Mapping, decision: Mapping, training_job: str, dataset_version: str) -> dict:
    """The evaluation report a version's ModelMetrics point at: the registered model ("candidate") and
    the model it was compared with ("serving"), scored by one training job on the same test photos,
    and what the gate decided. `multiclass_classification_metrics` is the shape SageMaker's model
    quality reports use (Studio shows it); `comparison` is ours, for the approval page and on-call."""
    published = decision.get("deploy") == "published"
    # Registering the published model (nothing served and it was the better one): it is the candidate.
    candidate = card_metrics.get("champion") if published else card_metrics.get("test")
    serving = card_metrics.get("test") if published else card_metrics.get("champion")
    if not candidate:
        raise ValueError(f"training job {training_job} reported no test scores for the model it registers")
    report: dict = {
        "training_job": training_job,
        "dataset_version": dataset_version,
        "test_images": candidate.get("n"),
        "gate": {"deploy": decision.get("deploy"), "reason": decision.get("reason")},
        "comparison": {"candidate": _scores(candidate), "serving": _scores(serving) if serving else None},
        "multiclass_classification_metrics": {
            "accuracy": {"value": candidate["accuracy"], "standard_deviation": "NaN"},
            "confusion_matrix": _confusion(candidate.get("confusion_matrix")),
        },
    }
    return report


def _scores(metrics: Mapping) -> dict:
    live = metrics.get("live")  # the test set's live photos alone (captured requests), when it had any
    return {
        "model_version": metrics.get("model_version"),
        **{key: metrics.get(key) for key, _, _ in TABLE_METRICS},
        "per_count_accuracy": metrics.get("per_class_accuracy"),
        "confusion_matrix": metrics.get("confusion_matrix"),
        "live": {key: live.get(key) for key in ("n", *(k for k, _, _ in TABLE_METRICS))} if live else None,
    }


def _confusion(matrix) -> dict:
    """SageMaker's confusion matrix shape: {true label: {predicted label: count}}."""
    if not matrix:
        return {}
    return {str(t): {str(p): n for p, n in enumerate(row)} for t, row in enumerate(matrix)}


def review_markdown(report: Mapping) -> str:
    """The comparison as the approval page shows it: a table, the per-count accuracy, the gate's view."""
    candidate, serving = report["comparison"]["candidate"], report["comparison"]["serving"]
    lines = [
        f"**Candidate** `{candidate['model_version']}` (training job `{report['training_job']}`, dataset "
        f"`{report['dataset_version']}`, {report['test_images']} test photos)",
        "",
        "| metric | candidate | serving now | better |",
        "| --- | --- | --- | --- |",
    ]
    for key, label, higher in TABLE_METRICS:
        new = candidate.get(key)
        old = serving.get(key) if serving else None
        better = "" if new is None or old is None else ("candidate" if (new > old) == higher and new != old else "")
        better = better or ("same" if new == old else "serving" if old is not None and new is not None else "")
        lines.append(f"| {label} | {_number(new)} | {_number(old)} | {better} |")
    per_new = candidate.get("per_count_accuracy") or {}
    per_old = (serving or {}).get("per_count_accuracy") or {}
    if per_new:
        lines += ["", "| items in the bin | candidate accuracy | serving accuracy |", "| --- | --- | --- |"]
        for count in sorted(per_new, key=lambda c: int(c) if str(c).isdigit() else 99):
            lines.append(f"| {count} | {_number(per_new[count])} | {_number(per_old.get(count))} |")
    lines += _live_rows(candidate.get("live"), (serving or {}).get("live"))
    lines += ["", f"**The gate says:** {report['gate']['reason']}"]
    if not serving:
        lines.append("Nothing serves yet: there is no model to compare with.")
    return "\n".join(lines)


def _live_rows(new: Mapping | None, old: Mapping | None) -> list[str]:
    """The comparison on the live photos alone (clients' photos with a confirmed count), if any."""
    if not new:
        return []
    lines = [
        "",
        f"On the {new['n']} live photos of the test set (captured requests whose count was confirmed):",
        "",
        "| metric | candidate | serving now |",
        "| --- | --- | --- |",
    ]
    for key, label, _ in TABLE_METRICS:
        lines.append(f"| {label} | {_number(new.get(key))} | {_number((old or {}).get(key))} |")
    return lines


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def store_report(s3, bucket: str, report: Mapping) -> str:
    """The report's S3 URI, written once per training job and choice (a retried task writes nothing new)."""
    body = json.dumps(report, indent=2, sort_keys=True).encode()
    key = f"{EVALUATIONS_PREFIX}/{report['training_job']}/{report['gate']['deploy']}/evaluation.json"
    return put_once(s3, bucket, key, body)


def content_types() -> dict[str, list[str]]:
    """What the endpoint really accepts and answers: sagemaker_code/api_contract.json, the table the
    model's inference.py checks requests against."""
    contract = json.loads((CODE_DIR / "api_contract.json").read_text())["content_types"]
    accepts = contract["image"] + contract["json"]
    return {"SupportedContentTypes": accepts, "SupportedResponseMIMETypes": ["application/json"]}


def version_request(
    group: str,
    image_uri: str,
    model_data_url: str,
    report_uri: str,
    metadata: Mapping[str, object],
    description: str,
    environment: Mapping[str, str] | None = None,
    instance_types: tuple[str, ...] = (),
) -> dict:
    """CreateModelPackage for one version of `group`, PendingManualApproval until the gate or a person
    decides. `metadata` (training job, dataset version, run, model version) becomes its
    CustomerMetadataProperties: strings, as SageMaker takes them."""
    container = {
        "Image": image_uri,
        "ModelDataUrl": model_data_url,
        "Environment": {"SAGEMAKER_PROGRAM": "inference.py", **(environment or {})},
    }
    return {
        "ModelPackageGroupName": group,
        "ModelPackageDescription": description[:1024],
        "InferenceSpecification": {
            "Containers": [container],
            **content_types(),
            **({"SupportedRealtimeInferenceInstanceTypes": list(instance_types)} if instance_types else {}),
        },
        "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": report_uri}}},
        "ModelApprovalStatus": PENDING,
        "CustomerMetadataProperties": {k: str(v)[:256] for k, v in metadata.items() if v not in (None, "")},
    }


def ensure_group(sm, group: str, description: str) -> None:
    """Create the model package group unless it exists."""
    try:
        sm.describe_model_package_group(ModelPackageGroupName=group)
        return
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("ValidationException", "ResourceNotFound"):
            raise
    sm.create_model_package_group(ModelPackageGroupName=group, ModelPackageGroupDescription=description[:1024])


def versions(sm, group: str, status: str | None = None) -> list[dict]:
    """The group's versions, newest first (ListModelPackages summaries), optionally of one status."""
    found, token = [], None
    while True:
        kwargs = {"ModelPackageGroupName": group, "SortBy": "CreationTime", "SortOrder": "Descending"}
        if status:
            kwargs["ModelApprovalStatus"] = status
        if token:
            kwargs["NextToken"] = token
        page = sm.list_model_packages(**kwargs)
        found += page["ModelPackageSummaryList"]
        token = page.get("NextToken")
        if not token:
            return found


def register(sm, request: Mapping, run_key: str) -> str:
    """The version's ARN: the one this run registered already (a retried task, a re-run), else a new
    one. `run_key` is the CustomerMetadataProperties value that names the run's registration."""
    for summary in versions(sm, request["ModelPackageGroupName"]):
        described = sm.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
        if described.get("CustomerMetadataProperties", {}).get("registration") == run_key:
            return summary["ModelPackageArn"]
    request = {
        **request,
        "CustomerMetadataProperties": {**request["CustomerMetadataProperties"], "registration": run_key},
    }
    return sm.create_model_package(**request)["ModelPackageArn"]


def set_status(sm, arn: str, status: str, reason: str) -> None:
    """Approve or reject a version, with the reason on record (ApprovalDescription, 1,024 characters).
    Its metadata is sent again: moto's UpdateModelPackage replaces what a request leaves out, and AWS
    keeps what is sent unchanged (tests/airflow_side/test_registry_standin.py)."""
    metadata = sm.describe_model_package(ModelPackageName=arn).get("CustomerMetadataProperties") or {}
    sm.update_model_package(
        ModelPackageArn=arn,
        ModelApprovalStatus=status,
        ApprovalDescription=reason[:1024],
        **({"CustomerMetadataProperties": metadata} if metadata else {}),
    )


def newest_approved(sm, group: str) -> str | None:
    """The newest Approved version's ARN, or None. Newest by version number: SageMaker numbers a group's
    versions in the order they were created, where two creation times may be equal to the second."""
    approved = versions(sm, group, APPROVED)
    newest = max(approved, key=lambda summary: summary["ModelPackageVersion"], default=None)
    return newest["ModelPackageArn"] if newest else None


def version_arn(sm, group: str, spec: str) -> str:
    """A version as the on-call person names it: its number ("3"), or its ARN."""
    spec = spec.strip()
    if VERSION_ARN.match(spec):
        return spec
    if spec.isdigit():
        for summary in versions(sm, group):
            if str(summary.get("ModelPackageVersion")) == spec:
                return summary["ModelPackageArn"]
        raise RegistryError(f"model package group {group} has no version {spec}; {_listing(sm, group)}")
    raise RegistryError(f"{spec!r} is neither a version number of {group} nor a model package version ARN")


def deployable(sm, arn: str) -> dict:
    """What deploying a version needs (image, artifact, environment, its metadata), refusing a version
    that is not Approved: a rejected or pending model never reaches the endpoint."""
    try:
        described = sm.describe_model_package(ModelPackageName=arn)
    except ClientError as exc:
        raise RegistryError(f"model package {arn}: {exc.response['Error']['Message']}") from exc
    status = described.get("ModelApprovalStatus")
    if status != APPROVED:
        why = described.get("ApprovalDescription") or "no reason recorded"
        raise RegistryError(
            f"model package version {described.get('ModelPackageVersion')} of {described.get('ModelPackageGroupName')} "
            f"is {status}, not Approved ({why}); approve it in the registry first, or choose an approved version"
        )
    [container] = described["InferenceSpecification"]["Containers"]
    metadata = described.get("CustomerMetadataProperties", {})
    return {
        "arn": arn,
        "group": described["ModelPackageGroupName"],
        "version": described["ModelPackageVersion"],
        "image": container["Image"],
        "model_data_url": container["ModelDataUrl"],
        "environment": container.get("Environment", {}),
        "model_version": metadata.get("model-version"),
        "dataset_version": metadata.get("dataset-version"),
        "training_job": metadata.get("training-job"),
    }


def _listing(sm, group: str) -> str:
    rows = [f"{s.get('ModelPackageVersion')} ({s.get('ModelApprovalStatus')})" for s in versions(sm, group)[:10]]
    return "versions: " + (", ".join(rows) if rows else "none")
