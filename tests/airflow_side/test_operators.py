"""The data-prep operators, run without a scheduler against a moto S3 server over HTTP."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from bin_counter import enhance
from bin_counter.dataset import split_parameters
from bin_counter.operators import AbidFetchOperator, BlockSplitOperator, ContrastEnhanceOperator
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


def fetch_op(bucket, source, **kwargs):
    return AbidFetchOperator(task_id="fetch", bucket=bucket, source=str(source), subset="key_range",
                             key_range="00100:00165", **kwargs)


def test_fetch_enhance_split_chain(s3, bucket, source, aws_connection):
    fetched = fetch_op(bucket, source).execute(context={})
    assert (fetched["good"], fetched["missing"], fetched["invalid"]) == (59, 5, 1)
    report = json.loads(s3.get_object(Bucket=bucket, Key=f"abid/raw/{fetched['report_path']}")["Body"].read())
    assert report["invalid"] == {"00105": report["invalid"]["00105"]} and "metadata" in report["invalid"]["00105"]
    assert sorted(report["missing"]) == [f"{i:05d}" for i in range(160, 165)]

    enhanced = ContrastEnhanceOperator(task_id="enhance", bucket=bucket, source_prefix="abid/raw",
                                       keys_path=fetched["keys_path"], method="autocontrast",
                                       method_params={"cutoff": 2}).execute(context={})
    assert enhanced["prefix"] == f"abid/enhanced/{enhance.enhancement_id('autocontrast', {'cutoff': 2})}"
    record = json.loads(s3.get_object(Bucket=bucket, Key=f"{enhanced['prefix']}/enhancement.json")["Body"].read())
    assert record["method"] == "autocontrast" and record["params"] == {"cutoff": 2.0, "preserve_tone": True}
    assert record["written"] == 59

    result = BlockSplitOperator(task_id="split", bucket=bucket, keys_prefix="abid/raw",
                                keys_path=fetched["keys_path"], image_prefix=enhanced["prefix"],
                                dataset=planned("v-test", block_size=5)).execute(context={})
    assert sum(sum(c.values()) for c in result["images"].values()) == 59
    manifest = s3.get_object(Bucket=bucket, Key="datasets/v-test/manifest.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(manifest)))
    assert len(rows) == 59
    row = rows[0]
    image = s3.get_object(Bucket=bucket, Key=f"datasets/v-test/{row['split']}/{row['count']}/{row['key']}.jpg")
    enhanced_image = s3.get_object(Bucket=bucket, Key=f"{enhanced['prefix']}/bin-images/{row['key']}.jpg")
    assert image["Body"].read() == enhanced_image["Body"].read()
    dataset = json.loads(s3.get_object(Bucket=bucket, Key="datasets/v-test/dataset.json")["Body"].read())
    assert dataset["prefix"] == "datasets/v-test" and dataset["block_size"] == 5


def test_a_second_run_writes_nothing_new(s3, bucket, source, aws_connection):
    fetched = fetch_op(bucket, source).execute(context={})
    enhanced = ContrastEnhanceOperator(task_id="enhance", bucket=bucket, source_prefix="abid/raw",
                                       keys_path=fetched["keys_path"]).execute(context={})
    split = BlockSplitOperator(task_id="split", bucket=bucket, keys_prefix="abid/raw", keys_path=fetched["keys_path"],
                               image_prefix=enhanced["prefix"], dataset=planned("v-test", block_size=5))
    split.execute(context={})
    images_before = {k: v for k, v in list_objects(s3, bucket).items() if k.endswith((".jpg", ".csv"))}
    time.sleep(1.1)  # LastModified has a resolution of one second
    assert fetch_op(bucket, source).execute(context={})["good"] == 59
    again = ContrastEnhanceOperator(task_id="enhance", bucket=bucket, source_prefix="abid/raw",
                                    keys_path=fetched["keys_path"]).execute(context={})
    assert (again["written"], again["skipped"]) == (0, 59)
    split.execute(context={})
    images_after = {k: v for k, v in list_objects(s3, bucket).items() if k.endswith((".jpg", ".csv"))}
    assert images_after == images_before


def test_too_many_bad_keys_fail_the_fetch_and_keep_the_report(s3, bucket, source, aws_connection):
    from bin_counter.fetch import TooManyBadKeys

    with pytest.raises(TooManyBadKeys):
        fetch_op(bucket, source, max_bad_share=0.05).execute(context={})
    reports = [k for k in list_objects(s3, bucket, "abid/raw/reports/") if "/fetch-" in k]
    assert len(reports) == 1


def test_split_of_an_empty_key_list_is_a_clear_error(s3, bucket, aws_connection):
    s3.put_object(Bucket=bucket, Key="abid/raw/reports/keys-x.json", Body=b"{}")
    op = BlockSplitOperator(task_id="split", bucket=bucket, keys_prefix="abid/raw", keys_path="reports/keys-x.json",
                            image_prefix="abid/raw", dataset=planned("v-x"))
    with pytest.raises(ValueError, match="no images to split"):
        op.execute(context={})


def test_missing_key_list_names_the_key(s3, bucket, aws_connection):
    op = ContrastEnhanceOperator(task_id="enhance", bucket=bucket, source_prefix="abid/raw",
                                 keys_path="reports/keys-gone.json")
    with pytest.raises(LookupError, match=r"reports/keys-gone\.json"):
        op.execute(context={})


def test_file_list_subset_from_the_source(s3, bucket, source, aws_connection):
    (source / "file_list.json").write_text(json.dumps({"1": ["data/metadata/00101.json", "data/metadata/00106.json"],
                                                       "2": ["data/metadata/00102.json"]}))
    op = AbidFetchOperator(task_id="fetch", bucket=bucket, source=str(source), subset="file_list", counts=[1])
    assert op.execute(context={})["good"] == 2


def test_real_mirror_sample_through_fetch_and_split(real_abid, s3, bucket, aws_connection):
    fetched = AbidFetchOperator(task_id="fetch", bucket=bucket, source=str(real_abid), subset="key_range",
                                key_range="00250:00450").execute(context={})
    assert fetched["missing"] == 100 and fetched["invalid"] == 0  # 00300-00399 are held back
    result = BlockSplitOperator(task_id="split", bucket=bucket, keys_prefix="abid/raw", keys_path=fetched["keys_path"],
                                image_prefix="abid/raw",
                                dataset=planned("v-real", block_size=10, max_count=5)).execute(context={})
    assert all(int(count) <= 5 for table in result["images"].values() for count in table)
