"""The batch count's own parts on moto's S3: which photos are sent, their expected counts, the
manifest SageMaker reads, and the report joined from the job's answers."""

from __future__ import annotations

import json

import pytest

from bin_counter import batch
from bin_counter.sagemaker_config import transform_job_config
from tests.conftest import make_bin_image


def put(s3, bucket: str, key: str, body: bytes | str) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode() if isinstance(body, str) else body)


def answer(count: int, probabilities: list[float], version: str = "v1") -> bytes:
    return json.dumps(
        {
            "count": count,
            "probabilities": probabilities,
            "confidence": probabilities[count],
            "expected_count": 1.0,
            "model_version": version,
        }
    ).encode()


def test_abid_layout_expected_counts_come_from_the_metadata_beside_the_photos(s3, bucket):
    for key, quantity in (("00001", 2), ("00002", 0)):
        put(s3, bucket, f"audits/night/bin-images/{key}.jpg", make_bin_image(quantity, 1))
        put(s3, bucket, f"audits/night/metadata/{key}.json", json.dumps({"EXPECTED_QUANTITY": quantity}))
    put(s3, bucket, "audits/night/bin-images/00003.jpg", make_bin_image(1, 3))  # no metadata: no expectation
    uri = f"s3://{bucket}/audits/night/bin-images/"
    source = batch.expected_source("auto", False, uri)
    assert source == "abid_metadata"
    plan = batch.prepare(s3, uri, f"s3://{bucket}/batch-counts/t1/", source, 6)
    assert (plan["photos"], plan["sent"], plan["refused"], plan["with_expected"]) == (3, 3, 0, 2)
    rows = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/t1/input/photos.json")["Body"].read())
    assert [(r["relative"], r["expected"]) for r in rows] == [("00001.jpg", 2), ("00002.jpg", 0), ("00003.jpg", None)]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/t1/input/manifest.json")["Body"].read())
    assert manifest == [{"prefix": f"s3://{bucket}/audits/night/bin-images/"}, "00001.jpg", "00002.jpg", "00003.jpg"]


def test_dataset_folders_give_the_count_and_the_runs_own_output_is_never_input(s3, bucket):
    for count in (0, 1, 2):
        put(s3, bucket, f"datasets/v1/test/{count}/0000{count}.jpg", make_bin_image(count, count))
    out = f"s3://{bucket}/datasets/v1/test/counts/"  # an output inside the input prefix
    put(s3, bucket, "datasets/v1/test/counts/transform/0/00000.jpg.out", b"{}")
    plan = batch.prepare(s3, f"s3://{bucket}/datasets/v1/test", out, "dataset_folders", 6)
    assert plan["photos"] == 3 and plan["with_expected"] == 3


def test_a_photo_above_the_payload_limit_is_refused_before_the_job_with_its_reason(s3, bucket):
    put(s3, bucket, "audits/a/small.jpg", make_bin_image(1, 1))
    put(s3, bucket, "audits/a/huge.jpg", make_bin_image(1, 1)[:-2] + bytes(1024 * 1024 + 10) + b"\xff\xd9")
    plan = batch.prepare(s3, f"s3://{bucket}/audits/a/", f"s3://{bucket}/batch-counts/t2/", "none", 1)
    assert (plan["sent"], plan["refused"]) == (1, 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/t2/input/manifest.json")["Body"].read())
    assert manifest[1:] == ["small.jpg"]
    rows = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/t2/input/photos.json")["Body"].read())
    huge = next(r for r in rows if r["relative"] == "huge.jpg")
    assert huge["error"] == "too_large" and "MaxPayloadInMB is 1" in huge["message"]


def test_a_photo_the_model_server_would_refuse_is_a_report_line_not_a_failed_job(s3, bucket):
    # TorchServe in the model's image takes 6,553,500 bytes per request and answers 413 to more, which
    # fails the whole transform job: a photo above it is refused before the job, even under MaxPayloadInMB.
    put(s3, bucket, "audits/b/at-limit.jpg", make_bin_image(1, 1)[:-2] + bytes(6_553_500 - 2 - 2000) + b"\xff\xd9")
    put(s3, bucket, "audits/b/over.jpg", make_bin_image(1, 1)[:-2] + bytes(6_553_501) + b"\xff\xd9")
    sizes = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="audits/b/")["Contents"]}
    assert sizes["audits/b/at-limit.jpg"] <= 6_553_500 < sizes["audits/b/over.jpg"] < 7_000_000
    plan = batch.prepare(s3, f"s3://{bucket}/audits/b/", f"s3://{bucket}/batch-counts/tb/", "none", 7)
    assert (plan["sent"], plan["refused"]) == (1, 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/tb/input/manifest.json")["Body"].read())
    assert manifest[1:] == ["at-limit.jpg"]
    rows = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/tb/input/photos.json")["Body"].read())
    over = next(r for r in rows if r["relative"] == "over.jpg")
    line = batch.report_row(over, None, batch.api_verdict())
    assert (line["verdict"], line["error"]) == ("failed", "too_large")
    assert line["message"] == (
        f"the photo is {sizes['audits/b/over.jpg']} bytes; the model server (TorchServe's max_request_size) "
        "takes at most 6553500 bytes per request"
    )


def test_max_payload_mb_is_read_as_the_stricter_million_bytes():
    photos = [{"key": "a", "size": 6_000_000}, {"key": "b", "size": 6_000_001}]
    sent, refused = batch.plan_photos(photos, 6)
    assert [p["key"] for p in sent] == ["a"]
    assert refused[0]["message"] == (
        "the photo is 6000001 bytes; the transform job's MaxPayloadInMB is 6 (6000000 bytes)"
    )


def test_nothing_to_count_is_a_clear_error(s3, bucket):
    with pytest.raises(batch.BatchInputError, match=r"no objects under s3://.*/empty/"):
        batch.prepare(s3, f"s3://{bucket}/empty/", f"s3://{bucket}/batch-counts/t3/", "none", 6)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("key,expected\naudits/a/1.jpg,3\n2.jpg,0\n00003,1\n", "csv"),
        (
            '{"key": "audits/a/1.jpg", "expected": 3}\n{"key": "2.jpg", "expected": 0}\n{"key": "00003", "expected": 1}\n',  # noqa: E501
            "jsonl",
        ),
    ],
)
def test_an_expected_counts_file_names_photos_by_key_relative_key_or_abid_id(s3, bucket, text, name):
    for key in ("1.jpg", "2.jpg", "00003.jpg", "4.jpg"):
        put(s3, bucket, f"audits/a/{key}", make_bin_image(1, 1))
    put(s3, bucket, f"lists/expected.{name}", text)
    root, photos = batch.list_photos(s3, f"s3://{bucket}/audits/a/")
    assert root == f"s3://{bucket}/audits/a/"
    counts = batch.expected_counts(s3, f"s3://{bucket}/lists/expected.{name}", bucket, photos)
    assert counts == {"audits/a/00003.jpg": 1, "audits/a/1.jpg": 3, "audits/a/2.jpg": 0, "audits/a/4.jpg": None}


def test_a_bad_expected_source_says_what_to_give():
    with pytest.raises(batch.BatchInputError, match="choose one of"):
        batch.expected_source("inventory", False, "s3://b/p/")
    with pytest.raises(batch.BatchInputError, match="line 2"):
        batch.parse_expected_file("key,expected\nno-comma-here\n")


def test_the_report_joins_answers_refusals_and_missing_outputs_with_the_apis_verdicts(s3, bucket):
    out = "batch-counts/t4/"
    planned = [
        {"key": "p/a.jpg", "relative": "a.jpg", "size": 1, "expected": 2},  # likely 2: match
        {"key": "p/b.jpg", "relative": "b.jpg", "size": 1, "expected": 0},  # 0 unlikely: mismatch
        {"key": "p/c.jpg", "relative": "c.jpg", "size": 1, "expected": None},  # no expectation: no verdict
        {"key": "p/d.txt", "relative": "d.txt", "size": 1, "expected": 1},  # the model refused it
        {"key": "p/e.jpg", "relative": "e.jpg", "size": 1, "expected": 1},  # no .out at all
        {"key": "p/f.jpg", "relative": "f.jpg", "size": 9, "expected": 1, "error": "too_large", "message": "big"},
    ]
    put(s3, bucket, out + "input/photos.json", json.dumps(planned))
    put(s3, bucket, out + "transform/a.jpg.out", answer(2, [0.05, 0.15, 0.8]))
    put(s3, bucket, out + "transform/b.jpg.out", answer(2, [0.05, 0.15, 0.8]))
    put(s3, bucket, out + "transform/c.jpg.out", answer(1, [0.2, 0.6, 0.2]))
    put(
        s3,
        bucket,
        out + "transform/d.txt.out",
        json.dumps(
            {
                "error": "not_an_image",
                "message": "image 0 is neither JPEG nor PNG",
                "status": 415,
                "model_version": "v1",
            }
        ),
    )
    plan = {"output_uri": f"s3://{bucket}/{out}", "input_uri": f"s3://{bucket}/p/", "expected": "abid_metadata"}
    job = {
        "TransformJobName": "bin-counter-x-batch",
        "TransformOutput": {"S3OutputPath": f"s3://{bucket}/{out}transform/"},
    }
    summary = batch.write_report(s3, plan, job, {"model": "bin-counter-m"})

    lines = s3.get_object(Bucket=bucket, Key=out + "report.jsonl")["Body"].read().decode().splitlines()
    rows = {r["key"]: r for r in map(json.loads, lines)}
    assert list(rows) == [p["key"] for p in planned]  # every photo, in the plan's order
    assert rows["p/a.jpg"]["verdict"] == "match" and rows["p/a.jpg"]["expected_probability"] == 0.8
    assert rows["p/b.jpg"]["verdict"] == "mismatch" and rows["p/b.jpg"]["count"] == 2
    assert rows["p/c.jpg"]["verdict"] is None and rows["p/c.jpg"]["count"] == 1
    assert (rows["p/d.txt"]["verdict"], rows["p/d.txt"]["error"]) == ("failed", "not_an_image")
    assert rows["p/e.jpg"]["error"] == "no_output" and rows["p/f.jpg"]["error"] == "too_large"
    assert rows["p/a.jpg"]["model_version"] == "v1" and rows["p/a.jpg"]["confidence"] == 0.8

    assert (summary["photos"], summary["counted"], summary["failed"]) == (6, 3, 3)
    assert summary["counts"] == {"1": 1, "2": 2}
    assert summary["verdicts"] == {"match": 1, "mismatch": 1, "uncertain": 0}
    assert summary["failures_by_reason"] == {"no_output": 1, "not_an_image": 1, "too_large": 1}
    assert summary["model_versions"] == ["v1"] and summary["transform_job"] == "bin-counter-x-batch"
    stored = json.loads(s3.get_object(Bucket=bucket, Key=out + "summary.json")["Body"].read())
    assert stored == summary
    text = "\n".join(batch.summary_lines(summary))
    assert "6 photos under" in text and "1 match, 1 mismatch, 0 uncertain" in text
    assert "p/d.txt: not_an_image: image 0 is neither JPEG nor PNG" in text


def test_verdicts_use_the_api_functions_thresholds():
    judge = batch.api_verdict()
    # lambda/function.json: match at 0.5 or more, mismatch at 0.1 or less.
    assert judge([0.5, 0.5], 0)["verdict"] == "match"
    assert judge([0.1, 0.9], 0)["verdict"] == "mismatch"
    assert judge([0.3, 0.7], 0)["verdict"] == "uncertain"
    assert judge([0.3, 0.7], 5)["verdict"] == "uncertain"  # beyond the top class


def test_the_transform_request_sends_each_photo_whole_and_keeps_within_sagemakers_limits():
    config = transform_job_config(
        "bin-counter-x-batch",
        "m",
        "s3://b/o/input/manifest.json",
        "s3://b/o/transform/",
        "ml.m5.xlarge",
        2,
        4,
        6,
        environment=batch.REFUSALS_ENVIRONMENT,
    )
    assert config["TransformInput"]["SplitType"] == "None" and config["BatchStrategy"] == "SingleRecord"
    assert config["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
    assert config["Environment"] == {"BIN_COUNTER_REFUSALS": "answer"}
    assert config["TransformResources"] == {"InstanceType": "ml.m5.xlarge", "InstanceCount": 2}
    with pytest.raises(ValueError, match="above SageMaker's 100 MB"):
        transform_job_config("n", "m", "s3://b/m", "s3://b/o/", "ml.m5.xlarge", 1, 20, 6)
    # Unset: one request in flight per worker TorchServe starts (one per vCPU), within the 100 MB rule.
    expected = {
        ("ml.m5.large", 6): 2,
        ("ml.m5.xlarge", 6): 4,
        ("ml.c5.9xlarge", 6): 16,  # 36 vCPUs, but 16 x 6 MB is SageMaker's most
        ("ml.m5.24xlarge", 6): 16,
        ("ml.m5.24xlarge", 1): 96,
        ("ml.m5.metal", 6): 1,  # no vCPU count in its name: SageMaker's own default
    }
    for (instance, mb), count in expected.items():
        config = transform_job_config("n", "m", "s3://b/m", "s3://b/o/", instance, 1, None, mb)
        assert config["MaxConcurrentTransforms"] == count, instance
    with pytest.raises(ValueError, match="1 to 100"):
        transform_job_config("n", "m", "s3://b/m", "s3://b/o/", "ml.m5.xlarge", 1, 1, 0)


def test_a_dataset_splits_manifest_is_counted_where_its_photos_lie(s3, bucket):
    from bin_counter.split import channel_manifest

    for key, count in (("00001", 2), ("00002", 0)):
        put(s3, bucket, f"abid/raw/bin-images/{key}.jpg", make_bin_image(count, 1))
        put(s3, bucket, f"abid/raw/metadata/{key}.json", json.dumps({"EXPECTED_QUANTITY": count}))
    put(s3, bucket, "abid/raw/bin-images/00009.jpg", make_bin_image(1, 1))  # beside, not listed
    uri = f"s3://{bucket}/datasets/v1/test.manifest"
    put(
        s3,
        bucket,
        "datasets/v1/test.manifest",
        json.dumps(channel_manifest(f"s3://{bucket}/abid/raw", ["00001", "00002"], "labels/v1-test.csv")),
    )
    source = batch.expected_source("auto", True, uri)
    assert source == "abid_metadata"
    plan = batch.prepare(s3, uri, f"s3://{bucket}/batch-counts/t5/", source, 6)
    assert (plan["photos"], plan["sent"], plan["with_expected"]) == (2, 2, 2)
    rows = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/t5/input/photos.json")["Body"].read())
    assert [(r["key"], r["expected"]) for r in rows] == [
        ("abid/raw/bin-images/00001.jpg", 2),
        ("abid/raw/bin-images/00002.jpg", 0),
    ]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="batch-counts/t5/input/manifest.json")["Body"].read())
    assert manifest == [{"prefix": f"s3://{bucket}/abid/raw/"}, "bin-images/00001.jpg", "bin-images/00002.jpg"]

    s3.delete_object(Bucket=bucket, Key="abid/raw/bin-images/00002.jpg")
    with pytest.raises(batch.BatchInputError, match=r"1 photos that .*test.manifest lists are not in"):
        batch.prepare(s3, uri, f"s3://{bucket}/batch-counts/t6/", source, 6)
