"""A prepared dataset: where its version lives in the bucket, its `dataset.json` record, how its
version is derived from what went in, and which version a retraining run trains on.

bin_count_data_prep writes `datasets/<version>/<split>/<count>/<key>.jpg`, `manifest.csv` and
`dataset.json`; bin_count_retrain, the demo and the smoke check read them. The version is a digest of
the fetched keys, the enhancement and the split parameters, all taken from one dict
(`split_parameters`): the same dict shapes the split, so no parameter can change the data without
changing the version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from botocore.exceptions import ClientError

from bin_counter.abid import Store
from bin_counter.artifacts import digest
from bin_counter.split import DEFAULT_BLOCK_SIZE, DEFAULT_SHARES, SPLITS, check_shares

log = logging.getLogger(__name__)

PREFIX = "datasets"
RECORD = "dataset.json"


class DatasetNotFound(LookupError):
    pass


def prefix_of(version: str) -> str:
    """The dataset's prefix in the bucket."""
    return f"{PREFIX}/{version}"


# -- what a version is made of ----------------------------------------------------------------------
def split_parameters(shares: Mapping[str, float] | None = None, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0,
                     max_count: int | None = None) -> dict:
    """Every parameter that shapes a split, checked and in the form the version digests. A new one
    belongs here: then it reaches both the version and the split."""
    return {"shares": check_shares(shares or DEFAULT_SHARES), "block_size": int(block_size), "seed": int(seed),
            "max_count": None if max_count in (None, "") else int(max_count)}


def dataset_version(keys_digest: str, enhancement: str, split: Mapping) -> str:
    """A dataset version derived from what went in (the fetched keys and their counts, the
    enhancement) and the split parameters: the same inputs give the same version, so a re-run lands
    on the same prefix."""
    payload = {"keys": keys_digest, "enhancement": enhancement, **split}
    return f"v-{digest(payload)}"


def plan(keys_digest: str, enhancement: str, split: Mapping) -> dict:
    """The dataset to write: {"version", "split"}, the version derived from exactly these parameters."""
    return {"version": dataset_version(keys_digest, enhancement, split), "split": dict(split)}


# -- the record next to the data ------------------------------------------------------------------
def write_record(store: Store, record: Mapping) -> None:
    """`dataset.json` into the dataset's store: how it was made (enhancement, split) and from what."""
    store.write(RECORD, json.dumps(record, indent=2).encode())


def read_record(s3, bucket: str, version: str) -> dict:
    key = f"{prefix_of(version)}/{RECORD}"
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            raise DatasetNotFound(f"s3://{bucket}/{key} does not exist: run bin_count_data_prep first, or "
                                  "check the dataset_version Param") from exc
        raise


# -- which dataset ----------------------------------------------------------------------------------
def latest_version(s3, bucket: str) -> str:
    """The dataset whose record was written last."""
    newest = None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(f"/{RECORD}") and (newest is None or obj["LastModified"] > newest[1]):
                newest = (obj["Key"], obj["LastModified"])
    if newest is None:
        raise DatasetNotFound(f"no dataset under s3://{bucket}/{PREFIX}/: run bin_count_data_prep first")
    return newest[0].split("/")[-2]


def resolve_dataset(s3, bucket: str, requested: str | None, event_extra: Mapping | None) -> dict:
    """The dataset to train on: the Param when given, else the asset event that triggered the run,
    else the newest one in the bucket; with its channels' S3 prefixes."""
    if requested:
        version, how = requested, "the dataset_version Param"
    elif event_extra and event_extra.get("version"):
        version, how = event_extra["version"], "the bin_count_dataset asset event"
    else:
        version, how = latest_version(s3, bucket), f"the newest dataset in s3://{bucket}"
    prefix = prefix_of(version)
    record = read_record(s3, bucket, version)
    images = record.get("images", {})  # split -> {count: images}
    missing = [s for s in SPLITS if not sum((images.get(s) or {}).values())]
    if missing:
        raise DatasetNotFound(f"dataset {version} has no {' or '.join(missing)} images ({json.dumps(images)})")
    log.info("training on dataset %s (chosen by %s): %s", version, how, json.dumps(images))
    return {"version": version, "chosen_by": how, "images": images, "prefix": prefix,
            "channels": {s: f"s3://{bucket}/{prefix}/{s}/" for s in SPLITS}}
