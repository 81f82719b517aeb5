"""Keeping the bill down, as functions of boto3 clients, testable without Airflow.

What costs money after a run: the endpoint (an instance billed by the hour whether or not anyone
calls it) and S3 storage (every tuning trial's model artifact and every checkpoint stays in the
bucket for ever). Models and endpoint configurations cost nothing, but they pile up, one per
deployment. These functions find what may go and delete it; each takes `dry_run` so an operator can
see the list first. What a serving or gated model may need is never touched: datasets, code, the
published models and the final training jobs' artifacts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

from botocore.exceptions import ClientError

log = logging.getLogger(__name__)

# run_job_names (sagemaker_config.py) names every model and endpoint configuration the retraining DAG
# registers "bin-counter-<hash>-final" (or "-published"): the prefix tells ours from anyone else's.
MODEL_PREFIX = "bin-counter-"
# What a run leaves behind and nothing needs afterwards: tuning trials' model artifacts (the final job
# retrains with the best trial's hyperparameters) and checkpoints (only a retry of the same job
# resumes from them).
EXPIRING_PREFIXES = ("models/tuning/", "checkpoints/")
# Never deleted, whatever a caller asks: datasets (a model's record of what it learned from) and the
# photos and labels their manifests point at (abid/), the training code, the published models, and
# the final artifacts under models/<job>/ that a model (serving, gated, or kept to redeploy) points at.
PROTECTED_PREFIXES = ("datasets/", "abid/", "code/", "models/published/")
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
LIST_PAGE = 100  # the most a SageMaker List* call returns at once


def retention_cutoff(retention_days: int, now: datetime | None = None) -> datetime:
    """`now - retention_days` (UTC): what was created before it has expired.

    A cut-off of at least a day keeps what a run in progress is still writing (its checkpoints, the
    model it is about to deploy) out of reach."""
    if retention_days < 1:
        raise ValueError(f"retention_days is {retention_days}: keep at least one day")
    return (now or datetime.now(UTC)) - timedelta(days=retention_days)


def _aware(when: datetime) -> datetime:
    # boto3's times carry a zone; a naive cut-off would compare wrongly (or not at all).
    if when.tzinfo is None:
        raise ValueError(f"older_than {when.isoformat()} has no time zone: pass an aware datetime (UTC)")
    return when


def _not_found(exc: ClientError) -> bool:
    # SageMaker answers a name it does not know with ValidationException (as endpoint.serving_model relies on).
    return exc.response["Error"]["Code"] in ("ValidationException", "ResourceNotFound")


def _sagemaker_list(sm, method: str, field: str, **params) -> Iterator[dict]:
    """Every item of a SageMaker List* call, page by page (NextToken)."""
    call = getattr(sm, method)
    token = None
    while True:
        page = call(MaxResults=LIST_PAGE, **params, **({"NextToken": token} if token else {}))
        yield from page.get(field, [])
        token = page.get("NextToken")
        if not token:
            return


# -- the endpoint ----------------------------------------------------------------------------------
def _config_models(sm, config_name: str | None) -> list[str]:
    if not config_name:
        return []
    try:
        config = sm.describe_endpoint_config(EndpointConfigName=config_name)
    except ClientError as exc:
        if _not_found(exc):
            return []
        raise
    return [variant["ModelName"] for variant in config["ProductionVariants"]]


def _endpoint_configs(endpoint: dict) -> list[str]:
    # During an update the configuration being rolled out is only in PendingDeploymentSummary.
    pending = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
    return [c for c in (endpoint.get("EndpointConfigName"), pending) if c]


def endpoints_in_use(sm) -> dict[str, list[str]]:
    """Every endpoint of the account and region with the configurations it serves (or is moving to)."""
    used = {}
    for summary in _sagemaker_list(sm, "list_endpoints", "Endpoints"):
        try:
            endpoint = sm.describe_endpoint(EndpointName=summary["EndpointName"])
        except ClientError as exc:
            if _not_found(exc):
                continue  # deleted since it was listed
            raise
        used[summary["EndpointName"]] = _endpoint_configs(endpoint)
    return used


def serving_models(sm) -> set[str]:
    """The models any endpoint serves: whatever a deletion must leave alone."""
    return {
        model for configs in endpoints_in_use(sm).values() for config in configs for model in _config_models(sm, config)
    }


def delete_endpoint(sm, endpoint_name: str, dry_run: bool, poll_s: float = 15, max_wait_s: float = 900) -> dict:
    """Delete the endpoint, the one thing billed by the hour, then the endpoint configuration it used.

    The model stays: it costs nothing, and with it an operator redeploys by creating a configuration
    and an endpoint again. A configuration that another endpoint also serves stays too. No endpoint
    is not an error: the report says there was nothing to delete. Waits until SageMaker has really
    deleted the endpoint, so a success means the billing stopped."""
    try:
        endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as exc:
        if _not_found(exc):
            return {
                "endpoint": endpoint_name,
                "deleted": False,
                "dry_run": dry_run,
                "endpoint_configs": [],
                "models_kept": [],
                "summary": f"nothing to delete: there is no endpoint {endpoint_name}",
            }
        raise
    configs = _endpoint_configs(endpoint)
    models = sorted({m for c in configs for m in _config_models(sm, c)})
    report = {
        "endpoint": endpoint_name,
        "deleted": not dry_run,
        "dry_run": dry_run,
        "status": endpoint["EndpointStatus"],
        "endpoint_configs": configs,
        "models_kept": models,
    }
    if dry_run:
        report["summary"] = (
            f"dry run: would delete endpoint {endpoint_name} ({endpoint['EndpointStatus']}) and "
            f"its configuration {', '.join(configs) or '(none)'}; would keep model(s) "
            f"{', '.join(models) or '(none)'}"
        )
        return report
    sm.delete_endpoint(EndpointName=endpoint_name)
    sm.get_waiter("endpoint_deleted").wait(
        EndpointName=endpoint_name,
        WaiterConfig={"Delay": max(1, round(poll_s)), "MaxAttempts": max(1, int(max_wait_s // max(poll_s, 1)))},
    )
    elsewhere = {c for other, used in endpoints_in_use(sm).items() if other != endpoint_name for c in used}
    report["endpoint_configs_kept"] = sorted(set(configs) & elsewhere)
    report["endpoint_configs"] = [c for c in configs if c not in elsewhere]
    for config in report["endpoint_configs"]:
        try:
            sm.delete_endpoint_config(EndpointConfigName=config)
        except ClientError as exc:
            if not _not_found(exc):
                raise
    kept = (
        f"; kept configuration(s) {', '.join(report['endpoint_configs_kept'])} (other endpoints serve them)"
        if report["endpoint_configs_kept"]
        else ""
    )
    report["summary"] = (
        f"deleted endpoint {endpoint_name} and its configuration "
        f"{', '.join(report['endpoint_configs']) or '(none)'}{kept}; kept model(s) "
        f"{', '.join(models) or '(none)'}"
    )
    return report


# -- models and endpoint configurations ---------------------------------------------------------------
def expired_models(sm, serving_model_names: Iterable[str], older_than: datetime, keep_latest: int = 0) -> list[dict]:
    """The project's models (named `bin-counter-...`) created before `older_than` that no endpoint
    serves, oldest first, each with the endpoint configurations that name it:
    [{"model", "created", "endpoint_configs"}].

    `serving_model_names` must hold every endpoint's models (serving_models gives them), and those
    an operator wants kept. `keep_latest` keeps the newest models whatever their age, so that after
    the endpoint is torn down there is still one to redeploy."""
    older_than, serving = _aware(older_than), set(serving_model_names)
    ours = sorted(
        (
            m
            for m in _sagemaker_list(sm, "list_models", "Models", NameContains=MODEL_PREFIX)
            if m["ModelName"].startswith(MODEL_PREFIX)
        ),
        key=lambda m: m["CreationTime"],
    )
    newest = {m["ModelName"] for m in ours[len(ours) - keep_latest :]} if keep_latest > 0 else set()
    expired = [m for m in ours if m["CreationTime"] < older_than and m["ModelName"] not in serving | newest]
    if not expired:
        return []
    by_model: dict[str, list[str]] = {}
    for summary in _sagemaker_list(sm, "list_endpoint_configs", "EndpointConfigs", NameContains=MODEL_PREFIX):
        if summary["EndpointConfigName"].startswith(MODEL_PREFIX):
            for model in _config_models(sm, summary["EndpointConfigName"]):
                by_model.setdefault(model, []).append(summary["EndpointConfigName"])
    return [
        {
            "model": m["ModelName"],
            "created": m["CreationTime"].isoformat(),
            "endpoint_configs": sorted(by_model.get(m["ModelName"], [])),
        }
        for m in expired
    ]


def delete_models(sm, expired: Sequence[dict], dry_run: bool) -> dict:
    """Delete each expired model's endpoint configurations, then the model (a configuration naming a
    deleted model could never be deployed). One that is already gone counts as deleted; any other
    error is reported with its name and the rest are still deleted."""
    configs = sorted({c for item in expired for c in item["endpoint_configs"]})
    models = [item["model"] for item in expired]
    if dry_run:
        return {"dry_run": True, "models": models, "endpoint_configs": configs, "errors": []}
    errors: list[dict] = []
    deleted_configs: list[str] = []
    deleted_models: list[str] = []
    for kind, names, delete, done in (
        ("endpoint config", configs, lambda n: sm.delete_endpoint_config(EndpointConfigName=n), deleted_configs),
        ("model", models, lambda n: sm.delete_model(ModelName=n), deleted_models),
    ):
        for name in names:
            try:
                delete(name)
            except ClientError as exc:
                if not _not_found(exc):
                    errors.append(
                        {
                            "kind": kind,
                            "name": name,
                            "code": exc.response["Error"]["Code"],
                            "message": exc.response["Error"].get("Message", ""),
                        }
                    )
                    continue
            done.append(name)
    return {"dry_run": False, "models": deleted_models, "endpoint_configs": deleted_configs, "errors": errors}


# -- S3 objects --------------------------------------------------------------------------------------
def _deletable(key: str) -> bool:
    return key.startswith(EXPIRING_PREFIXES) and not key.startswith(PROTECTED_PREFIXES)


def expired_objects(s3, bucket: str, older_than: datetime, prefixes: Sequence[str] = EXPIRING_PREFIXES) -> list[dict]:
    """Objects under `prefixes` last written before `older_than`: [{"key", "size", "last_modified"}].

    Only prefixes inside models/tuning/ and checkpoints/ are accepted: anything else (datasets/,
    code/, models/published/, the final artifacts under models/<job>/) is refused with ValueError
    rather than listed, so no caller can widen the deletion by accident."""
    older_than = _aware(older_than)
    for prefix in prefixes:
        if not _deletable(prefix):
            raise ValueError(
                f"refusing to expire objects under {prefix!r}: only prefixes inside "
                f"{', '.join(EXPIRING_PREFIXES)} may be cleaned up"
            )
    found = []
    for prefix in prefixes:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [
                {"key": o["Key"], "size": o["Size"], "last_modified": o["LastModified"].isoformat()}
                for o in page.get("Contents", [])
                if o["LastModified"] < older_than
            ]
    return found


def delete_objects(s3, bucket: str, keys: Iterable[str], dry_run: bool) -> dict:
    """Delete `keys` with DeleteObjects, at most 1000 a call. Returns {"deleted": [...], "errors":
    [{"key", "code", "message"}]}: S3 answers per key, and one key it refuses does not stop the rest.
    A key outside models/tuning/ and checkpoints/ is refused, never sent."""
    keys = list(dict.fromkeys(keys))
    refused = [
        {"key": k, "code": "Refused", "message": "not under an expiring prefix"} for k in keys if not _deletable(k)
    ]
    keys = [k for k in keys if _deletable(k)]
    if dry_run:
        return {"dry_run": True, "deleted": keys, "errors": refused}
    deleted, errors = [], list(refused)
    for start in range(0, len(keys), DELETE_BATCH):
        batch = keys[start : start + DELETE_BATCH]
        # Quiet: S3 lists only the keys it failed to delete, which keeps the answer small.
        answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        failed = {e["Key"]: e for e in answer.get("Errors", [])}
        errors += [{"key": k, "code": e.get("Code"), "message": e.get("Message")} for k, e in failed.items()]
        deleted += [k for k in batch if k not in failed]
    return {"dry_run": False, "deleted": deleted, "errors": errors}


def delete_endpoint_alarms(cloudwatch, endpoint_name: str, dry_run: bool) -> list[str]:
    """Delete the endpoint's alarms with the endpoint: the rollback alarms (bin_count_deploy's,
    rollout.alarm_names) and the live-quality alarms (bin_count_monitor's, monitor_metrics.alarm_names);
    an alarm on an endpoint that no longer exists only says INSUFFICIENT_DATA for ever. Named, not by
    prefix: the workers may describe and delete only the alarms of their endpoint. The names deleted
    (or that a dry run would delete)."""
    from bin_counter import monitor_metrics, rollout

    wanted = [*rollout.alarm_names(endpoint_name).values(), *monitor_metrics.alarm_names(endpoint_name).values()]
    existing = [a["AlarmName"] for a in cloudwatch.describe_alarms(AlarmNames=wanted)["MetricAlarms"]]
    if existing and not dry_run:
        cloudwatch.delete_alarms(AlarmNames=existing)
    return existing
