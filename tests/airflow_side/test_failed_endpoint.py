"""A failed first deployment does not wedge the next ones (audit F4): a Failed endpoint serves nothing,
allows only DeleteEndpoint, and the deploy task deletes it and creates the endpoint again.

The stand-in fails an endpoint whose model matches --unhealthy-models the way SageMaker does when a
model fails its health check: a creation ends Failed, with the reason."""

from __future__ import annotations

import pytest
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerEndpointOperator
from botocore.exceptions import ClientError, WaiterError

from bin_counter.endpoint import confirm_deployment, delete_failed_endpoint, serving_model
from bin_counter.sagemaker_operators import ReplacingEndpointOperator
from tests.airflow_side.conftest import ENDPOINT, deployed_model, sagemaker_client
from tests.conftest import REPO

BROKEN = "bin-counter-broken-final"
NEXT = "bin-counter-next-final"


def deploy_task(config_name: str, operator=ReplacingEndpointOperator):
    """The retraining DAG's deploy task, as it is configured there."""
    return operator(
        task_id="deploy",
        config={"EndpointName": ENDPOINT, "EndpointConfigName": config_name},
        operation="create",
        wait_for_completion=True,
        check_interval=1,
        max_ingestion_time=120,
    )


@pytest.mark.standin_args("--unhealthy-models", f"^{BROKEN}$")
def test_the_run_after_a_failed_first_deployment_deploys(local_stack_connection, s3, bucket, capfd):
    sm = sagemaker_client(local_stack_connection)
    key = "models/published/test/model.tar.gz"
    s3.put_object(Bucket=bucket, Key=key, Body=(REPO / "models" / "bin-counter.tar.gz").read_bytes())
    for name in (BROKEN, NEXT):
        deployed_model(sm, name, artifact=f"s3://{bucket}/{key}")

    assert delete_failed_endpoint(sm, ENDPOINT, poll_s=1) is None  # no endpoint: nothing to delete
    # The first deployment: the model fails its health check, the endpoint is left Failed.
    with pytest.raises(WaiterError, match="Failed"):
        deploy_task(BROKEN).execute({})
    failed = sm.describe_endpoint(EndpointName=ENDPOINT)
    assert failed["EndpointStatus"] == "Failed" and "ping health check" in failed["FailureReason"]

    # The next run: nothing serves, so its champion is the initial model, not the broken one.
    assert serving_model(sm, ENDPOINT) is None
    # SageMaker allows only DeleteEndpoint on it: the stock operator's create-then-update is refused.
    with pytest.raises(ClientError, match="UpdateEndpoint"):
        deploy_task(NEXT, SageMakerEndpointOperator).execute({})
    assert sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "Failed"

    # The deploy task deletes it, waits until it is gone, and creates it on the new configuration.
    capfd.readouterr()
    deployed = deploy_task(NEXT).execute({})
    assert "is Failed" in capfd.readouterr().out
    assert deployed["Endpoint"]["EndpointStatus"] == "InService"
    assert confirm_deployment(sm, ENDPOINT, NEXT)["endpoint_config"] == NEXT
    assert serving_model(sm, ENDPOINT)["model"] == NEXT
    # An endpoint that serves is never deleted: the next deployment updates it.
    assert delete_failed_endpoint(sm, ENDPOINT, poll_s=1) is None
    assert sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"
    # The failed configuration stays (a retried deploy task creates the endpoint from it again).
    assert sm.describe_endpoint_config(EndpointConfigName=BROKEN)["EndpointConfigName"] == BROKEN
