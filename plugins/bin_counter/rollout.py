"""How `bin_count_deploy` puts a registered model version on the endpoint: the SageMaker model and
endpoint configuration made from the version, the endpoint's CloudWatch alarms, and the blue/green
`DeploymentConfig` (all at once, canary or linear traffic shifting, with automatic rollback on those
alarms) that SageMaker runs the update with.

Request builders that tests validate against botocore's model, and the two steps that act on them.
"""

from __future__ import annotations

from collections.abc import Mapping

from botocore.exceptions import ClientError

from bin_counter import capture, sagemaker_config, scaling

VARIANT = "AllTraffic"
ROLLOUTS = ("all_at_once", "canary", "linear")
# SageMaker's bounds (botocore's service model): MaximumExecutionTimeoutInSeconds 600..28800,
# WaitIntervalInSeconds and TerminationWaitInSeconds 0..3600.
MAX_EXECUTION_S = (600, 28800)
# SageMaker publishes endpoint metrics every minute: an alarm on them cannot have a shorter period.
ALARM_PERIOD_S = 60


def alarm_names(endpoint_name: str) -> dict[str, str]:
    """The endpoint's alarms, by what they watch: one place for their names (the deploy DAG creates
    them, the rollout names them, the README and the on-call alert quote them)."""
    return {
        "errors": f"{endpoint_name}-invocation-5xx-errors",
        "latency": f"{endpoint_name}-model-latency",
    }


def endpoint_alarms(endpoint_name: str, max_5xx_per_minute: int, max_model_latency_ms: float) -> list[dict]:
    """PutMetricAlarm requests for the endpoint's two guardrails, on the metrics SageMaker publishes
    for it (namespace AWS/SageMaker, dimensions EndpointName and VariantName): model errors (the model
    answered 5xx) in a minute, and the model's average latency (SageMaker reports microseconds).
    Missing data (no traffic) is not breaching: a quiet endpoint is a healthy one."""
    names = alarm_names(endpoint_name)
    dimensions = [{"Name": "EndpointName", "Value": endpoint_name}, {"Name": "VariantName", "Value": VARIANT}]
    common = {
        "Namespace": "AWS/SageMaker",
        "Dimensions": dimensions,
        "Period": ALARM_PERIOD_S,
        "EvaluationPeriods": 1,
        "DatapointsToAlarm": 1,
        "TreatMissingData": "notBreaching",
        "ActionsEnabled": False,  # SageMaker's rollback watches the state; on-call hears from the DAG
    }
    return [
        {
            **common,
            "AlarmName": names["errors"],
            "AlarmDescription": f"{endpoint_name}: the model answered {max_5xx_per_minute} or more 5xx errors in a "
            "minute. A deployment rolls back while it is in ALARM.",
            "MetricName": "Invocation5XXErrors",
            "Statistic": "Sum",
            "Threshold": float(max_5xx_per_minute),
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
        },
        {
            **common,
            "AlarmName": names["latency"],
            "AlarmDescription": f"{endpoint_name}: the model took more than {max_model_latency_ms:g} ms on average "
            "in a minute. A deployment rolls back while it is in ALARM.",
            "MetricName": "ModelLatency",
            "Statistic": "Average",
            "Threshold": float(max_model_latency_ms) * 1000.0,
            "ComparisonOperator": "GreaterThanThreshold",
        },
    ]


def deployment_config(
    rollout: str,
    alarms: list[str],
    bake_s: int,
    canary_percent: int = 50,
    linear_step_percent: int = 25,
    termination_wait_s: int = 0,
) -> dict:
    """UpdateEndpoint's DeploymentConfig: blue/green with the given traffic shifting, each step baked
    for `bake_s` while `alarms` are watched; any of them in ALARM rolls the update back."""
    if rollout not in ROLLOUTS:
        raise ValueError(f"rollout {rollout!r}: choose one of {', '.join(ROLLOUTS)}")
    routing: dict = {"Type": rollout.upper(), "WaitIntervalInSeconds": bake_s}
    if rollout == "canary":
        routing["CanarySize"] = {"Type": "CAPACITY_PERCENT", "Value": canary_percent}
    elif rollout == "linear":
        routing["LinearStepSize"] = {"Type": "CAPACITY_PERCENT", "Value": linear_step_percent}
    steps = {"all_at_once": 1, "canary": 2, "linear": -(-100 // max(linear_step_percent, 1))}[rollout]
    # Room for every bake, the final one and the old fleet's wait, and instances starting.
    budget = steps * bake_s + termination_wait_s + 900
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": termination_wait_s,
            "MaximumExecutionTimeoutInSeconds": min(max(budget, MAX_EXECUTION_S[0]), MAX_EXECUTION_S[1]),
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in alarms]},
    }


def resource_names(endpoint_name: str, version: int, run_digest: str) -> dict[str, str]:
    """The model is the version's (one per version: a rollback to it reuses it); the endpoint
    configuration is the run's (instances and workers are the run's choice)."""
    # The worker may create models and configurations named bin-counter-* only (infra/pipeline.yaml).
    model = f"bin-counter-{endpoint_name}"[:55] + f"-v{version}"
    return {"model": model, "endpoint_config": f"{model[:50]}-{run_digest[:12]}"}


def deployment_requests(
    version: Mapping,
    params: Mapping,
    role_arn: str,
    run_digest: str,
    endpoint_exists: bool,
    reason: str | None = None,
) -> dict:
    """CreateModel, CreateEndpointConfig, the alarms, and CreateEndpoint (no endpoint yet) or
    UpdateEndpoint with the rollout's DeploymentConfig, for one Approved registry version."""
    endpoint = params["endpoint_name"]
    names = resource_names(endpoint, version["version"], run_digest)
    tags = sagemaker_config.resource_tags(
        {
            "bin-counter:model-package": version["arn"],
            "bin-counter:model-version": version.get("model_version"),
            "bin-counter:training-job": version.get("training_job"),
            "bin-counter:dataset-version": version.get("dataset_version"),
            "bin-counter:deploy-reason": reason,
        }
    )
    workers = params.get("serving_workers")
    environment = dict(version.get("environment") or {})
    environment.pop(sagemaker_config.SERVING_WORKERS, None)
    if workers:
        environment[sagemaker_config.SERVING_WORKERS] = str(workers)
    model = sagemaker_config.model_config(
        names["model"], version["image"], version["model_data_url"], role_arn, tags, environment
    )
    check_sizing(params)
    # No capture_percent (an older run's params) or 0: no DataCaptureConfig, nothing recorded.
    percent = params.get("capture_percent") or 0
    config = sagemaker_config.endpoint_config(
        names["endpoint_config"],
        names["model"],
        params["endpoint_instance_type"],
        params["instance_count"],
        tags,
        capture.data_capture_config(params["bucket"], percent) if percent else None,
    )
    if params.get("serving") == "serverless":
        config["ProductionVariants"][0] = scaling.serverless_variant(
            config["ProductionVariants"][0], params["serverless_memory_mb"], params["serverless_max_concurrency"]
        )
    alarms = endpoint_alarms(endpoint, params["max_5xx_per_minute"], params["max_model_latency_ms"])
    if endpoint_exists:
        request = {
            "EndpointName": endpoint,
            "EndpointConfigName": names["endpoint_config"],
            "DeploymentConfig": deployment_config(
                params["rollout"],
                [a["AlarmName"] for a in alarms],
                round(params["bake_minutes"] * 60),
                params["canary_percent"],
                params["linear_step_percent"],
                round(params["termination_wait_minutes"] * 60),
            ),
        }
    else:
        request = {"EndpointName": endpoint, "EndpointConfigName": names["endpoint_config"], "Tags": model["Tags"]}
    return {
        "model": model,
        "endpoint_config": config,
        "alarms": alarms,
        "endpoint": request,
        "operation": "update" if endpoint_exists else "create",
        "scaling": scaling.autoscaling_for(endpoint, VARIANT, params),
    }


def check_sizing(params: Mapping) -> None:
    """Refuse, before anything is created, a rollout the endpoint's size cannot take: a canary or a
    linear step turns on whole instances, at most half the fleet (SageMaker: CanarySize "less than or
    equal to 50% of the variant's total instance count", LinearStepSize "10-50%" of it), so it needs
    two instances or more; a serverless endpoint has no instances to take a share of."""
    rollout, count = params["rollout"], params["instance_count"]
    if params.get("serving") == "serverless":
        scaling.check_serverless(params)
        return
    if rollout == "all_at_once":
        return
    if count < 2:
        raise ValueError(
            f"rollout {rollout} needs two instances or more: a {rollout} step turns on whole instances, at most "
            f"half of the {count} instance(s) asked (instance_count), so one instance cannot take one. Deploy "
            "with rollout all_at_once, or instance_count 2 or more"
        )
    percent = params["canary_percent"] if rollout == "canary" else params["linear_step_percent"]
    if percent * count // 100 < 1:
        raise ValueError(
            f"rollout {rollout}: {percent}% of {count} instances is no whole instance; raise "
            f"{'canary_percent' if rollout == 'canary' else 'linear_step_percent'} to {-(-100 // count)} or more, "
            "or deploy more instances"
        )


def ensure_model_and_config(sm, built: Mapping) -> str:
    """Create the version's model unless it exists (a rollback to a version reuses its model) and the
    run's endpoint configuration unless it exists (a retried task); the configuration's name."""
    model, config = built["model"], built["endpoint_config"]
    try:
        existing = sm.describe_model(ModelName=model["ModelName"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ValidationException":
            raise
        sm.create_model(**model)
    else:
        wanted = model["PrimaryContainer"]["ModelDataUrl"]
        if existing["PrimaryContainer"].get("ModelDataUrl") != wanted:
            raise ValueError(
                f"SageMaker model {model['ModelName']} exists with another artifact "
                f"({existing['PrimaryContainer'].get('ModelDataUrl')}, not {wanted}): delete it "
                "(bin_count_teardown) and deploy again"
            )
        # Workers per instance are the run's choice: a model with other settings gets a new name.
        if existing["PrimaryContainer"].get("Environment") != model["PrimaryContainer"]["Environment"]:
            raise ValueError(
                f"SageMaker model {model['ModelName']} exists with another environment "
                f"({existing['PrimaryContainer'].get('Environment')}): deploy with the same serving_workers, or "
                "delete the model first"
            )
    try:
        sm.describe_endpoint_config(EndpointConfigName=config["EndpointConfigName"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ValidationException":
            raise
        sm.create_endpoint_config(**config)
    return config["EndpointConfigName"]


def undo_deployment(sm, endpoint_name: str, chosen: Mapping, before: Mapping | None, why: str, poll_s: float) -> str:
    """After a failed smoke check: the version is Rejected, and the endpoint goes back to the
    configuration that served before it (if any). What was done, in on-call's words."""
    from bin_counter import registry
    from bin_counter.endpoint import roll_back

    registry.set_status(sm, chosen["arn"], registry.REJECTED, f"failed its smoke check after deploying: {why}")
    rejected = f"Model package version {chosen['version']} ({chosen['model_version']}) is now Rejected."
    if before is None:
        return (
            "This was the endpoint's first deployment, so there is nothing to go back to: the endpoint "
            f"{endpoint_name} SERVES A MODEL THAT FAILED ITS SMOKE CHECK. Deploy an approved version "
            "(bin_count_deploy with model_package) or delete the endpoint (bin_count_teardown). " + rejected
        )
    roll_back(sm, endpoint_name, before["endpoint_config"], poll_s=poll_s)
    return (
        f"The deployment was undone: endpoint {endpoint_name} serves {before['endpoint_config']} "
        f"(model {before['model']}) again. " + rejected
    )
