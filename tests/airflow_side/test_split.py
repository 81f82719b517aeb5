"""Splits by key blocks: no block on two sides, stratified by count, reproducible."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter

import pytest

from bin_counter import abid, split
from tests.conftest import write_abid_dir


def records(n: int = 3000) -> list[abid.Record]:
    # Counts drift slowly along the keys, as in ABID, where neighbours are the same bin.
    return [abid.Record(f"{i:05d}", (i // 37) % 6) for i in range(1, n + 1)]


def test_no_block_is_on_two_sides():
    recs = records()
    assignment = split.assign_splits(recs, block_size=50, seed=1)
    sides = {}
    for r in recs:
        sides.setdefault(abid.key_block(r.key, 50), set()).add(assignment[r.key])
    assert all(len(s) == 1 for s in sides.values())


def test_shares_and_count_distribution_follow_the_targets():
    recs = records()
    assignment = split.assign_splits(recs, block_size=20, seed=0)
    table = split.summarize(recs, assignment)
    total = Counter(r.count for r in recs)
    for name, share in split.DEFAULT_SHARES.items():
        # Whole blocks of 20 move at once: within two blocks of the target.
        assert sum(table[name].values()) == pytest.approx(share * len(recs), abs=40)
        for count, n in total.items():
            assert table[name].get(count, 0) == pytest.approx(share * n, rel=0.35, abs=25)


def test_reproducible_from_the_seed():
    recs = records()
    assert split.assign_splits(recs, seed=5) == split.assign_splits(list(reversed(recs)), seed=5)
    assert split.assign_splits(recs, seed=5) != split.assign_splits(recs, seed=6)


def test_zero_share_split_gets_nothing():
    assignment = split.assign_splits(records(500), {"train": 0.9, "validation": 0.1, "test": 0.0})
    assert "test" not in set(assignment.values())


@pytest.mark.parametrize(
    "shares", [{"train": 0.5, "validation": 0.2}, {"train": 1.2, "test": -0.2}, {"train": 0.8, "holdout": 0.2}]
)
def test_bad_shares_are_refused(shares):
    with pytest.raises(ValueError):
        split.assign_splits(records(10), shares)


def test_layout_and_manifest(tmp_path):
    counts = {f"{i:05d}": i % 4 for i in range(1, 41)}
    src = write_abid_dir(tmp_path / "abid", counts)
    recs = abid.read_local_records(src)
    assignment = split.assign_splits(recs, block_size=5)
    out = abid.LocalStore(tmp_path / "out", create=True)
    split.write_split_layout(recs, assignment, abid.LocalStore(src), out, "test-source", 5)
    rows = list(csv.DictReader((tmp_path / "out" / split.MANIFEST).open()))
    assert len(rows) == 40 and set(rows[0]) == set(split.MANIFEST_FIELDS)
    for row in rows:
        image = tmp_path / "out" / row["split"] / row["count"] / f"{row['key']}.jpg"
        assert hashlib.sha256(image.read_bytes()).hexdigest() == row["sha256"]
        assert row["source"] == "test-source"
    # Complete once the manifest is there: a second call writes nothing.
    (tmp_path / "out" / rows[0]["split"] / rows[0]["count"] / f"{rows[0]['key']}.jpg").unlink()
    again = split.write_split_layout(recs, assignment, abid.LocalStore(src), out, "test-source", 5)
    assert again == rows
    assert not (tmp_path / "out" / rows[0]["split"] / rows[0]["count"] / f"{rows[0]['key']}.jpg").exists()
