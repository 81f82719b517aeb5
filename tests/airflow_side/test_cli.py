"""The data command line, end to end on a local source."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, write_abid_dir


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins")}
    return subprocess.run(
        [sys.executable, "-m", "bin_counter.cli", *args], capture_output=True, text=True, env=env, check=False
    )


def test_fetch_then_split(tmp_path):
    source = write_abid_dir(tmp_path / "source", {f"{i:05d}": i % 7 for i in range(100, 160)})
    (source / "file_list.json").write_text(json.dumps({"1": ["data/metadata/00101.json"]}))
    fetched = cli(
        "fetch",
        "--source",
        str(source),
        "--keys",
        "00100:00170",
        "--dest",
        str(tmp_path / "abid"),
        "--report",
        str(tmp_path / "report.json"),
    )
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["missing"] == 10
    assert json.loads((tmp_path / "report.json").read_text())["requested"] == 70

    split = cli(
        "split",
        "--abid",
        str(tmp_path / "abid"),
        "--out",
        str(tmp_path / "split"),
        "--block-size",
        "5",
        "--max-count",
        "5",
    )
    assert split.returncode == 0, split.stderr
    images = json.loads(split.stdout)["images"]
    assert sum(sum(c.values()) for c in images.values()) == sum(1 for i in range(100, 160) if i % 7 <= 5)
    assert (tmp_path / "split" / "manifest.csv").is_file()
    stale = tmp_path / "split" / "train" / "9" / "99999.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier split")
    assert cli("split", "--abid", str(tmp_path / "abid"), "--out", str(tmp_path / "split")).returncode == 0
    assert not stale.exists()

    by_list = cli("fetch", "--source", str(source), "--file-list", "--dest", str(tmp_path / "abid2"))
    assert by_list.returncode == 0 and json.loads(by_list.stdout)["missing"] == 0


def test_too_many_missing_keys_fail_with_a_message(tmp_path):
    source = write_abid_dir(tmp_path / "source", {"00001": 1})
    result = cli("fetch", "--source", str(source), "--keys", "00001:00010", "--dest", str(tmp_path / "abid"))
    assert result.returncode == 1
    assert "8 of 9 keys missing or invalid" in result.stderr


def test_bad_key_range_is_refused(tmp_path):
    result = cli("fetch", "--keys", "10:5", "--dest", str(tmp_path))
    assert result.returncode == 2 and "START:STOP" in result.stderr
