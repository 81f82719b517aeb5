"""Train/validation/test splits by blocks of consecutive ABID keys, stratified by count.

Consecutive keys are often the same bin photographed again after one item was picked; a random
split puts near-duplicates on both sides and overstates accuracy. Whole blocks of keys go to one
split, and blocks are dealt so that each split's count distribution follows the overall one.

Two ways to write a split:
- `write_manifests` (the data-prep DAG's): nothing is copied. Each split is a SageMaker ManifestFile
  (`<split>.manifest`) listing its photos where they already lie (`bin-images/<key>.jpg`) and one
  labels file beside them (`labels/<version>-<split>.csv`: key, count), so that a training channel
  holds one object per photo and one more; train.py reads the counts from it.
- `write_split_layout` (local folders: the CLI, the benchmarks): every photo copied into
  `<split>/<count>/<key>.jpg`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from bin_counter import live
from bin_counter.abid import (
    IMAGE_PREFIX,
    MissingObject,
    Record,
    S3Store,
    Source,
    Store,
    image_path,
    key_block,
)

SPLITS = ("train", "validation", "test")
DEFAULT_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_BLOCK_SIZE = 100
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("key", "count", "split", "block", "source", "sha256")
# A manifest split's rows name each photo by its S3 ETag (listed, never read), not by a digest of its bytes.
REFERENCE_FIELDS = ("key", "count", "split", "block", "source", "etag")
CHANNEL_MANIFEST = "{split}.manifest"
# Beside the photos, because a manifest's objects share one prefix: a channel gets it with them.
LABELS = "labels/{version}-{split}.csv"
LABEL_FIELDS = ("key", "count")


def check_shares(shares: Mapping[str, float]) -> dict[str, float]:
    unknown = set(shares) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; use {SPLITS}")
    if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
        raise ValueError(f"split shares must be non-negative and add up to 1, got {dict(shares)}")
    return {s: float(shares.get(s, 0.0)) for s in SPLITS}


def block_of(key: str, block_size: int) -> str:
    """The split block of a key: a run of consecutive ABID keys, or a live photo's capture hour."""
    return live.block(key) if live.is_live(key) else key_block(key, block_size)


def source_of(key: str) -> str:
    """Where a dataset's photo came from: "live" (a captured request) or "abid"."""
    return live.SOURCE if live.is_live(key) else "abid"


def assign_splits(
    records: Iterable[Record],
    shares: Mapping[str, float] = DEFAULT_SHARES,
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = 0,
) -> dict[str, str]:
    """key -> split. Reproducible for the same records, shares, block size and seed.

    Each source (ABID, live photos) is split on its own, so that each gives every split its share
    (a few live photos among thousands of ABID ones would otherwise all land where ABID needs them).
    """
    by_source: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_source[source_of(record.key)].append(record)
    assignment: dict[str, str] = {}
    for name in sorted(by_source):
        assignment.update(_assign_blocks(by_source[name], check_shares(shares), block_size, seed))
    return assignment


def _assign_blocks(records: list[Record], shares: dict[str, float], block_size: int, seed: int) -> dict[str, str]:
    """Blocks are visited in a seeded random order, largest first, and each goes to the split whose
    per-count targets it helps most (a greedy stratified group split)."""
    blocks: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        blocks[block_of(record.key, block_size)].append(record)
    totals = Counter(r.count for rs in blocks.values() for r in rs)
    targets = {s: {c: shares[s] * n for c, n in totals.items()} for s in SPLITS}
    current: dict[str, Counter[int]] = {s: Counter() for s in SPLITS}
    rng = random.Random(seed)
    order = sorted(blocks)
    rng.shuffle(order)
    order.sort(key=lambda b: -len(blocks[b]))  # stable: ties keep the seeded order

    assignment: dict[str, str] = {}
    for block in order:
        histogram = Counter(r.count for r in blocks[block])
        # How much of each split's remaining need, per count, this block would fill.
        need = {
            s: sum(n * (targets[s][c] - current[s][c]) / totals[c] for c, n in histogram.items())
            if shares[s] > 0
            else float("-inf")
            for s in SPLITS
        }
        chosen = max(SPLITS, key=need.__getitem__)
        current[chosen].update(histogram)
        for record in blocks[block]:
            assignment[record.key] = chosen
    return assignment


def write_split_layout(
    records: Iterable[Record],
    assignment: Mapping[str, str],
    images: Source,
    out: Store,
    source_label: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[dict]:
    """Copy `bin-images/<key>.jpg` from `images` to `<split>/<count>/<key>.jpg` in `out`, then
    write `manifest.csv` (last: its presence marks the split complete). Returns the manifest rows.

    A store that already holds a manifest is complete: nothing is read or written again.
    """
    existing = read_manifest_rows(out)
    if existing is not None:
        return existing
    rows = []
    for record in sorted(records, key=lambda r: r.key):
        split = assignment[record.key]
        data = images.read(image_path(record.key))
        out.write(f"{split}/{record.count}/{record.key}.jpg", data)
        rows.append(
            {
                "key": record.key,
                "count": record.count,
                "split": split,
                "block": block_of(record.key, block_size),
                "source": source_label,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    write_rows(out, rows, MANIFEST_FIELDS)
    return rows


def read_manifest_rows(out: Store) -> list[dict] | None:
    """The rows of `out`'s `manifest.csv`, or None while it has none (the split is not complete)."""
    try:
        return list(csv.DictReader(io.StringIO(out.read(MANIFEST).decode())))
    except MissingObject:
        return None


def write_rows(out: Store, rows: list[dict], fields: tuple[str, ...], path: str = MANIFEST) -> None:
    """`rows` as a CSV of `fields` (others left out) at `path` in `out`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out.write(path, buf.getvalue().encode())


def channel_manifest(images_uri: str, keys: Iterable[str], labels: str) -> list:
    """SageMaker's ManifestFile for one channel: the prefix, then each photo relative to it, then the
    labels file, so that the channel holds `bin-images/` and `labels/` (ABID's layout, its counts in
    one file rather than a metadata file per photo)."""
    return [{"prefix": images_uri.rstrip("/") + "/"}, *[image_path(key) for key in keys], labels]


def write_manifests(
    records: Iterable[Record],
    assignment: Mapping[str, str],
    images: S3Store,
    out: Store,
    version: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[dict]:
    """Write, for each split that has photos, its labels file into `images` and `<split>.manifest` into
    `out`; then `manifest.csv` (last: its presence marks the split complete). Returns the manifest
    rows. No photo is copied: they stay in `images`, which is listed (a request per thousand objects)
    so that a photo gone from it fails here, naming it, rather than the training job later.

    A store that already holds a `manifest.csv` is complete: nothing is listed or written again.
    """
    existing = read_manifest_rows(out)
    if existing is not None:
        return existing
    records = sorted(records, key=lambda r: r.key)
    photos = images.listing(IMAGE_PREFIX)
    absent = [r.key for r in records if image_path(r.key) not in photos]
    if absent:
        raise MissingObject(
            f"{len(absent)} of the {len(records)} photos to split are not in {images.uri} "
            f"(first: {absent[:5]}): they were fetched and are gone; clear the run and run it "
            "again from the fetch"
        )
    rows: list[dict] = [
        {
            "key": r.key,
            "count": r.count,
            "split": assignment[r.key],
            "block": block_of(r.key, block_size),
            "source": images.uri,
            "etag": photos[image_path(r.key)][1],
        }
        for r in records
    ]
    for name in SPLITS:
        chosen = [row for row in rows if row["split"] == name]
        if not chosen:
            continue
        labels = LABELS.format(version=version, split=name)
        write_rows(images, chosen, LABEL_FIELDS, labels)
        manifest = channel_manifest(images.uri, [row["key"] for row in chosen], labels)
        out.write(CHANNEL_MANIFEST.format(split=name), json.dumps(manifest).encode())
    write_rows(out, rows, REFERENCE_FIELDS)
    return rows


def summarize_sources(records: Iterable[Record], assignment: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Photos per source and split ({"abid": {"train": n, ...}, "live": {...}}), for the dataset record."""
    table: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        table[source_of(record.key)][assignment[record.key]] += 1
    return {name: {s: table[name][s] for s in SPLITS} for name in sorted(table)}


def summarize(records: Iterable[Record], assignment: Mapping[str, str]) -> dict[str, dict[int, int]]:
    """Images per split and count, for logs and reports."""
    table: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for record in records:
        table[assignment[record.key]][record.count] += 1
    return {s: dict(sorted(c.items())) for s, c in table.items()}
