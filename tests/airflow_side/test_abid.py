"""ABID keys, file lists and sources (local folder, S3 and HTTPS against a moto server)."""

from __future__ import annotations

import json

import pytest
from botocore import UNSIGNED

from bin_counter import abid
from tests.conftest import write_abid_dir


def test_padded_and_unpadded_keys_are_different_series():
    assert abid.key_block("00121", 100) == abid.key_block("00199", 100)
    assert abid.key_block("00121", 100) != abid.key_block("00200", 100)
    assert abid.key_block("121", 100) != abid.key_block("00121", 100)
    assert abid.key_block("100313", 100) == abid.key_block("100399", 100)


def test_a_key_range_keeps_its_padding_and_a_bad_one_is_a_value_error():
    assert abid.parse_key_range("00998:01001") == ["00998", "00999", "01000"]
    for bad in ("10:5", "01000", "a:b", "5:5"):
        with pytest.raises(ValueError, match="expected START:STOP"):
            abid.parse_key_range(bad)


def test_file_list_parsing_and_reproducible_selection():
    raw = json.dumps(
        {
            "1": ["data/metadata/00012.json", "data/metadata/121.json"],
            "2": [f"data/metadata/{i:05d}.json" for i in range(20, 30)],
        }
    )
    by_count = abid.parse_file_list(raw)
    assert by_count[1] == ["00012", "121"]
    chosen = abid.select_keys(by_count, limit=4, seed=3)
    assert chosen == abid.select_keys(by_count, limit=4, seed=3)
    assert len(chosen) == 4
    assert {"00012", "121"} <= set(chosen)  # drawn evenly: count 1 is not crowded out
    assert abid.select_keys(by_count, counts=[2]) == sorted(by_count[2])


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        (b"{not json", "JSONDecodeError"),
        (b'{"BIN_FCSKU_DATA": {}}', "KeyError"),
        (b'{"EXPECTED_QUANTITY": "three"}', "non-negative integer"),
        (b'{"EXPECTED_QUANTITY": -1}', "non-negative integer"),
    ],
)
def test_bad_metadata_is_refused(metadata, problem):
    with pytest.raises(ValueError, match=problem):
        abid.parse_count(metadata)


def test_local_records_need_both_files(tmp_path):
    root = write_abid_dir(tmp_path, {"00001": 2, "00002": 0})
    (root / "bin-images" / "00002.jpg").unlink()
    assert abid.read_local_records(root) == [abid.Record("00001", 2)]


def test_s3_and_https_sources_read_the_same_objects(s3, bucket, moto_endpoint, tmp_path):
    local = write_abid_dir(tmp_path, {"00001": 3})
    for path in ("bin-images/00001.jpg", "metadata/00001.json"):
        # Public like the ABID bucket, so the anonymous HTTPS form can read it.
        s3.put_object(Bucket=bucket, Key=f"mirror/{path}", Body=(local / path).read_bytes(), ACL="public-read")
    sources = [
        abid.open_source(f"s3://{bucket}/mirror", s3_client=s3),
        abid.open_source(f"{moto_endpoint}/{bucket}/mirror"),
        abid.open_source(str(local)),
    ]
    for source in sources:
        assert source.read("metadata/00001.json") == (local / "metadata/00001.json").read_bytes()
        assert source.size("bin-images/00001.jpg") == (local / "bin-images/00001.jpg").stat().st_size
        with pytest.raises(abid.MissingObject, match="00002"):
            source.read("bin-images/00002.jpg")
        with pytest.raises(abid.MissingObject):
            source.size("bin-images/00002.jpg")


def test_missing_local_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        abid.open_source(str(tmp_path / "nowhere"))


def test_public_bucket_source_is_anonymous():
    source = abid.open_source()
    assert source.uri == "s3://aft-vbi-pds"
    assert source.client.meta.config.signature_version is UNSIGNED


def test_file_list_falls_back_to_the_packaged_copy(tmp_path):
    source = abid.LocalStore(write_abid_dir(tmp_path, {"00001": 1}))
    by_count = abid.file_list_from(source)
    assert sorted(by_count) == [1, 2, 3, 4, 5]
    assert sum(map(len, by_count.values())) == 10441
