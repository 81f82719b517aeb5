"""bin_count_data_prep run whole with dag.test() against a moto S3 server."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from tests.airflow_side.conftest import dag_without_retries, list_objects
from tests.airflow_side.machines import assert_ran_apart
from tests.conftest import write_abid_dir


@pytest.fixture
def dag(airflow_db):
    return dag_without_retries("bin_count_data_prep")


def asset_events(dag_id: str) -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        return [e.extra for e in session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag_id)]


def task_states(run, task_id: str) -> dict[int, str]:
    """map index -> state of a task's instances in a run."""
    return {ti.map_index: ti.state for ti in run.get_task_instances() if ti.task_id == task_id}


def retraining_context(events: list) -> dict:
    """What a bin_count_retrain run that these dataset events started sees: its default Params, whose
    names are empty (tests/airflow_side/test_stack_names.py), and the events."""
    from bin_counter.assets import BIN_COUNT_DATASET

    params = dict.fromkeys(("bucket", "endpoint_name", "function_name", "dataset_version"))
    return {"params": params, "triggering_asset_events": {BIN_COUNT_DATASET: events}}


def test_data_prep_run_publishes_a_versioned_dataset(
    dag, s3, bucket, aws_connection, tmp_path, monkeypatch, separate_machines
):
    source = write_abid_dir(tmp_path / "abid", {f"{i:05d}": i % 6 for i in range(1000, 1100)})
    conf = {
        "bucket": bucket,
        "source": str(source),
        "subset": "key_range",
        "key_range": "01000:01100",
        "block_size": 10,
        "enhancement": "autocontrast",
        "shard_size": 30,
    }
    run = dag.test(run_conf=conf)
    assert run.state == "success"
    # One fetch and one enhancement task per shard of 30 keys.
    assert task_states(run, "fetch") == task_states(run, "enhance") == dict.fromkeys(range(4), "success")
    event = asset_events("bin_count_data_prep")[-1]
    version = event["version"]
    assert version.startswith("v-") and event["prefix"] == f"datasets/{version}" and event["layout"] == "manifest"
    assert event["enhancement"].startswith("autocontrast-") and event["enhancement_params"]["cutoff"] == 1.0
    # The retraining run this event starts takes the event's bucket, not the stack's, and trains on
    # the event's version (F3: asset-triggered runs start with the default Params).
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    from bin_counter.dataset import resolve_dataset
    from bin_counter.stack import dataset_event_extra, run_params

    stack = {"bucket": "the-stacks-bucket", "endpoint_name": "an-endpoint", "function_name": "an-api"}
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER", json.dumps(stack))
    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_dag_id == "bin_count_data_prep").all()
        session.expunge_all()
    context = retraining_context(events[-1:])
    assert run_params(context)["bucket"] == bucket
    assert resolve_dataset(s3, bucket, None, dataset_event_extra(context))["version"] == version
    manifest = s3.get_object(Bucket=bucket, Key=f"datasets/{version}/manifest.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(manifest)))
    assert len(rows) == 100 and {r["split"] for r in rows} == {"train", "validation", "test"}
    # Each split is a ManifestFile of its photos where the enhancement wrote them and of its labels
    # file beside them: nothing was copied under datasets/.
    images = f"abid/enhanced/{event['enhancement']}/"
    for name in ("train", "validation", "test"):
        channel = json.loads(s3.get_object(Bucket=bucket, Key=f"datasets/{version}/{name}.manifest")["Body"].read())
        assert channel[0] == {"prefix": f"s3://{bucket}/{images}"}
        chosen = sorted((r["key"], r["count"]) for r in rows if r["split"] == name)
        assert channel[1:] == [f"bin-images/{k}.jpg" for k, _ in chosen] + [f"labels/{version}-{name}.csv"]
        for entry in channel[1:]:
            s3.head_object(Bucket=bucket, Key=images + entry)
        labels = s3.get_object(Bucket=bucket, Key=f"{images}labels/{version}-{name}.csv")["Body"].read().decode()
        assert sorted((r["key"], r["count"]) for r in csv.DictReader(io.StringIO(labels))) == chosen
    assert not [k for k in list_objects(s3, bucket, "datasets/") if k.endswith(".jpg")]
    dataset = json.loads(s3.get_object(Bucket=bucket, Key=f"datasets/{version}/dataset.json")["Body"].read())
    assert dataset["version"] == version and dataset["image_prefix"] == images.rstrip("/")

    # The same run again: same version, nothing rewritten.
    before = list_objects(s3, bucket, "datasets/") | list_objects(s3, bucket, "abid/enhanced/")
    time.sleep(1.1)
    again = dag.test(run_conf=conf)
    assert again.state == "success"
    assert asset_events("bin_count_data_prep")[-1]["version"] == version
    after = list_objects(s3, bucket, "datasets/") | list_objects(s3, bucket, "abid/enhanced/")
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed <= {f"datasets/{version}/dataset.json", f"abid/enhanced/{event['enhancement']}/enhancement.json"}

    # Other parameters, another version.
    other = dag.test(run_conf={**conf, "split_seed": 1})
    assert other.state == "success"
    assert asset_events("bin_count_data_prep")[-1]["version"] != version
    # Each task ran on a machine of its own (as on the CeleryExecutor): they handed everything on in S3.
    assert_ran_apart(separate_machines, run, again, other)


def test_a_source_that_does_not_exist_fails_the_selection(dag, bucket, aws_connection, tmp_path):
    run = dag.test(run_conf={"bucket": bucket, "source": str(tmp_path / "nowhere"), "subset": "key_range"})
    assert run.state == "failed"
    assert task_states(run, "select") == {-1: "failed"}


def test_a_shard_that_fails_fails_alone_and_a_rerun_fetches_only_its_keys(
    dag, s3, bucket, aws_connection, tmp_path, monkeypatch
):
    from bin_counter import abid

    source = write_abid_dir(tmp_path / "abid", {f"{i:05d}": i % 4 for i in range(2000, 2060)})
    conf = {
        "bucket": bucket,
        "source": str(source),
        "subset": "key_range",
        "key_range": "02000:02060",
        "block_size": 10,
        "shard_size": 20,
    }
    read = abid.LocalStore.read

    def unreadable(self, path):  # the source stops answering for one key of the second shard
        if path == "bin-images/02025.jpg":
            raise OSError("connection reset by peer")
        return read(self, path)

    monkeypatch.setattr(abid.LocalStore, "read", unreadable)
    monkeypatch.setattr("bin_counter.fetch.time.sleep", lambda s: None)  # the per-object retries' backoff
    run = dag.test(run_conf=conf)
    assert run.state == "failed"
    assert task_states(run, "fetch") == {0: "success", 1: "failed", 2: "success"}
    assert task_states(run, "report") == {-1: "upstream_failed"}
    assert not list_objects(s3, bucket, "datasets/")

    monkeypatch.setattr(abid.LocalStore, "read", read)
    again = dag.test(run_conf=conf)
    assert again.state == "success"
    reports = [k for k in list_objects(s3, bucket, "abid/raw/reports/") if k.split("/")[-1].startswith("fetch-")]
    report = json.loads(s3.get_object(Bucket=bucket, Key=reports[0])["Body"].read())
    # The shards that had succeeded found their keys whole; the failed one fetched what it lacked.
    assert set(report["fetched"]) <= {f"{i:05d}" for i in range(2020, 2040)} and "02025" in report["fetched"]
    assert len(report["fetched"]) + len(report["skipped"]) == 60
