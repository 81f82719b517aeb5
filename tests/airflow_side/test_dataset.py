"""A dataset's version, record and location: the version names exactly what shaped the data, and the
retraining run finds the dataset it was asked for."""

from __future__ import annotations

import time

import pytest

from bin_counter import dataset
from bin_counter.abid import S3Store

KEYS, ENHANCEMENT = "0123456789ab", "none-0123"
# Another value for each split parameter; a parameter missing here fails the test below.
CHANGED = {"shares": {"train": 0.7, "validation": 0.2, "test": 0.1}, "block_size": 50, "seed": 1, "max_count": 5}


def test_the_same_inputs_give_the_same_version_as_before():
    split = dataset.split_parameters()
    assert dataset.dataset_version(KEYS, ENHANCEMENT, split) == dataset.dataset_version(KEYS, ENHANCEMENT, dict(split))
    # Pinned: datasets already in a bucket keep their versions. The manifest layout changed them once
    # (v-61f577131173 and v-fdb913635eb8 were these datasets' copied versions), so that a dataset of
    # manifests never lands on the prefix of a copied one.
    assert dataset.dataset_version(KEYS, ENHANCEMENT, split) == "v-ea87c586c517"
    assert dataset.dataset_version(KEYS, ENHANCEMENT, dataset.split_parameters(max_count=5)) == "v-f3bb3709df28"


def test_every_split_parameter_changes_the_version():
    split = dataset.split_parameters()
    assert set(CHANGED) == set(split), "a split parameter without a case here: add one"
    base = dataset.dataset_version(KEYS, ENHANCEMENT, split)
    versions = {
        name: dataset.dataset_version(KEYS, ENHANCEMENT, dataset.split_parameters(**{**split, name: value}))
        for name, value in CHANGED.items()
    }
    assert base not in versions.values() and len(set(versions.values())) == len(CHANGED), versions
    assert dataset.dataset_version("another-keys", ENHANCEMENT, split) != base
    assert dataset.dataset_version(KEYS, "autocontrast-1", split) != base


def test_the_plan_carries_the_parameters_its_version_was_derived_from():
    split = dataset.split_parameters({"train": 0.8, "validation": 0.2}, block_size="20", seed=3, max_count="")
    assert split == {
        "shares": {"train": 0.8, "validation": 0.2, "test": 0.0},
        "block_size": 20,
        "seed": 3,
        "max_count": None,
    }
    planned = dataset.plan(KEYS, ENHANCEMENT, split)
    assert planned == {"version": dataset.dataset_version(KEYS, ENHANCEMENT, split), "split": split}
    assert dataset.prefix_of(planned["version"]) == f"datasets/{planned['version']}"
    with pytest.raises(ValueError, match="add up to 1"):
        dataset.split_parameters({"train": 0.8, "validation": 0.1})


def put_record(s3, bucket: str, version: str, images: dict) -> None:
    dataset.write_record(S3Store(bucket, dataset.prefix_of(version), s3), {"version": version, "images": images})


def test_which_dataset_the_param_the_event_or_the_newest(s3, bucket):
    full = {"train": {"0": 4}, "validation": {"0": 1}, "test": {"1": 2}}
    with pytest.raises(dataset.DatasetNotFound, match="run bin_count_data_prep first"):
        dataset.latest_version(s3, bucket)
    put_record(s3, bucket, "v-second", full)
    time.sleep(1.1)  # LastModified has a resolution of one second; the newest is not the last by name
    put_record(s3, bucket, "v-first", full)
    assert dataset.latest_version(s3, bucket) == "v-first"
    chosen = dataset.resolve_dataset(s3, bucket, None, None)
    assert (chosen["version"], chosen["prefix"]) == ("v-first", "datasets/v-first")
    assert chosen["channels"]["test"] == f"s3://{bucket}/datasets/v-first/test/"
    by_event = dataset.resolve_dataset(s3, bucket, None, {"version": "v-second"})
    assert (by_event["version"], by_event["chosen_by"]) == ("v-second", "the bin_count_dataset asset event")
    assert dataset.resolve_dataset(s3, bucket, "v-second", {"version": "v-first"})["version"] == "v-second"
    with pytest.raises(dataset.DatasetNotFound, match="check the dataset_version Param"):
        dataset.resolve_dataset(s3, bucket, "v-missing", None)
    put_record(s3, bucket, "v-no-test", {"train": {"0": 4}, "validation": {"0": 1}})
    with pytest.raises(dataset.DatasetNotFound, match="has no test images"):
        dataset.resolve_dataset(s3, bucket, "v-no-test", None)


def test_a_manifest_datasets_channels_and_photos_and_a_copied_ones(s3, bucket):
    from bin_counter import split

    full = {"train": {"0": 1}, "validation": {"1": 1}, "test": {"2": 2}}
    rows = [
        {"key": k, "count": c, "split": s, "block": "p:0", "source": f"s3://{bucket}/abid/raw", "etag": "e"}
        for k, c, s in (("00001", 0, "train"), ("00002", 1, "validation"), ("00003", 2, "test"), ("00004", 2, "test"))
    ]
    store = S3Store(bucket, dataset.prefix_of("v-listed"), s3)
    split.write_rows(store, rows, split.REFERENCE_FIELDS)
    dataset.write_record(store, {"version": "v-listed", "images": full, "layout": "manifest"})
    listed = dataset.resolve_dataset(s3, bucket, "v-listed", None)
    assert listed["channels"] == {s: f"s3://{bucket}/datasets/v-listed/{s}.manifest" for s in split.SPLITS}
    assert dataset.photos(s3, bucket, listed, "test") == [
        {"key": k, "count": 2, "bucket": bucket, "object": f"abid/raw/bin-images/{k}.jpg"} for k in ("00003", "00004")
    ]

    # A dataset of an earlier release: no layout in its record, its photos copied into count folders.
    old = S3Store(bucket, dataset.prefix_of("v-copied"), s3)
    split.write_rows(old, [{k: v for k, v in {**rows[2], "sha256": "s"}.items() if k != "etag"}], split.MANIFEST_FIELDS)
    dataset.write_record(old, {"version": "v-copied", "images": full})
    copied = dataset.resolve_dataset(s3, bucket, "v-copied", None)
    assert copied["layout"] == "copy" and copied["channels"]["train"] == f"s3://{bucket}/datasets/v-copied/train/"
    assert dataset.photos(s3, bucket, copied, "test") == [
        {"key": "00003", "count": 2, "bucket": bucket, "object": "datasets/v-copied/test/2/00003.jpg"}
    ]
