"""What the SageMaker endpoint serves: the model behind it now, and whether a deployment really
switched it to the new configuration.

The retraining DAG reads the first as the champion and checks the second after deploying; the
teardown DAG reads the first to keep what serves.
"""

from __future__ import annotations

from botocore.exceptions import ClientError


def serving_model(sm, endpoint_name: str) -> dict | None:
    """The model an endpoint serves now (name, artifact, configuration), or None without an endpoint."""
    try:
        endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ValidationException":
            return None
        raise
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
