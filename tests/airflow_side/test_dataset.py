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
    # Pinned: datasets already in a bucket keep their versions (the digest of earlier releases).
    assert dataset.dataset_version(KEYS, ENHANCEMENT, split) == "v-61f577131173"
    assert dataset.dataset_version(KEYS, ENHANCEMENT, dataset.split_parameters(max_count=5)) == "v-fdb913635eb8"


def test_every_split_parameter_changes_the_version():
    split = dataset.split_parameters()
    assert set(CHANGED) == set(split), "a split parameter without a case here: add one"
    base = dataset.dataset_version(KEYS, ENHANCEMENT, split)
    versions = {name: dataset.dataset_version(KEYS, ENHANCEMENT, dataset.split_parameters(**{**split, name: value}))
                for name, value in CHANGED.items()}
    assert base not in versions.values() and len(set(versions.values())) == len(CHANGED), versions
    assert dataset.dataset_version("another-keys", ENHANCEMENT, split) != base
    assert dataset.dataset_version(KEYS, "autocontrast-1", split) != base


def test_the_plan_carries_the_parameters_its_version_was_derived_from():
    split = dataset.split_parameters({"train": 0.8, "validation": 0.2}, block_size="20", seed=3, max_count="")
    assert split == {"shares": {"train": 0.8, "validation": 0.2, "test": 0.0}, "block_size": 20, "seed": 3,
                     "max_count": None}
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
