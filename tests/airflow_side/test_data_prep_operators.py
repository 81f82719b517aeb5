"""The data-prep operators, run without a scheduler against a moto S3 server over HTTP."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from bin_counter import enhance
from bin_counter.data_prep_operators import (
    AbidFetchOperator,
    AbidSelectOperator,
    BlockSplitOperator,
    ContrastEnhanceOperator,
    FetchReportOperator,
)
from bin_counter.dataset import split_parameters
from tests.airflow_side.conftest import list_objects
from tests.conftest import write_abid_dir


@pytest.fixture
def source(tmp_path):
    root = write_abid_dir(tmp_path / "abid", {f"{i:05d}": i % 5 for i in range(100, 160)})
    (root / "metadata" / "00105.json").write_text("not json")
    return root


def planned(version: str, **split) -> dict:
    """A dataset as bin_counter.dataset.plan returns it, under a version of the test's choosing."""
    return {"version": version, "split": split_parameters(**split)}


def fetch_all(bucket, source, shard_size: int = 25, max_bad_share: float = 0.5, **select) -> tuple[list, dict]:
    """select, fetch every shard, join the reports: the data-prep DAG's first three tasks, in order."""
    shards = AbidSelectOperator(
        task_id="select",
        bucket=bucket,
        source=str(source),
        subset="key_range",
        key_range="00100:00165",
        shard_size=shard_size,
        **select,
    ).execute(context={})
    fetched = [
        AbidFetchOperator(task_id="fetch", bucket=bucket, source=str(source), subset="key_range", shard=shard).execute(
            context={}
        )
        for shard in shards
    ]
    report = FetchReportOperator(task_id="report", bucket=bucket, shards=fetched, max_bad_share=max_bad_share).execute(
        context={}
    )
    return fetched, report


def enhance_op(keys_path: str, bucket: str, **kwargs) -> ContrastEnhanceOperator:
    return ContrastEnhanceOperator(
        task_id="enhance", bucket=bucket, source_prefix="abid/raw", keys_path=keys_path, **kwargs
    )


def test_select_fetch_report_enhance_split_chain(s3, bucket, source, aws_connection):
    shards, fetched = fetch_all(bucket, source)
    assert [(s["index"], s["keys"]) for s in shards] == [(0, 25), (1, 25), (2, 15)]
    assert (fetched["good"], fetched["missing"], fetched["invalid"]) == (59, 5, 1)
    report = json.loads(s3.get_object(Bucket=bucket, Key=f"abid/raw/{fetched['report_path']}")["Body"].read())
    assert report["requested"] == 65
    assert report["invalid"] == {"00105": report["invalid"]["00105"]} and "metadata" in report["invalid"]["00105"]
    assert sorted(report["missing"]) == [f"{i:05d}" for i in range(160, 165)]

    enhanced = [
        enhance_op(shard["good_path"], bucket, method="autocontrast", method_params={"cutoff": 2}).execute(context={})
        for shard in shards
    ]
    prefix = enhanced[0]["prefix"]
    assert prefix == f"abid/enhanced/{enhance.enhancement_id('autocontrast', {'cutoff': 2})}"
    assert sum(e["written"] for e in enhanced) == 59
    record = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/enhancement.json")["Body"].read())
    assert record == {
        "method": "autocontrast",
        "params": {"cutoff": 2.0, "preserve_tone": True},
        "id": prefix.split("/")[-1],
    }

    result = BlockSplitOperator(
        task_id="split",
        bucket=bucket,
        keys_prefix="abid/raw",
        keys_path=fetched["keys_path"],
        image_prefix=prefix,
        dataset=planned("v-test", block_size=5),
    ).execute(context={})
    assert sum(sum(c.values()) for c in result["images"].values()) == 59
    manifest = s3.get_object(Bucket=bucket, Key="datasets/v-test/manifest.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(manifest)))
    assert len(rows) == 59
    row = rows[0]
    assert row["source"] == f"s3://{bucket}/{prefix}"
    enhanced_image = s3.get_object(Bucket=bucket, Key=f"{prefix}/bin-images/{row['key']}.jpg")
    assert row["etag"] == enhanced_image["ETag"].strip('"')
    metadata = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/metadata/{row['key']}.json")["Body"].read())
    assert metadata["EXPECTED_QUANTITY"] == int(row["count"])
    channel = json.loads(s3.get_object(Bucket=bucket, Key=f"datasets/v-test/{row['split']}.manifest")["Body"].read())
    assert f"bin-images/{row['key']}.jpg" in channel and channel[-1] == f"labels/v-test-{row['split']}.csv"
    dataset = json.loads(s3.get_object(Bucket=bucket, Key="datasets/v-test/dataset.json")["Body"].read())
    assert dataset["prefix"] == "datasets/v-test" and dataset["block_size"] == 5 and dataset["layout"] == "manifest"


def test_a_second_run_writes_nothing_new(s3, bucket, source, aws_connection):
    _, fetched = fetch_all(bucket, source)
    enhanced = enhance_op(fetched["keys_path"], bucket, method="equalize").execute(context={})
    split = BlockSplitOperator(
        task_id="split",
        bucket=bucket,
        keys_prefix="abid/raw",
        keys_path=fetched["keys_path"],
        image_prefix=enhanced["prefix"],
        dataset=planned("v-test", block_size=5),
    )
    split.execute(context={})
    data_before = {k: v for k, v in list_objects(s3, bucket).items() if k.endswith((".jpg", ".csv", ".manifest"))}
    time.sleep(1.1)  # LastModified has a resolution of one second
    _, fetched_again = fetch_all(bucket, source)
    assert fetched_again["good"] == 59 and fetched_again["keys_path"] == fetched["keys_path"]
    report = json.loads(s3.get_object(Bucket=bucket, Key=f"abid/raw/{fetched['report_path']}")["Body"].read())
    assert (len(report["fetched"]), len(report["skipped"])) == (0, 59)
    again = enhance_op(fetched["keys_path"], bucket, method="equalize").execute(context={})
    assert (again["written"], again["skipped"]) == (0, 59)
    split.execute(context={})
    data_after = {k: v for k, v in list_objects(s3, bucket).items() if k.endswith((".jpg", ".csv", ".manifest"))}
    assert data_after == data_before


def test_an_interrupted_enhancement_finishes_what_it_left(s3, bucket, source, aws_connection):
    _, fetched = fetch_all(bucket, source)
    first = enhance_op(fetched["keys_path"], bucket, method="equalize").execute(context={})
    # Killed after a photo was written and before its metadata was: the next run writes the metadata.
    s3.delete_object(Bucket=bucket, Key=f"{first['prefix']}/metadata/00101.json")
    again = enhance_op(fetched["keys_path"], bucket, method="equalize").execute(context={})
    assert (again["written"], again["skipped"]) == (1, 58)
    s3.head_object(Bucket=bucket, Key=f"{first['prefix']}/metadata/00101.json")


def test_too_many_bad_keys_fail_the_report_and_keep_it(s3, bucket, source, aws_connection):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=r"6 of 65 keys missing or invalid.*the report lists them"):
        fetch_all(bucket, source, max_bad_share=0.05)
    reports = [k for k in list_objects(s3, bucket, "abid/raw/reports/") if k.split("/")[-1].startswith("fetch-")]
    assert len(reports) == 1


def test_a_report_with_a_shard_missing_says_so(s3, bucket, source, aws_connection):
    shards = AbidSelectOperator(
        task_id="select", bucket=bucket, source=str(source), subset="key_range", key_range="00100:00165", shard_size=25
    ).execute(context={})
    fetched = AbidFetchOperator(
        task_id="fetch", bucket=bucket, source=str(source), subset="key_range", shard=shards[0]
    ).execute(context={})
    with pytest.raises(ValueError, match="1 of 3 shards were fetched"):
        FetchReportOperator(task_id="report", bucket=bucket, shards=[fetched]).execute(context={})


def test_a_photo_gone_before_the_split_is_named(s3, bucket, source, aws_connection):
    _, fetched = fetch_all(bucket, source)
    s3.delete_object(Bucket=bucket, Key="abid/raw/bin-images/00110.jpg")
    op = BlockSplitOperator(
        task_id="split",
        bucket=bucket,
        keys_prefix="abid/raw",
        keys_path=fetched["keys_path"],
        image_prefix="abid/raw",
        dataset=planned("v-gone"),
    )
    with pytest.raises(LookupError, match=r"1 of the 59 photos .*\['00110'\].*run it again from the fetch"):
        op.execute(context={})
    assert not list_objects(s3, bucket, "datasets/v-gone/")


def test_split_of_an_empty_key_list_is_a_clear_error(s3, bucket, aws_connection):
    s3.put_object(Bucket=bucket, Key="abid/raw/reports/keys-x.json", Body=b"{}")
    op = BlockSplitOperator(
        task_id="split",
        bucket=bucket,
        keys_prefix="abid/raw",
        keys_path="reports/keys-x.json",
        image_prefix="abid/raw",
        dataset=planned("v-x"),
    )
    with pytest.raises(ValueError, match="no images to split"):
        op.execute(context={})


def test_missing_key_list_names_the_key(s3, bucket, aws_connection):
    op = ContrastEnhanceOperator(
        task_id="enhance", bucket=bucket, source_prefix="abid/raw", keys_path="reports/keys-gone.json"
    )
    with pytest.raises(LookupError, match=r"reports/keys-gone\.json"):
        op.execute(context={})


def test_file_list_subset_from_the_source(s3, bucket, source, aws_connection):
    (source / "file_list.json").write_text(
        json.dumps({"1": ["data/metadata/00101.json", "data/metadata/00106.json"], "2": ["data/metadata/00102.json"]})
    )
    op = AbidSelectOperator(task_id="select", bucket=bucket, source=str(source), subset="file_list", counts=[1])
    (shard,) = op.execute(context={})
    assert json.loads(s3.get_object(Bucket=bucket, Key=f"abid/raw/{shard['keys_path']}")["Body"].read()) == [
        "00101",
        "00106",
    ]


def test_real_mirror_sample_through_fetch_and_split(real_abid, s3, bucket, aws_connection):
    shards = AbidSelectOperator(
        task_id="select",
        bucket=bucket,
        source=str(real_abid),
        subset="key_range",
        key_range="00250:00450",
        shard_size=100,
    ).execute(context={})
    fetched = FetchReportOperator(
        task_id="report",
        bucket=bucket,
        shards=[
            AbidFetchOperator(
                task_id="fetch", bucket=bucket, source=str(real_abid), subset="key_range", shard=shard
            ).execute(context={})
            for shard in shards
        ],
    ).execute(context={})
    assert fetched["missing"] == 100 and fetched["invalid"] == 0  # 00300-00399 are held back
    result = BlockSplitOperator(
        task_id="split",
        bucket=bucket,
        keys_prefix="abid/raw",
        keys_path=fetched["keys_path"],
        image_prefix="abid/raw",
        dataset=planned("v-real", block_size=10, max_count=5),
    ).execute(context={})
    assert all(int(count) <= 5 for table in result["images"].values() for count in table)


def test_an_empty_selection_fails_instead_of_skipping_everything(s3, bucket, source, aws_connection):
    op = AbidSelectOperator(
        task_id="select",
        bucket=bucket,
        source=str(source),
        subset="key_range",
        key_range="00100:00165",
        limit=None,
        counts=[9],
    )
    op.select = lambda _: []  # a file list whose counts match none of those asked for
    with pytest.raises(ValueError, match="the selection is empty"):
        op.execute(context={})
