"""Live photos: captured requests whose count is confirmed, as a data-prep source beside ABID.

A photo the endpoint answered (SageMaker's data capture, `bin_counter.capture`) becomes a labelled
photo when its count is confirmed:
- by a person: a reviewer drops a CSV into `s3://<bucket>/reviews/` (any name ending `.csv`), with
  the columns `inference_id,count` and, for a request of several photos, `image` (the photo's place
  in the request, 0 first; 0 when left out). A reviewer's count wins over the client's.
- by the client: the count it sent as `expected` with the request (the API function's per-request
  log line, joined to the capture by the request id, which the function passes as InferenceId).

Each confirmed photo is written in ABID's layout, `bin-images/<key>.jpg` and `metadata/<key>.json`
(EXPECTED_QUANTITY, plus where it came from), under the key `live-<yyyymmddhh>-<inference id>-<n>`:
the capture hour first, so that the split can keep an hour's photos (a client photographing the same
bin again) in one block. The same request gives the same key, so a re-run or a retried task writes
nothing twice; a photo whose bytes were already taken from another request is left out too (a client
sending the same photo again). Photos that do not decode are skipped and counted, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bin_counter.abid import IMAGE_PREFIX, Store, image_path, metadata_path
from bin_counter.capture import CapturedRequest, Verdict
from bin_counter.fetch import check_image

log = logging.getLogger(__name__)

SOURCE = "live"
KEY_PREFIX = "live-"
REVIEWS_PREFIX = "reviews/"
REVIEW_FIELDS = ("inference_id", "count")  # required; "image" is optional
# An inference id as a key part: S3 keys and the labels CSV take it, but not every character a
# client may send; anything else is dropped (the full id stays in the photo's metadata).
_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def is_live(key: str) -> bool:
    return key.startswith(KEY_PREFIX)


def live_key(moment: datetime, inference_id: str, index: int) -> str:
    """`live-<yyyymmddhh>-<inference id>-<index>`: the capture hour (UTC), the request, the photo."""
    return f"{KEY_PREFIX}{moment.astimezone(UTC):%Y%m%d%H}-{_UNSAFE.sub('', inference_id)}-{index}"


def block(key: str) -> str:
    """A live photo's split block: its capture hour. Photos of one hour stay on one side of the split,
    and never share a block with ABID's keys."""
    return f"live:{key[len(KEY_PREFIX) :].split('-', 1)[0]}"


@dataclass(frozen=True)
class LivePhoto:
    key: str
    count: int
    image: bytes
    metadata: dict


@dataclass
class LiveReport:
    """What the live source found in its window, for the log and the dataset record."""

    captured_requests: int = 0
    captured_photos: int = 0
    confirmed_by_client: int = 0
    confirmed_by_reviewer: int = 0
    unconfirmed: int = 0  # no expected count and no review: not used
    duplicates: int = 0  # the same request again, or the same photo bytes from another request
    invalid: dict[str, str] = field(default_factory=dict)  # key -> why the photo was skipped
    bad_review_rows: list[str] = field(default_factory=list)  # "file, line n: why"

    def summary(self) -> str:
        return (
            f"{self.captured_photos} photos in {self.captured_requests} captured requests: "
            f"{self.confirmed_by_client} confirmed by the client's expected count, {self.confirmed_by_reviewer} "
            f"by a reviewer, {self.unconfirmed} unconfirmed, {self.duplicates} duplicates, "
            f"{len(self.invalid)} invalid photos skipped, {len(self.bad_review_rows)} review rows unreadable"
        )


def read_reviews(s3, bucket: str) -> tuple[dict[tuple[str, int], int], list[str]]:
    """The reviewers' counts, {(inference id, image index): count}, from every `reviews/*.csv`, and the
    rows that could not be read ("file, line n: why"), which are reported and left out."""
    counts: dict[tuple[str, int], int] = {}
    bad: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=REVIEWS_PREFIX):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(".csv"):
                continue
            text = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("utf-8-sig", errors="replace")
            for number, row in enumerate(csv.DictReader(io.StringIO(text)), 2):
                try:
                    found = int(row["count"])
                    index = int(row.get("image") or 0)
                    if found < 0 or index < 0 or not (row["inference_id"] or "").strip():
                        raise ValueError("a negative number or an empty inference_id")
                except (KeyError, TypeError, ValueError) as exc:
                    bad.append(f"s3://{bucket}/{obj['Key']}, line {number}: need inference_id,count[,image] ({exc})")
                    continue
                counts[(row["inference_id"].strip(), index)] = found
    for why in bad:
        log.warning("review row skipped: %s", why)
    return counts, bad


def _expected(verdict: Verdict | None, index: int) -> int | None:
    """The count the client sent for the request's `index`-th photo, if it sent one."""
    if verdict is None or index >= len(verdict.answers):
        return None
    expected = verdict.answers[index].get("expected")
    return expected if isinstance(expected, int) and not isinstance(expected, bool) and expected >= 0 else None


def confirmed_photos(
    captures: Iterable[CapturedRequest],
    verdicts: Mapping[str, Verdict],
    reviews: Mapping[tuple[str, int], int],
    report: LiveReport,
) -> list[LivePhoto]:
    """Each captured photo whose count a reviewer or the client confirmed, once, in key order; the
    rest counted in `report`."""
    photos: dict[str, LivePhoto] = {}
    seen_bytes: set[str] = set()
    for captured in captures:
        report.captured_requests += 1
        report.captured_photos += len(captured.images)
        if not captured.inference_id:  # without the request id nothing joins it to a count
            report.unconfirmed += len(captured.images)
            continue
        verdict = verdicts.get(captured.inference_id)
        for index, image in enumerate(captured.images):
            photo = _confirmed(captured, verdict, reviews, index, image, report)
            if photo is None:
                continue
            digest = hashlib.sha256(image).hexdigest()
            if photo.key in photos or digest in seen_bytes:
                report.duplicates += 1
                continue
            seen_bytes.add(digest)
            photos[photo.key] = photo
            by = "confirmed_by_reviewer" if photo.metadata["confirmed_by"] == "reviewer" else "confirmed_by_client"
            setattr(report, by, getattr(report, by) + 1)
    return [photos[key] for key in sorted(photos)]


def _confirmed(
    captured: CapturedRequest,
    verdict: Verdict | None,
    reviews: Mapping[tuple[str, int], int],
    index: int,
    image: bytes,
    report: LiveReport,
) -> LivePhoto | None:
    request = captured.inference_id or ""  # confirmed_photos passes only requests that have one
    reviewed, expected = reviews.get((request, index)), _expected(verdict, index)
    count = reviewed if reviewed is not None else expected
    if count is None:
        report.unconfirmed += 1
        return None
    key = live_key(captured.time, request, index)
    try:
        check_image(image)
    except ValueError as exc:
        report.invalid[key] = str(exc)
        log.warning("live photo %s skipped: %s", key, exc)
        return None
    prediction = captured.predictions[index] if index < len(captured.predictions) else {}
    metadata = {
        "EXPECTED_QUANTITY": count,
        "source": SOURCE,
        "confirmed_by": "reviewer" if reviewed is not None else "client",
        "inference_id": captured.inference_id,
        "image": index,
        "event_id": captured.event_id,
        "endpoint": captured.endpoint,
        "variant": captured.variant,
        "captured_at": captured.time.astimezone(UTC).isoformat(timespec="seconds"),
        "model_version": captured.model_version,
        "predicted": prediction.get("count"),
    }
    return LivePhoto(key, count, image, metadata)


def write_photos(store: Store, photos: Iterable[LivePhoto]) -> dict[str, int]:
    """Each photo and its metadata into `store` (ABID's layout), the metadata last (its presence marks
    the photo complete); photos already complete there are not written again. {"written", "skipped"}."""
    photos = list(photos)
    done = set(store.listing(f"{IMAGE_PREFIX}{KEY_PREFIX}")) if hasattr(store, "listing") else set()
    metadata_done = set(store.listing(f"metadata/{KEY_PREFIX}")) if hasattr(store, "listing") else set()
    written = 0
    for photo in photos:
        if image_path(photo.key) in done and metadata_path(photo.key) in metadata_done:
            continue
        store.write(image_path(photo.key), photo.image)
        store.write(metadata_path(photo.key), json.dumps(photo.metadata, sort_keys=True).encode())
        written += 1
    return {"written": written, "skipped": len(photos) - written}
