"""The DAGs name no stack resource themselves: the bucket, the endpoint and the API function come from a
Param, the triggering dataset event (the bucket) or the stack's Variable, never from a literal default
(the audit's F3: on AWS a scheduled or asset-triggered run starts with the default Params, and a bucket
called `bin-counter` is somebody else's)."""

from __future__ import annotations

import json

import pytest

from bin_counter.account import SettingsError
from bin_counter.stack import NAMES, STACK_VARIABLE, resolve_name, run_params
from standin.launch import LOCAL_STACK_PARAMETERS, local_stack

DAGS_WITH_NAMES = {
    "bin_count_data_prep": {"bucket", "endpoint_name", "function_name"},  # the last two: its live source
    "bin_count_retrain": {"bucket", "endpoint_name"},
    "bin_count_deploy": {"bucket", "endpoint_name", "function_name"},
    "bin_count_batch": {"bucket", "endpoint_name"},
    "bin_count_monitor": {"bucket", "endpoint_name", "function_name"},
    "bin_count_teardown": {"bucket", "endpoint_name"},
}


def test_no_dag_has_a_default_name(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import REPO

    bag = DagBag(str(REPO / "dags"))
    assert bag.import_errors == {}
    for dag_id, names in DAGS_WITH_NAMES.items():
        params = bag.dags[dag_id].params
        assert {name for name in NAMES if name in params} == names, dag_id
        for name in names:
            param = params.get_param(name)
            assert param.value is None and STACK_VARIABLE in param.description, (dag_id, name)


def test_the_local_stack_names_nothing_as_the_template_defaults():
    from standin.iam import load_template

    defaults = {name: spec.get("Default") for name, spec in load_template()["Parameters"].items()}
    assert all(defaults[name] != value for name, value in LOCAL_STACK_PARAMETERS.items())
    variable = json.loads(local_stack().outputs["SageMakerVariable"])
    assert variable["bucket"] == "bin-counter-000000000000-us-east-1"
    assert variable["endpoint_name"] == LOCAL_STACK_PARAMETERS["EndpointName"]
    assert variable["function_name"] == LOCAL_STACK_PARAMETERS["FunctionName"]


STACK = {"bucket": "stack-bucket", "endpoint_name": "stack-endpoint", "function_name": "stack-api"}


@pytest.mark.parametrize(
    ("params", "extra", "expected"),
    [
        ({"bucket": "asked"}, {"bucket": "from-event"}, "asked"),
        ({"bucket": None}, {"bucket": "from-event", "version": "v1"}, "from-event"),
        ({"bucket": None}, None, "stack-bucket"),
        ({"bucket": ""}, {"version": "v1"}, "stack-bucket"),
    ],
)
def test_the_bucket_is_the_params_else_the_events_else_the_stacks(params, extra, expected):
    assert resolve_name("bucket", params, STACK, extra) == expected


def test_an_event_names_what_it_says_and_the_stack_the_rest():
    """A dataset event names its bucket; a model event (bin_count_retrain's announce) its bucket and the
    endpoint it was trained for: the deploy run goes there. Nothing names the API function but the stack."""
    assert resolve_name("endpoint_name", {"endpoint_name": None}, STACK, {"bucket": "b"}) == "stack-endpoint"
    assert resolve_name("endpoint_name", {"endpoint_name": None}, STACK, {"endpoint_name": "x"}) == "x"
    assert resolve_name("endpoint_name", {"endpoint_name": "asked"}, STACK, {"endpoint_name": "x"}) == "asked"


@pytest.mark.parametrize("variable", [None, {"role_arn": "arn:aws:iam::1:role/r"}])
def test_without_a_name_the_error_says_what_to_set(variable):
    with pytest.raises(SettingsError, match=f'Variable {STACK_VARIABLE} has no "bucket".*stack output: BucketName'):
        resolve_name("bucket", {"bucket": None}, variable)


def test_a_run_reads_the_names_from_the_variable_and_the_event(monkeypatch):
    from bin_counter.assets import BIN_COUNT_DATASET

    monkeypatch.setenv(f"AIRFLOW_VAR_{STACK_VARIABLE.upper()}", json.dumps(STACK))

    from types import SimpleNamespace

    event = SimpleNamespace(extra={"bucket": "event-bucket", "version": "v9"})

    context = {
        "params": {"bucket": None, "endpoint_name": None, "function_name": "asked-api", "epochs": 3},
        "triggering_asset_events": {BIN_COUNT_DATASET: [event]},
    }
    assert run_params(context) == {
        "bucket": "event-bucket",
        "endpoint_name": "stack-endpoint",
        "function_name": "asked-api",
        "epochs": 3,
    }


@pytest.mark.parametrize(
    ("variable", "creates"),
    [(None, False), ({}, False), ({"function_owner": "api-stack"}, False), ({"function_owner": "dags"}, True)],
)
def test_the_dag_creates_the_api_function_only_where_no_api_stack_owns_it(variable, creates):
    from bin_counter.stack import dags_create_the_function

    assert dags_create_the_function(variable) is creates
