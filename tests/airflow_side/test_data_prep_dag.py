"""bin_count_data_prep run whole with dag.test() against a moto S3 server."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from tests.airflow_side.conftest import dag_without_retries, list_objects
from tests.conftest import write_abid_dir


@pytest.fixture
def dag(airflow_db):
    return dag_without_retries("bin_count_data_prep")


def asset_events(dag_id: str) -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        return [e.extra for e in session.query(AssetEvent).filter(AssetEvent.source_dag_id == dag_id)]


def test_data_prep_run_publishes_a_versioned_dataset(dag, s3, bucket, aws_connection, tmp_path):
    source = write_abid_dir(tmp_path / "abid", {f"{i:05d}": i % 6 for i in range(1000, 1100)})
    conf = {"bucket": bucket, "source": str(source), "subset": "key_range", "key_range": "01000:01100",
            "block_size": 10, "enhancement": "autocontrast"}
    run = dag.test(run_conf=conf)
    assert run.state == "success"
    event = asset_events("bin_count_data_prep")[-1]
    version = event["version"]
    assert version.startswith("v-") and event["prefix"] == f"datasets/{version}"
    assert event["enhancement"].startswith("autocontrast-") and event["enhancement_params"]["cutoff"] == 1.0
    manifest = s3.get_object(Bucket=bucket, Key=f"datasets/{version}/manifest.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(manifest)))
    assert len(rows) == 100 and {r["split"] for r in rows} == {"train", "validation", "test"}
    for row in rows[:5]:
        s3.head_object(Bucket=bucket, Key=f"datasets/{version}/{row['split']}/{row['count']}/{row['key']}.jpg")
    dataset = json.loads(s3.get_object(Bucket=bucket, Key=f"datasets/{version}/dataset.json")["Body"].read())
    assert dataset["version"] == version

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


def test_a_source_that_does_not_exist_fails_the_fetch(dag, bucket, aws_connection, tmp_path):
    run = dag.test(run_conf={"bucket": bucket, "source": str(tmp_path / "nowhere"), "subset": "key_range"})
    assert run.state == "failed"
