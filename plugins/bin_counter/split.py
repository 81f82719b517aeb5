"""Train/validation/test splits by blocks of consecutive ABID keys, stratified by count.

Consecutive keys are often the same bin photographed again after one item was picked; a random
split puts near-duplicates on both sides and overstates accuracy. Whole blocks of keys go to one
split, and blocks are dealt so that each split's count distribution follows the overall one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from bin_counter.abid import MissingObject, Record, Source, Store, image_path, key_block

SPLITS = ("train", "validation", "test")
DEFAULT_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_BLOCK_SIZE = 100
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("key", "count", "split", "block", "source", "sha256")


def check_shares(shares: Mapping[str, float]) -> dict[str, float]:
    unknown = set(shares) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; use {SPLITS}")
    if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
        raise ValueError(f"split shares must be non-negative and add up to 1, got {dict(shares)}")
    return {s: float(shares.get(s, 0.0)) for s in SPLITS}


def assign_splits(
    records: Iterable[Record],
    shares: Mapping[str, float] = DEFAULT_SHARES,
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = 0,
) -> dict[str, str]:
    """key -> split. Reproducible for the same records, shares, block size and seed.

    Blocks are visited in a seeded random order, largest first, and each goes to the split whose
    per-count targets it helps most (a greedy stratified group split).
    """
    shares = check_shares(shares)
    blocks: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        blocks[key_block(record.key, block_size)].append(record)
    totals = Counter(r.count for rs in blocks.values() for r in rs)
    targets = {s: {c: shares[s] * n for c, n in totals.items()} for s in SPLITS}
    current = {s: Counter() for s in SPLITS}
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
            if shares[s] > 0 else float("-inf")
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
    try:
        return list(csv.DictReader(io.StringIO(out.read(MANIFEST).decode())))
    except MissingObject:
        pass
    rows = []
    for record in sorted(records, key=lambda r: r.key):
        split = assignment[record.key]
        data = images.read(image_path(record.key))
        out.write(f"{split}/{record.count}/{record.key}.jpg", data)
        rows.append({"key": record.key, "count": record.count, "split": split,
                     "block": key_block(record.key, block_size), "source": source_label,
                     "sha256": hashlib.sha256(data).hexdigest()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out.write(MANIFEST, buf.getvalue().encode())
    return rows


def summarize(records: Iterable[Record], assignment: Mapping[str, str]) -> dict[str, dict[int, int]]:
    """Images per split and count, for logs and reports."""
    table: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for record in records:
        table[assignment[record.key]][record.count] += 1
    return {s: dict(sorted(c.items())) for s, c in table.items()}

