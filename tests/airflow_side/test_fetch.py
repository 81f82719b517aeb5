"""Fetching an ABID subset: checks, reports, retries, resuming, from a folder and from S3."""

from __future__ import annotations

import json
import os

import pytest

from bin_counter import abid, fetch
from tests.conftest import make_bin_image, write_abid_dir


@pytest.fixture
def source_dir(tmp_path):
    root = write_abid_dir(tmp_path / "source", {f"{i:05d}": i % 6 for i in range(1, 21)})
    image = root / "bin-images" / "00003.jpg"
    image.write_bytes(image.read_bytes()[:200])  # truncated JPEG
    (root / "metadata" / "00004.json").write_text("{broken")  # invalid JSON
    (root / "bin-images" / "00005.jpg").write_bytes(b"<html>not found</html>")  # not an image
    (root / "bin-images" / "00006.jpg").unlink()  # image missing at the source
    return root


KEYS = [f"{i:05d}" for i in range(1, 23)]  # 00021 and 00022 do not exist at all


def test_fetch_checks_every_file_and_reports_bad_keys(source_dir, tmp_path):
    report = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS, tmp_path / "dest")
    assert sorted(report.missing) == ["00006", "00021", "00022"]
    assert set(report.invalid) == {"00003", "00004", "00005"}
    assert "truncated" in report.invalid["00003"].lower()
    assert "metadata" in report.invalid["00004"]
    assert len(report.fetched) == 16 and report.counts["00007"] == 1
    for key in report.fetched:
        assert (tmp_path / "dest" / "bin-images" / f"{key}.jpg").read_bytes() == (
            source_dir / "bin-images" / f"{key}.jpg"
        ).read_bytes()
    for key in (*report.missing, *report.invalid):
        assert not (tmp_path / "dest" / "bin-images" / f"{key}.jpg").exists()
    assert json.loads(json.dumps(report.to_dict()))["summary"].startswith("22 requested")


def test_rerun_does_nothing_and_interrupted_run_resumes(source_dir, tmp_path):
    dest = tmp_path / "dest"
    first = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS[:10], dest)  # "interrupted" half way
    again = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS, dest)
    assert sorted(again.skipped) == sorted(first.fetched)
    assert not set(again.fetched) & set(first.fetched)
    # A file cut short at the destination (a kill mid-copy by another tool) is fetched again.
    cut = dest / "bin-images" / "00001.jpg"
    cut.write_bytes(cut.read_bytes()[:50])
    third = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS, dest)
    assert third.fetched == ["00001"]
    assert not [p for p in dest.rglob("*.part")]


def test_too_many_bad_keys_fails_with_the_report(source_dir, tmp_path):
    with pytest.raises(fetch.TooManyBadKeys, match="6 of 22 keys") as caught:
        fetch.fetch_subset(abid.LocalStore(source_dir), KEYS, tmp_path / "dest", max_bad_share=0.2)
    assert len(caught.value.report.fetched) == 16  # the good ones still arrived


class FlakySource:
    """A network that drops the first attempts at each object (outside our reach, so faked)."""

    def __init__(self, inner: abid.Source, failures: int) -> None:
        self.inner, self.failures, self.uri, self.attempts = inner, failures, inner.uri, {}

    def read(self, path: str) -> bytes:
        self.attempts[path] = self.attempts.get(path, 0) + 1
        if self.attempts[path] <= self.failures:
            raise ConnectionResetError("connection reset by peer")
        return self.inner.read(path)

    def size(self, path: str) -> int:
        return self.inner.size(path)


def test_transient_errors_are_retried_with_backoff(source_dir, tmp_path):
    flaky = FlakySource(abid.LocalStore(source_dir), failures=2)
    report = fetch.fetch_subset(flaky, ["00001", "00002"], tmp_path / "dest", retries=3, backoff=0.01)
    assert sorted(report.fetched) == ["00001", "00002"]
    assert flaky.attempts["bin-images/00001.jpg"] == 3


def test_persistent_errors_surface_after_the_retries(source_dir, tmp_path):
    flaky = FlakySource(abid.LocalStore(source_dir), failures=10)
    keys = [f"{i:05d}" for i in range(1, 200)]
    with pytest.raises(fetch.SourceUnavailable, match="ConnectionResetError") as caught:
        fetch.fetch_subset(flaky, keys, tmp_path / "dest", workers=2, retries=2, backoff=0.01)
    assert "ABID_SOURCE" in str(caught.value)
    # It gave up early instead of retrying every remaining key.
    assert len(flaky.attempts) < 20


def test_fetch_from_s3_over_http(s3, bucket, source_dir, tmp_path):
    for path in source_dir.rglob("*"):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"abid/{path.relative_to(source_dir)}", Body=path.read_bytes())
    source = abid.open_source(f"s3://{bucket}/abid", s3_client=s3)
    report = fetch.fetch_subset(source, KEYS, tmp_path / "dest", workers=4)
    assert sorted(report.missing) == ["00006", "00021", "00022"]
    assert set(report.invalid) == {"00003", "00004", "00005"}
    again = fetch.fetch_subset(source, KEYS, tmp_path / "dest", workers=4)
    assert len(again.skipped) == 16 and not again.fetched


def test_check_image_accepts_png_and_refuses_others():
    fetch.check_image(make_bin_image(2, 0, fmt="PNG"))
    with pytest.raises(ValueError):
        fetch.check_image(make_bin_image(2, 0, fmt="GIF"))
    with pytest.raises(ValueError):
        fetch.check_image(b"")


def test_real_mirror_sample_with_held_back_blocks(real_abid, tmp_path):
    keys = abid.key_range(250, 450)  # keys 00300-00399 are held back: missing at this source
    report = fetch.fetch_subset(abid.LocalStore(real_abid), keys, tmp_path / "dest")
    assert len(report.fetched) + len(report.missing) == 200
    assert report.fetched and not report.invalid
    assert all(os.path.getsize(tmp_path / "dest" / abid.image_path(k)) > 0 for k in report.fetched)


def test_fetch_into_s3_and_resume(s3, bucket, source_dir):
    dest = abid.open_store(f"s3://{bucket}/raw", s3_client=s3)
    first = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS[:8], dest)
    s3.delete_object(Bucket=bucket, Key="raw/metadata/00001.json")  # a key interrupted half way
    again = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS, dest)
    assert again.fetched[0] == "00001" and "00001" not in again.skipped
    assert sorted(again.skipped) == sorted(k for k in first.fetched if k != "00001")
    body = s3.get_object(Bucket=bucket, Key="raw/bin-images/00002.jpg")["Body"].read()
    assert body == (source_dir / "bin-images" / "00002.jpg").read_bytes()


def test_count_filter_leaves_other_counts_out_without_downloading_them(source_dir, tmp_path):
    class CountingReads(abid.LocalStore):
        images_read = 0

        def read(self, path):
            if path.startswith("bin-images/"):
                CountingReads.images_read += 1
            return super().read(path)

    keys = [f"{i:05d}" for i in range(7, 21)]  # all valid: counts i % 6
    report = fetch.fetch_subset(CountingReads(source_dir), keys, tmp_path / "dest", counts=[0, 1])
    assert sorted(report.fetched) == sorted(k for k in keys if int(k) % 6 in (0, 1))
    assert sorted(report.filtered) == sorted(k for k in keys if int(k) % 6 not in (0, 1))
    assert CountingReads.images_read == len(report.fetched)
    assert not (tmp_path / "dest" / "bin-images" / "00008.jpg").exists()


def test_a_resumed_fetch_into_s3_lists_instead_of_asking_file_by_file(s3, bucket, source_dir):
    class CountingStore(abid.S3Store):
        sizes_asked = 0

        def size(self, path):
            CountingStore.sizes_asked += 1
            return super().size(path)

    dest = CountingStore(bucket, "raw", s3)
    first = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS[:8], dest)
    # A photo cut short at the destination (a copy killed mid-write elsewhere): its size differs.
    s3.put_object(Bucket=bucket, Key="raw/bin-images/00002.jpg", Body=b"\xff\xd8 cut")
    again = fetch.fetch_subset(abid.LocalStore(source_dir), KEYS, dest)
    assert CountingStore.sizes_asked == 0
    assert "00002" in again.fetched and sorted(again.skipped) == sorted(k for k in first.fetched if k != "00002")
    assert (
        s3.get_object(Bucket=bucket, Key="raw/bin-images/00002.jpg")["Body"].read()
        == (source_dir / "bin-images" / "00002.jpg").read_bytes()
    )


def test_a_listing_of_a_key_range_holds_exactly_the_paths_in_it(s3, bucket):
    store = abid.S3Store(bucket, "raw", s3)
    for key in ("0099", "01", "0100", "0100x", "0101", "0102", "2"):
        store.write(abid.image_path(key), key.encode())
    store.write("metadata/0100.json", b"{}")
    sizes = fetch.known_sizes(store, ["0100", "0101", "01"])
    # Every path between the smallest and the largest asked for is listed, and nothing beyond.
    assert sorted(sizes) == [
        "bin-images/01.jpg",
        "bin-images/0100.jpg",
        "bin-images/0100x.jpg",
        "bin-images/0101.jpg",
        "metadata/0100.json",
    ]
    assert sizes["bin-images/0101.jpg"] == 4
    # A store that cannot list is asked file by file.
    assert fetch.known_sizes(abid.HttpsSource("https://example.invalid"), ["1"]) is None


def test_keys_of_two_lengths_are_listed_as_two_narrow_ranges(s3, bucket):
    store = abid.S3Store(bucket, "raw", s3)
    for key in ("99998", "99999", "100000", "100001", "123456"):
        store.write(abid.image_path(key), b"x")
    # As strings, 100000.jpg < 123456.jpg < 99998.jpg: one range would hold 123456 as well.
    assert sorted(fetch.known_sizes(store, ["99998", "99999", "100000", "100001"])) == [
        "bin-images/100000.jpg",
        "bin-images/100001.jpg",
        "bin-images/99998.jpg",
        "bin-images/99999.jpg",
    ]
