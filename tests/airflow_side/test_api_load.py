"""The bounded load test of the API: the load generator's accounting, then the local stack under
its rated load (no failed request) and beyond it (clean 429s, every request answered)."""

from __future__ import annotations

import boto3

from bin_counter.api_function import ensure_function
from bin_counter.api_load import NO_ANSWER, gateway_sender, percentile, run_load
from tests.airflow_side.conftest import (
    API_FUNCTION_ROLE,
    API_KEY,
    ENDPOINT,
    FUNCTION,
    sagemaker_client,
    serving_endpoint,
)
from tests.conftest import make_bin_image


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([7.0], 99) == 7.0


def test_every_request_is_accounted_for_and_a_lost_one_is_a_failure():
    def send(number: int) -> int:
        if number % 5 == 4:
            raise ConnectionResetError("reset by peer")
        return 429 if number % 5 == 3 else 200

    result = run_load(send, clients=3, seconds=0.3)
    summary = result.summary(allowed=[429])
    assert summary["sent"] == sum(result.statuses.values()) > 10
    assert set(result.statuses) == {200, 429, NO_ANSWER}
    assert summary["answered"] == summary["sent"] - result.statuses[NO_ANSWER]
    assert summary["failed"] == result.statuses[NO_ANSWER] > 0
    assert len(result.latencies_ms) == result.statuses[200]


def test_the_local_api_under_and_beyond_its_rated_load(local_stack_connection, job_inputs, tmp_path):
    stack = local_stack_connection
    serving_endpoint(sagemaker_client(stack), job_inputs, "load-model", ENDPOINT)
    aws_lambda = boto3.client("lambda", endpoint_url=stack["endpoint"], region_name="us-east-1")
    ensure_function(aws_lambda, FUNCTION, ENDPOINT, API_FUNCTION_ROLE)
    images = []
    for n in range(3):
        images.append(tmp_path / f"bin-{n}.jpg")
        images[-1].write_bytes(make_bin_image(n, n))
    send = gateway_sender(f"{stack['endpoint']}/count", API_KEY, images)

    # Rated load: fewer clients than the gateway's 8 requests in flight. Nothing fails.
    rated = run_load(send, clients=4, seconds=8).summary()
    assert rated["failed"] == 0 and rated["answered"] == rated["sent"] > 8, rated
    assert rated["statuses"] == {"200": rated["sent"]}

    # Twice the rated concurrency: the excess is turned away at once with 429, nothing else goes
    # wrong, and every request still gets an answer.
    beyond = run_load(send, clients=16, seconds=6).summary(allowed=[429])
    assert beyond["failed"] == 0 and beyond["answered"] == beyond["sent"], beyond
    assert set(beyond["statuses"]) == {"200", "429"}, beyond
