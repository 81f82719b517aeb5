"""A prepared dataset: where its version lives in the bucket, its `dataset.json` record, how its
version is derived from what went in, and which version a retraining run trains on.

bin_count_data_prep writes `datasets/<version>/<split>.manifest` (SageMaker ManifestFiles naming the
photos where the fetch or the enhancement left them), `manifest.csv` and `dataset.json`;
bin_count_retrain, the batch count, the demo and the smoke check read them. Datasets of earlier
releases, whose photos were copied into `datasets/<version>/<split>/<count>/<key>.jpg`, are read too
(`layout` "copy" in their record, or none). The version is a digest of
the fetched keys, the enhancement and the split parameters, all taken from one dict
(`split_parameters`): the same dict shapes the split, so no parameter can change the data without
changing the version.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping

from botocore.exceptions import ClientError

from bin_counter.abid import Store, image_path
from bin_counter.artifacts import digest
from bin_counter.split import CHANNEL_MANIFEST, DEFAULT_BLOCK_SIZE, DEFAULT_SHARES, MANIFEST, SPLITS, check_shares

log = logging.getLogger(__name__)

PREFIX = "datasets"
RECORD = "dataset.json"
# How the dataset holds its photos: "manifest" (listed where they lie) or "copy" (earlier releases).
LAYOUT = "manifest"


class DatasetNotFound(LookupError):
    pass


def prefix_of(version: str) -> str:
    """The dataset's prefix in the bucket."""
    return f"{PREFIX}/{version}"


# -- what a version is made of ----------------------------------------------------------------------
def split_parameters(
    shares: Mapping[str, float] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = 0,
    max_count: int | None = None,
) -> dict:
    """Every parameter that shapes a split, checked and in the form the version digests. A new one
    belongs here: then it reaches both the version and the split."""
    return {
        "shares": check_shares(shares or DEFAULT_SHARES),
        "block_size": int(block_size),
        "seed": int(seed),
        "max_count": None if max_count in (None, "") else int(max_count),
    }


def dataset_version(keys_digest: str, enhancement: str, split: Mapping) -> str:
    """A dataset version derived from what went in (the fetched keys and their counts, the
    enhancement) and the split parameters: the same inputs give the same version, so a re-run lands
    on the same prefix."""
    # The layout is part of the version: a dataset of an earlier release, same parameters, copied
    # photos, keeps its prefix, and the manifests of this one never land in it.
    payload = {"keys": keys_digest, "enhancement": enhancement, **split, "layout": LAYOUT}
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
            raise DatasetNotFound(
                f"s3://{bucket}/{key} does not exist: run bin_count_data_prep first, or check the dataset_version Param"
            ) from exc
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
    layout = record.get("layout", "copy")
    log.info("training on dataset %s (chosen by %s, layout %s): %s", version, how, layout, json.dumps(images))
    return {
        "version": version,
        "chosen_by": how,
        "images": images,
        "prefix": prefix,
        "layout": layout,
        "channels": {s: channel_uri(bucket, prefix, s, layout) for s in SPLITS},
    }


def channel_uri(bucket: str, prefix: str, split: str, layout: str) -> str:
    """A split's training channel: its ManifestFile (a `.manifest` URI, which sagemaker_config sends
    as S3DataType ManifestFile), or, for a copied dataset, its folder."""
    if layout == "manifest":
        return f"s3://{bucket}/{prefix}/{CHANNEL_MANIFEST.format(split=split)}"
    return f"s3://{bucket}/{prefix}/{split}/"


def photos(s3, bucket: str, data: Mapping, split: str) -> list[dict]:
    """A split's photos from the dataset's `manifest.csv`, in key order: [{"key", "count", "bucket",
    "object"}], `object` being the photo's S3 key in `bucket` (where the manifest says it lies)."""
    body = s3.get_object(Bucket=bucket, Key=f"{data['prefix']}/{MANIFEST}")["Body"].read().decode()
    found = []
    for row in csv.DictReader(io.StringIO(body)):
        if row["split"] != split:
            continue
        if data.get("layout", "copy") == "manifest":
            source_bucket, _, root = row["source"][len("s3://") :].partition("/")
            location = (source_bucket, f"{root}/{image_path(row['key'])}" if root else image_path(row["key"]))
        else:
            location = (bucket, f"{data['prefix']}/{split}/{row['count']}/{row['key']}.jpg")
        found.append({"key": row["key"], "count": int(row["count"]), "bucket": location[0], "object": location[1]})
    return found
