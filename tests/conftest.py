"""Fixtures shared by both suites: small generated bin images and the optional real mirror.

Only Pillow and the standard library here: this file is loaded in both environments.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHARED_ABID = REPO.parent / "shared" / "abid"


def make_bin_image(count: int, seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A dark 'bin' with `count` bright boxes in it: a stand-in for a bin photo."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, (40 + rng.randint(0, 30), 35, 30))
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        x, y = rng.randint(0, size[0] - 12), rng.randint(0, size[1] - 12)
        draw.rectangle([x, y, x + 10, y + 10], fill=(rng.randint(150, 255), rng.randint(100, 255), 90))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels: a decompression bomb's shape."""
    data = bytearray(make_bin_image(1, 0, (16, 16), "PNG"))
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def write_split_dir(root: Path, per_count: dict[int, int], seed: int = 0) -> Path:
    """`<root>/<count>/<key>.jpg`, `per_count[c]` images of count c."""
    n = 0
    for count, how_many in per_count.items():
        (root / str(count)).mkdir(parents=True, exist_ok=True)
        for _ in range(how_many):
            n += 1
            (root / str(count) / f"{seed:02d}{n:03d}.jpg").write_bytes(make_bin_image(count, seed * 1000 + n))
    return root


def write_abid_dir(root: Path, counts: dict[str, int]) -> Path:
    """An ABID-layout folder: key -> EXPECTED_QUANTITY."""
    (root / "bin-images").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for i, (key, count) in enumerate(counts.items()):
        (root / "bin-images" / f"{key}.jpg").write_bytes(make_bin_image(count, i))
        (root / "metadata" / f"{key}.json").write_text(json.dumps({"EXPECTED_QUANTITY": count, "BIN_FCSKU_DATA": {}}))
    return root


@pytest.fixture(scope="session")
def split_channels(tmp_path_factory) -> dict[str, Path]:
    """train/validation/test channels of generated images, counts 0..3 plus some 7s."""
    root = tmp_path_factory.mktemp("channels")
    per_count = {0: 5, 1: 5, 2: 5, 3: 5, 7: 3}
    return {name: write_split_dir(root / name, per_count, seed) for seed, name in
            enumerate(("train", "validation", "test"))}


@pytest.fixture
def real_abid() -> Path:
    if not (SHARED_ABID / "bin-images").is_dir():
        pytest.skip(f"the local ABID mirror is not at {SHARED_ABID}; real-image tests need it")
    return SHARED_ABID
