"""What the monitor holds live traffic against: the serving model's own test set.

* which model serves: the endpoint's configuration's model (bin_counter.endpoint.serving_model), and
  the dataset it was trained on from the model's `bin-counter:dataset-version` tag (the deploy DAG
  tags every model it creates, bin_counter.rollout.deployment_requests);
* its predictions on its test set: the model card in its artifact (model_card.json in model.tar.gz,
  `metrics.test`): the training job's test evaluation writes the predicted-count and confidence
  histograms there (sagemaker_code/evaluate.py); a model trained before that has its confusion
  matrix only, whose column sums are the predicted counts, and no confidence baseline;
* its test photos: a sample of the dataset's test split (bin_counter.dataset.photos), whose simple
  statistics the monitor compares the captured photos with.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError

from bin_counter.batch import split_s3_uri
from bin_counter.monitor import PHOTO_STATISTICS, photo_statistics

log = logging.getLogger(__name__)

DATASET_TAG = "bin-counter:dataset-version"
# Enough test photos for the KS test to see a real shift (its power is bounded by the smaller sample),
# few enough to read every hour.
BASELINE_PHOTOS = 200
# Where bin_count_data_prep's fetch puts the photos as taken (its RAW_PREFIX).
RAW_PREFIX = "abid/raw"


class NothingServes(RuntimeError):
    """The endpoint serves no model: there is nothing to monitor."""


def serving(sm, endpoint_name: str) -> dict:
    """The model the endpoint serves (bin_counter.endpoint.serving_model) and its tags."""
    from bin_counter.endpoint import serving_model

    found = serving_model(sm, endpoint_name)
    if found is None:
        raise NothingServes(
            f"endpoint {endpoint_name} serves no model (it does not exist, or is Failed or OutOfService): "
            "nothing to monitor; deploy a model with bin_count_deploy"
        )
    arn = sm.describe_model(ModelName=found["model"])["ModelArn"]
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn).get("Tags", [])}
    return {**found, "tags": tags}


def model_card(s3, model_data_url: str) -> dict:
    """model_card.json of a model.tar.gz in S3, read as a stream (the card may come last in the archive)."""
    bucket, key = split_s3_uri(model_data_url)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    with tarfile.open(fileobj=body, mode="r|gz") as archive:
        for member in archive:
            if member.name.lstrip("./") == "model_card.json":
                card = archive.extractfile(member)
                if card is not None:
                    return json.loads(card.read())
    raise ValueError(f"{model_data_url} has no model_card.json: not a model written by train.py")


def card_baseline(card: Mapping) -> dict:
    """The predicted-count and confidence histograms of the model's test evaluation, and its accuracy."""
    test = (card.get("metrics") or {}).get("test") or {}
    num_classes = len(card.get("classes") or []) or None
    counts = test.get("predicted_histogram")
    if counts is None and test.get("confusion_matrix"):
        counts = [sum(column) for column in zip(*test["confusion_matrix"], strict=True)]
    return {
        "model_version": card.get("model_version"),
        "num_classes": num_classes or (len(counts) if counts else None),
        "test_accuracy": test.get("accuracy"),
        "test_images": test.get("n"),
        "count_histogram": counts,
        "confidence_histogram": test.get("confidence_histogram"),
    }


def test_photo_statistics(s3, bucket: str, dataset_version: str | None, limit: int = BASELINE_PHOTOS) -> dict:
    """Each photo statistic over up to `limit` test photos of the dataset, spread evenly over its test
    split; empty (and why, in the log) when the dataset cannot be read."""
    from bin_counter.abid import image_path
    from bin_counter.dataset import DatasetNotFound, photos, resolve_dataset

    if not dataset_version:
        log.warning("the serving model names no dataset (tag %s): no photo baseline", DATASET_TAG)
        return {}
    try:
        data = resolve_dataset(s3, bucket, dataset_version, None)
        test = photos(s3, bucket, data, "test")
    except (DatasetNotFound, ClientError) as exc:
        log.warning("dataset %s cannot be read (%s): no photo baseline", dataset_version, exc)
        return {}
    if data.get("enhancement", "none") != "none":
        # Clients send photos as taken: an enhanced dataset's test photos count as fetched, before
        # their enhancement, or brightness and contrast would "drift" every hour.
        test = [{**p, "bucket": bucket, "object": f"{RAW_PREFIX}/{image_path(p['key'])}"} for p in test]
    step = max(len(test) / limit, 1.0)
    chosen = [test[int(i * step)] for i in range(min(limit, len(test)))]

    def read(photo: dict) -> dict | None:
        return photo_statistics(s3.get_object(Bucket=photo["bucket"], Key=photo["object"])["Body"].read())

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = [s for s in pool.map(read, chosen) if s]
    return {name: [s[name] for s in found] for name in PHOTO_STATISTICS} if found else {}


def baseline(sm, s3, bucket: str, endpoint_name: str) -> dict:
    """The serving model and its test set's figures, as bin_counter.monitor.assess takes them."""
    model = serving(sm, endpoint_name)
    figures = card_baseline(model_card(s3, model["model_data_url"]))
    dataset_version = model["tags"].get(DATASET_TAG)
    return {
        **figures,
        "model": model["model"],
        "model_data_url": model["model_data_url"],
        "dataset_version": dataset_version,
        "photo_statistics": test_photo_statistics(s3, bucket, dataset_version),
    }
