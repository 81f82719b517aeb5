"""What the SageMaker endpoint serves: the model behind it now, and whether a deployment really
switched it to the new configuration; and clearing an endpoint that SageMaker left Failed.

The retraining DAG reads the first as the champion and checks the second after deploying; its
deploy task deletes a Failed endpoint before creating it again (sagemaker_operators'
ReplacingEndpointOperator). The teardown DAG reads the first to keep what serves.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from botocore.exceptions import ClientError

log = logging.getLogger(__name__)

# Endpoints that serve nothing, as botocore's DescribeEndpointOutput.EndpointStatus doc says: Failed
# "could not be created, updated, or re-scaled ... DeleteEndpoint is the only operation that can be
# performed on a failed endpoint"; OutOfService "is not available to take incoming requests". Their
# model is no champion (the gate compares with the initial model instead) and counts no batch.
NOT_SERVING = frozenset({"Failed", "OutOfService"})


def describe_endpoint(sm, endpoint_name: str) -> dict | None:
    """DescribeEndpoint, or None when there is no such endpoint (SageMaker's ValidationException)."""
    try:
        return sm.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ValidationException":
            return None
        raise


def serving_model(sm, endpoint_name: str) -> dict | None:
    """The model an endpoint serves now (name, artifact, configuration), or None when nothing serves:
    no endpoint, or one that is Failed or OutOfService (NOT_SERVING)."""
    endpoint = describe_endpoint(sm, endpoint_name)
    if endpoint is None:
        return None
    if endpoint["EndpointStatus"] in NOT_SERVING:
        log.warning(
            "endpoint %s is %s: it serves nothing (%s)",
            endpoint_name,
            endpoint["EndpointStatus"],
            endpoint.get("FailureReason") or "no FailureReason given",
        )
        return None
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model_name = config["ProductionVariants"][0]["ModelName"]
    model = sm.describe_model(ModelName=model_name)
    return {
        "endpoint": endpoint_name,
        "status": endpoint["EndpointStatus"],
        "endpoint_config": endpoint["EndpointConfigName"],
        "model": model_name,
        "model_data_url": model["PrimaryContainer"]["ModelDataUrl"],
    }


def delete_failed_endpoint(
    sm, endpoint_name: str, poll_s: float = 15, max_wait_s: float = 1800, log: Any = log
) -> dict | None:
    """Delete the endpoint if SageMaker left it Failed, and wait until it is gone, so that it can be
    created again under its name. Returns what the deleted endpoint was, or None when there was
    nothing to delete (no endpoint, or one in any other state, which the deployment updates).

    Its configuration and model stay: a retried deploy task creates the endpoint from that same
    configuration, and models cost nothing (bin_count_teardown deletes old ones)."""
    endpoint = describe_endpoint(sm, endpoint_name)
    if endpoint is None or endpoint["EndpointStatus"] != "Failed":
        return None
    reason = endpoint.get("FailureReason") or "no FailureReason given"
    log.warning("endpoint %s is Failed (%s): deleting it, the only thing SageMaker allows on it", endpoint_name, reason)
    sm.delete_endpoint(EndpointName=endpoint_name)
    # Not botocore's endpoint_deleted waiter: it fails on a Failed status, which SageMaker may still
    # report for a moment after DeleteEndpoint, before Deleting.
    deadline = time.monotonic() + max_wait_s
    while describe_endpoint(sm, endpoint_name) is not None:
        if time.monotonic() > deadline:
            raise DeploymentFailed(f"endpoint {endpoint_name} was still there {max_wait_s:.0f} s after DeleteEndpoint")
        time.sleep(poll_s)
    return {"endpoint": endpoint_name, "endpoint_config": endpoint.get("EndpointConfigName"), "reason": reason}


class DeploymentFailed(RuntimeError):
    pass


def confirm_deployment(sm, endpoint_name: str, config_name: str) -> dict:
    """Raise DeploymentFailed unless the endpoint is InService on `config_name`.

    SageMaker rolls a failed update back: the endpoint returns to InService on its old configuration
    with a FailureReason, which is all the provider's "endpoint in service" waiter looks at. Without
    this check such a run would go on as if the new model served."""
    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    status, serving = endpoint["EndpointStatus"], endpoint.get("EndpointConfigName")
    if status != "InService" or serving != config_name:
        reason = endpoint.get("FailureReason") or "no FailureReason given"
        keeps = f"it still serves {serving}" if status == "InService" else f"it is {status}"
        raise DeploymentFailed(
            f"endpoint {endpoint_name} did not switch to {config_name}: {keeps}. SageMaker says: {reason}"
        )
    return {"endpoint": endpoint_name, "endpoint_config": serving, "status": status}


def roll_back(sm, endpoint_name: str, previous_config: str, poll_s: float = 15, max_wait_s: float = 3600) -> dict:
    """Put the endpoint back on `previous_config` (the configuration that served before a deployment
    whose smoke check failed), all at once, and wait until it serves it. SageMaker keeps the failing
    model serving until the old one answers its health check, so clients are never left without one."""
    waiter_attempts = max(1, int(max_wait_s / max(poll_s, 1)))
    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    if endpoint["EndpointStatus"] != "InService":
        sm.get_waiter("endpoint_in_service").wait(
            EndpointName=endpoint_name, WaiterConfig={"Delay": poll_s, "MaxAttempts": waiter_attempts}
        )
    sm.update_endpoint(EndpointName=endpoint_name, EndpointConfigName=previous_config)
    sm.get_waiter("endpoint_in_service").wait(
        EndpointName=endpoint_name, WaiterConfig={"Delay": poll_s, "MaxAttempts": waiter_attempts}
    )
    return confirm_deployment(sm, endpoint_name, previous_config)
