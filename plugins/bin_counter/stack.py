"""Which of the stack's resources a run works on: its bucket, its endpoint and its API function.

A Param names one explicitly; else, for the bucket, the dataset asset event that triggered the run (it
says where the dataset it announces lies); else the stack's own name for it, from the Airflow Variable
bin_counter_sagemaker (infra/pipeline.yaml's output SageMakerVariable). The DAGs have no literal default:
S3 bucket names are global, so a bucket called `bin-counter` is somebody else's on AWS, and a default that
happened to equal the local stack's name would pass every local run and fail every scheduled or
asset-triggered one on AWS (Airflow starts those with the default Params).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bin_counter.account import STACK_HINT, SettingsError

STACK_VARIABLE = "bin_counter_sagemaker"
# Param -> what the stack calls it (its output).
NAMES = {"bucket": "BucketName", "endpoint_name": "EndpointName", "function_name": "FunctionName"}


def resolve_name(
    name: str, params: Mapping[str, Any], variable: Mapping | None, event_extra: Mapping | None = None
) -> str:
    """The run's `name` ("bucket", "endpoint_name" or "function_name"): the Param, the triggering
    event's (a dataset event names its bucket, a model event its bucket and endpoint), or the stack's
    from the Variable; SettingsError saying what to set, else."""
    if params.get(name):
        return str(params[name])
    if event_extra and event_extra.get(name):
        return str(event_extra[name])
    if variable and variable.get(name):
        return str(variable[name])
    raise SettingsError(
        f"no {name}: the {name} Param is empty and the Airflow Variable {STACK_VARIABLE} has no "
        f'"{name}". Set the Variable to the stack output SageMakerVariable {STACK_HINT}, or name the '
        f"{name} in the run's Params (its stack output: {NAMES[name]})"
    )


def dags_create_the_function(variable: Mapping | None) -> bool:
    """Whether the retraining DAG may create the API function: only where no API stack owns it (the
    stack's ApiFunctionOwner, `function_owner` in the Variable). A function the DAG created would keep
    lambda/template.yaml's stack from being created (CloudFormation refuses a named resource that
    exists), so by default the DAG only updates the function the API stack made."""
    return (variable or {}).get("function_owner", "api-stack") == "dags"


def stack_variable() -> dict | None:
    """The Variable as JSON, None when it is not set."""
    from airflow.sdk import Variable

    return Variable.get(STACK_VARIABLE, default=None, deserialize_json=True)


def dataset_event_extra(context: Mapping[str, Any]) -> dict | None:
    """The `extra` of the dataset asset event that triggered this run, if one did."""
    from bin_counter.assets import BIN_COUNT_DATASET

    return asset_event_extra(context, BIN_COUNT_DATASET)


def asset_event_extra(context: Mapping[str, Any], asset: Any) -> dict | None:
    """The `extra` of the newest event of `asset` that triggered this run, if one did."""
    events = context.get("triggering_asset_events") or {}
    triggering = events.get(asset) if events else None
    return dict(triggering[-1].extra) if triggering else None


def run_params(context: Mapping[str, Any]) -> dict:
    """The run's Params with the stack's names filled in where they are empty: what every task of a
    run reads, so that all of them work on the same bucket, endpoint and function."""
    params = dict(context["params"])
    wanted = [name for name in NAMES if name in params and not params[name]]
    if wanted:
        from bin_counter.assets import BIN_COUNT_DATASET, BIN_COUNT_MODEL

        extra = asset_event_extra(context, BIN_COUNT_DATASET) or asset_event_extra(context, BIN_COUNT_MODEL)
        variable = stack_variable()
        for name in wanted:
            params[name] = resolve_name(name, params, variable, extra)
    return params


def name_param(name: str, what: str, from_event: bool | str = False, section: str | None = None) -> Any:
    """A Param for one of the stack's names, empty by default (nullable: the trigger form refuses an
    empty plain string): `what` it is for, and where an empty one comes from (`from_event`: the DAG is
    scheduled on the dataset asset, whose event names the bucket)."""
    from airflow.sdk import Param

    source = f"the stack's ({STACK_VARIABLE} Variable, stack output {NAMES[name]})"
    if from_event:
        event = from_event if isinstance(from_event, str) else "dataset"
        source = f"the {event} event that triggered the run, else {source}"
    schema: dict[str, Any] = {"section": section} if section else {}
    return Param(None, type=["null", "string"], description=f"{what}. Empty: {source}", **schema)


def stack_name(params: Mapping[str, Any], name: str) -> str:
    """The same for a templated field: `{{ stack_name(params, 'bucket') }}` (the DAGs' user-defined macro)."""
    return resolve_name(name, params, None if params.get(name) else stack_variable())
