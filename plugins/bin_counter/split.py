"""Train/validation/test splits by blocks of consecutive ABID keys, stratified by count.

Consecutive keys are often the same bin photographed again after one item was picked; a random
split puts near-duplicates on both sides and overstates accuracy. Whole blocks of keys go to one
split, and blocks are dealt so that each split's count distribution follows the overall one.
"""

from __future__ import annotations

import csv
import hashlib
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from bin_counter.abid import Record, key_block

SPLITS = ("train", "validation", "test")
DEFAULT_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_BLOCK_SIZE = 100
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


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_split_layout(
    records: Iterable[Record],
    assignment: Mapping[str, str],
    image_dir: str | Path,
    out_dir: str | Path,
    source: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:
    """Copy images into `<out>/<split>/<count>/<key>.jpg` and write `<out>/manifest.csv`.

    `image_dir` holds `<key>.jpg` files (an ABID `bin-images/` folder). Returns the manifest path.
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    for name in SPLITS:  # a previous split of other data must not leave images behind
        shutil.rmtree(out_dir / name, ignore_errors=True)
    rows = []
    for record in sorted(records, key=lambda r: r.key):
        split = assignment[record.key]
        src = image_dir / f"{record.key}.jpg"
        dst = out_dir / split / str(record.count) / f"{record.key}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        rows.append({"key": record.key, "count": record.count, "split": split,
                     "block": key_block(record.key, block_size), "source": source,
                     "sha256": sha256_file(dst)})
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def summarize(records: Iterable[Record], assignment: Mapping[str, str]) -> dict[str, dict[int, int]]:
    """Images per split and count, for logs and reports."""
    table: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for record in records:
        table[assignment[record.key]][record.count] += 1
    return {s: dict(sorted(c.items())) for s, c in table.items()}
