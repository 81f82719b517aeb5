"""bin_counter.cleanup against moto (S3) and the stand-in (SageMaker), the stand-in's List* calls,
and bin_count_teardown run whole with dag.test() against the local stack."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import boto3
import pendulum
import pytest
from botocore.exceptions import ClientError

from bin_counter import cleanup, monitor_metrics, rollout
from tests.airflow_side.conftest import ENDPOINT, dag_without_retries, deployed_model, list_objects, wait_endpoint
from tests.airflow_side.machines import assert_ran_apart
from tests.conftest import REPO

ROLE = "arn:aws:iam::000000000000:role/local"
EXPIRING = [
    "models/tuning/bc-tune-aaa-001-1234abcd/output/model.tar.gz",
    "checkpoints/bin-counter-aaa-final/checkpoint.pt",
]
# Old as well, but never to be deleted.
PROTECTED = [
    "datasets/v-1/train/0/00001.jpg",
    "datasets/v-1/dataset.json",
    "code/abcd/sourcedir.tar.gz",
    "models/published/abcd/model.tar.gz",
    "models/bin-counter-aaa-final/output/model.tar.gz",
]
RECENT = [
    "models/tuning/bc-tune-bbb-001-5678abcd/output/model.tar.gz",
    "checkpoints/bin-counter-bbb-final/checkpoint.pt",
]


def sagemaker(stack):
    return boto3.client("sagemaker", endpoint_url=stack["endpoint"], region_name="us-east-1")


def put(s3, bucket: str, keys: list[str]) -> None:
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")


def between_then_and_now() -> datetime:
    """A cut-off after what was written so far and before what is written next: S3 and the stand-in
    keep times to the second at worst, so a second either side."""
    time.sleep(1.1)
    cutoff = datetime.now(UTC)
    time.sleep(1.1)
    return cutoff


# -- S3 ----------------------------------------------------------------------------------------------
def test_old_trial_artifacts_and_checkpoints_go_and_everything_else_stays(s3, bucket, worker_client, moto_endpoint):
    put(s3, bucket, EXPIRING + PROTECTED)
    cutoff = between_then_and_now()
    put(s3, bucket, RECENT)
    s3 = worker_client("s3", moto_endpoint)  # cleaning up as the DAG does, with the worker's rights

    found = cleanup.expired_objects(s3, bucket, cutoff)
    assert sorted(o["key"] for o in found) == sorted(EXPIRING)
    assert all(o["size"] == 1 for o in found)

    dry = cleanup.delete_objects(s3, bucket, [o["key"] for o in found], dry_run=True)
    assert set(list_objects(s3, bucket)) == set(EXPIRING + PROTECTED + RECENT)  # nothing deleted
    done = cleanup.delete_objects(s3, bucket, [o["key"] for o in found], dry_run=False)
    assert sorted(dry["deleted"]) == sorted(done["deleted"]) == sorted(EXPIRING)  # the same list
    assert dry["errors"] == done["errors"] == []
    assert set(list_objects(s3, bucket)) == set(PROTECTED + RECENT)
    assert cleanup.expired_objects(s3, bucket, cutoff) == []  # a second run finds nothing


def test_what_must_stay_cannot_be_asked_for(s3, bucket):
    put(s3, bucket, PROTECTED)
    future = datetime.now(UTC) + timedelta(days=1)  # everything is "old"
    for prefix in ("datasets/", "code/", "models/published/", "models/", "models/bin-counter-aaa-final/", ""):
        with pytest.raises(ValueError, match="refusing"):
            cleanup.expired_objects(s3, bucket, future, prefixes=(prefix,))
    refused = cleanup.delete_objects(s3, bucket, PROTECTED, dry_run=False)
    assert refused["deleted"] == [] and sorted(e["key"] for e in refused["errors"]) == sorted(PROTECTED)
    assert set(list_objects(s3, bucket)) == set(PROTECTED)
    with pytest.raises(ValueError, match="time zone"):
        cleanup.expired_objects(s3, bucket, datetime.now())  # a naive time: the mistake under test


def test_more_than_a_thousand_expired_objects_are_deleted_in_batches(s3, bucket):
    keys = [f"checkpoints/bin-counter-ccc-final/part-{i:05d}" for i in range(2345)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=b""), keys))
    put(s3, bucket, PROTECTED)
    batches = []
    s3.meta.events.register(
        "before-call.s3.DeleteObjects", lambda params, **_: batches.append(len(params["body"].split(b"<Key>")) - 1)
    )

    found = cleanup.expired_objects(s3, bucket, datetime.now(UTC) + timedelta(minutes=1))
    assert sorted(o["key"] for o in found) == keys  # listed past S3's 1000-key pages
    done = cleanup.delete_objects(s3, bucket, [o["key"] for o in found], dry_run=False)
    assert batches == [1000, 1000, 345]
    assert len(done["deleted"]) == len(keys) and done["errors"] == []
    assert set(list_objects(s3, bucket)) == set(PROTECTED)


def test_the_retention_cutoff():
    now = datetime(2026, 3, 15, 12, tzinfo=UTC)
    assert cleanup.retention_cutoff(14, now) == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert cleanup.retention_cutoff(1).tzinfo is not None
    with pytest.raises(ValueError, match="at least one day"):
        cleanup.retention_cutoff(0, now)


# -- the stand-in's List* calls and the SageMaker clean-up ------------------------------------------------
def register(sm, name: str, configs: tuple[str, ...] | None = None) -> None:
    """A model (its artifact is never loaded) and endpoint configurations naming it."""
    sm.create_model(
        ModelName=name,
        ExecutionRoleArn=ROLE,
        PrimaryContainer={"Image": "local/pytorch-inference:cpu", "ModelDataUrl": "s3://b/m.tar.gz"},
    )
    for config in configs if configs is not None else (name,):
        sm.create_endpoint_config(
            EndpointConfigName=config,
            ProductionVariants=[
                {
                    "VariantName": "AllTraffic",
                    "ModelName": name,
                    "InstanceType": "ml.m5.large",
                    "InitialInstanceCount": 1,
                }
            ],
        )


def walk(call, field: str, **params) -> list[list[str]]:
    """The names on every page of a List* call, following NextToken."""
    pages, token = [], None
    while True:
        page = call(**params, **({"NextToken": token} if token else {}))
        pages.append([item[next(k for k in item if k.endswith("Name"))] for item in page[field]])
        token = page.get("NextToken")
        if not token:
            return pages


def test_list_calls_filter_and_page_as_aws_does(standin):
    sm = sagemaker(standin)
    names = [f"bin-counter-{i:02d}" for i in range(12)]
    for name in names[:3]:
        register(sm, name)
    cutoff = between_then_and_now()
    for name in [*names[3:], "other-team-model"]:
        register(sm, name)
    sm.create_endpoint(EndpointName="ep-one", EndpointConfigName=names[0])
    sm.create_endpoint(EndpointName="ep-two", EndpointConfigName=names[1])

    # MaxResults=1 walks them all, one a page, newest first (AWS's default order).
    pages = walk(sm.list_models, "Models", MaxResults=1)
    assert all(len(p) == 1 for p in pages) and [p[0] for p in pages] == [*names, "other-team-model"][::-1]
    assert [len(p) for p in walk(sm.list_models, "Models")] == [10, 3]  # 10 a page unless asked
    assert walk(sm.list_endpoint_configs, "EndpointConfigs", MaxResults=5, SortOrder="Ascending") == [
        names[:5],
        names[5:10],
        [names[10], names[11], "other-team-model"],
    ]
    assert walk(sm.list_endpoints, "Endpoints", MaxResults=1, SortBy="Name", SortOrder="Ascending") == [
        ["ep-one"],
        ["ep-two"],
    ]
    paged = sm.get_paginator("list_models").paginate(NameContains="bin-counter-0", PaginationConfig={"PageSize": 1})
    assert [m["ModelName"] for page in paged for m in page["Models"]] == names[:10][::-1]  # boto3's own paginator
    old = sm.list_models(CreationTimeBefore=cutoff, MaxResults=100)["Models"]
    assert sorted(m["ModelName"] for m in old) == names[:3]
    assert all(m["CreationTime"] < cutoff and m["ModelArn"].endswith(f":model/{m['ModelName']}") for m in old)
    assert len(sm.list_endpoint_configs(CreationTimeAfter=cutoff, MaxResults=100)["EndpointConfigs"]) == 10
    endpoint = sm.list_endpoints(NameContains="one")["Endpoints"][0]
    assert endpoint["EndpointName"] == "ep-one" and endpoint["EndpointArn"].endswith(":endpoint/ep-one")
    assert {"CreationTime", "LastModifiedTime", "EndpointStatus"} <= set(endpoint)
    with pytest.raises(ClientError, match="less than or equal to 100"):
        sm.list_models(MaxResults=101)
    with pytest.raises(ClientError, match="Invalid pagination token"):
        sm.list_endpoints(NextToken="not-a-token")


def test_expired_models_spare_what_serves_and_the_newest(standin, worker_client):
    sm = sagemaker(standin)
    register(sm, "bin-counter-old1", ("bin-counter-old1", "bin-counter-old1-b"))
    register(sm, "bin-counter-old2")
    register(sm, "bin-counter-old3")
    register(sm, "other-team-model")  # old, but not ours
    cutoff = between_then_and_now()
    register(sm, "bin-counter-new1")
    sm.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName="bin-counter-old2")
    # Another team's endpoint: the clean-up must see what it serves, with the worker's rights.
    sm.create_endpoint(EndpointName="other-team-endpoint", EndpointConfigName="other-team-model")
    sm = worker_client("sagemaker", standin["endpoint"])  # cleaning up with the worker's rights

    serving = cleanup.serving_models(sm)
    assert serving == {"bin-counter-old2", "other-team-model"}
    expired = cleanup.expired_models(sm, serving, cutoff)
    assert [(e["model"], e["endpoint_configs"]) for e in expired] == [
        ("bin-counter-old1", ["bin-counter-old1", "bin-counter-old1-b"]),
        ("bin-counter-old3", ["bin-counter-old3"]),
    ]
    # Keeping the newest two spares old3 (and new1, too young anyway).
    assert [e["model"] for e in cleanup.expired_models(sm, serving, cutoff, keep_latest=2)] == ["bin-counter-old1"]

    dry = cleanup.delete_models(sm, expired, dry_run=True)
    assert sm.describe_model(ModelName="bin-counter-old1")  # still there
    done = cleanup.delete_models(sm, expired, dry_run=False)
    for report in (dry, done):
        assert report["models"] == ["bin-counter-old1", "bin-counter-old3"] and report["errors"] == []
        assert report["endpoint_configs"] == ["bin-counter-old1", "bin-counter-old1-b", "bin-counter-old3"]
    left = {m["ModelName"] for m in sm.list_models(MaxResults=100)["Models"]}
    assert left == {"bin-counter-old2", "bin-counter-new1", "other-team-model"}
    configs = {c["EndpointConfigName"] for c in sm.list_endpoint_configs(MaxResults=100)["EndpointConfigs"]}
    assert configs == {"bin-counter-old2", "bin-counter-new1", "other-team-model"}
    assert cleanup.delete_models(sm, expired, dry_run=False)["errors"] == []  # already gone is done
    assert cleanup.expired_models(sm, serving, cutoff) == []


def test_deleting_an_endpoint_that_does_not_exist_is_nothing_to_delete(standin):
    report = cleanup.delete_endpoint(sagemaker(standin), "no-such-endpoint", dry_run=False, poll_s=1)
    assert not report["deleted"] and report["summary"].startswith("nothing to delete")


# -- the DAG -------------------------------------------------------------------------------------------
@pytest.fixture
def dag(airflow_db, monkeypatch, pipeline_stack):
    monkeypatch.setenv("BIN_COUNTER_SAGEMAKER_POLL_S", "1")  # read when the DAG file is parsed
    # The stack's Variable: the DAG finds the endpoint (and, unless a test names one, the bucket) there.
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER", pipeline_stack.outputs["SageMakerVariable"])
    return dag_without_retries("bin_count_teardown")


def test_the_dag_parses_with_its_params_described(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.get_dag("bin_count_teardown")
    assert {t.task_id for t in dag.tasks} == {"endpoint", "expired_models", "expired_objects"}
    assert set(dag.tags) == {"bin-counter", "costs"} and dag.max_active_runs == 1 and not dag.catchup
    assert "When a task fails" in dag.doc_md
    params = {name: param for name, param in dag.params.items()}
    assert set(params) == {"bucket", "endpoint_name", "delete_endpoint", "retention_days", "dry_run"}
    assert all(p.description for p in params.values())
    assert {name: p.value for name, p in params.items()} == {
        "bucket": None,
        "endpoint_name": None,
        "delete_endpoint": False,
        "retention_days": 14,
        "dry_run": False,
    }
    assert params["retention_days"].schema["minimum"] == 1
    for task in dag.tasks:
        assert task.execution_timeout and task.on_failure_callback


def run_on(day: int) -> dict:
    date = pendulum.datetime(2026, 2, day, tz="UTC")
    return {"run_after": date, "logical_date": date}


def test_the_dag_deletes_the_endpoint_only_when_asked(
    dag, s3, bucket, local_stack_connection, moto_endpoint, capfd, separate_machines
):
    stack = local_stack_connection
    sm = sagemaker(stack)
    key = "models/published/test/model.tar.gz"
    s3.put_object(Bucket=bucket, Key=key, Body=(REPO / "models" / "bin-counter.tar.gz").read_bytes())
    model = deployed_model(sm, "bin-counter-teardown-final", artifact=f"s3://{bucket}/{key}")
    sm.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName=model)
    assert wait_endpoint(sm, ENDPOINT)["EndpointStatus"] == "InService"
    # The endpoint's rollback alarms, as bin_count_deploy defines them, and the live-quality alarms
    # bin_count_monitor defines (without actions here: nothing to notify).
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name="us-east-1")
    monitor_alarms = [
        {k: v for k, v in alarm.items() if not k.endswith("Actions")}
        for alarm in monitor_metrics.alarms(ENDPOINT, "arn:aws:sns:us-east-1:000000000000:unused", 0.3)
    ]
    alarms = [*rollout.endpoint_alarms(ENDPOINT, 1, 2000), *monitor_alarms]
    for alarm in alarms:
        cloudwatch.put_metric_alarm(**alarm)
    names = [a["AlarmName"] for a in alarms]
    put(s3, bucket, EXPIRING)  # new: younger than any retention
    # Every Param each time: in one process, dag.test() leaves a run's conf in the DAG's Params for the next.
    # The endpoint is the stack's, from its Variable, as in a scheduled run.
    conf = {
        "bucket": bucket,
        "retention_days": 1,
        "delete_endpoint": False,
        "dry_run": False,
    }

    runs = []

    def run(day: int, **changes):
        result = dag.test(**run_on(day), run_conf={**conf, **changes})
        runs.append(result)
        log = capfd.readouterr().out
        assert result.state == "success", log[-3000:]
        assert {ti.task_id: ti.state for ti in result.get_task_instances()} == {
            "endpoint": "success",
            "expired_models": "success",
            "expired_objects": "success",
        }
        return log

    log = run(1)  # the scheduled run's defaults: clean up only
    assert f"endpoint {ENDPOINT} serves {model}" in log and "delete_endpoint is off" in log
    assert sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"
    assert "deleted 0 model(s)" in log and "deleted 0 object(s)" in log

    log = run(2, delete_endpoint=True, dry_run=True)
    assert f"dry run: would delete endpoint {ENDPOINT} (InService) and its configuration {model}" in log
    assert f"would delete the endpoint's alarms: {', '.join(names)}" in log
    assert sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"

    log = run(3, delete_endpoint=True)
    assert f"deleted endpoint {ENDPOINT} and its configuration {model}; kept model(s) {model}" in log, log[-3000:]
    with pytest.raises(ClientError, match="Could not find endpoint"):
        sm.describe_endpoint(EndpointName=ENDPOINT)
    with pytest.raises(ClientError, match="Could not find endpoint configuration"):
        sm.describe_endpoint_config(EndpointConfigName=model)
    assert sm.describe_model(ModelName=model)["ModelName"] == model  # kept, to redeploy
    assert f"deleted the endpoint's alarms: {', '.join(names)}" in log
    assert cloudwatch.describe_alarms(AlarmNames=names)["MetricAlarms"] == []
    assert set(list_objects(s3, bucket)) == {key, *EXPIRING}

    log = run(4, delete_endpoint=True)  # again: nothing left to delete is no failure
    assert f"nothing to delete: there is no endpoint {ENDPOINT}" in log
    assert sm.describe_model(ModelName=model)["ModelName"] == model
    # Each task ran on a machine of its own (as on the CeleryExecutor): they share nothing but XCom.
    assert_ran_apart(separate_machines, *runs)
