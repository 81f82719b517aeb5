"""Fixtures shared by both suites: small generated bin images and the optional real mirror.

Only Pillow and the standard library here: this file is loaded in both environments.
"""

from __future__ import annotations

import base64
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
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def png_padded_to(size: int, count: int = 1, seed: int = 0) -> bytes:
    """A small generated bin photo as a PNG of exactly `size` bytes: a private ancillary chunk before
    IEND carries the padding, so the file stays intact and decodes as the small image it is."""
    data = make_bin_image(count, seed, fmt="PNG")
    pad = size - len(data) - 12  # a chunk's length, type and CRC
    if pad < 0:
        raise ValueError(f"a PNG of {size} bytes is smaller than the image ({len(data)} bytes)")
    body = b"paDd" + bytes(pad)
    chunk = struct.pack(">I", pad) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return data[:-12] + chunk + data[-12:]


def json_of_images(count: int, size: int) -> bytes:
    """Compact {"images": [...]} of `count` generated PNGs, padded with trailing spaces to `size` bytes."""
    per_image = (size - 13 - 3 * count) // count // 4 * 3  # raw bytes whose base64 fills the share
    images = [base64.b64encode(png_padded_to(per_image, i % 3, i)).decode() for i in range(count)]
    document = json.dumps({"images": images}, separators=(",", ":")).encode()
    assert size - 64 <= len(document) <= size
    return document + b" " * (size - len(document))


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def truncated_image(fmt: str = "JPEG") -> bytes:
    data = make_bin_image(3, 7, (256, 256), fmt)
    return data[: len(data) // 2]


def destroyed_jpeg() -> bytes:
    """A JPEG's signature and end marker around bytes no decoder can read."""
    data = make_bin_image(3, 7, (64, 64))
    return data[:4] + bytes(range(256)) * 4 + data[-2:]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json(document) -> bytes:
    return json.dumps(document).encode()


_JPEG = make_bin_image(1, 1)
# Faults of a request body (what the API function and the model both receive: bytes and a content
# type), each with the one code of sagemaker_code/api_contract.json that every layer answers it with.
REQUEST_FAULTS = [
    ("empty body", b"", "image/jpeg", "empty_body"),
    ("empty JSON body", b"", "application/json", "empty_body"),
    ("wrong content type", _JPEG, "text/plain", "unsupported_content_type"),
    ("no content type", _JPEG, None, "unsupported_content_type"),
    ("octet-stream", _JPEG, "application/octet-stream", "unsupported_content_type"),
    ("not JSON", b'{"image": ', "application/json", "malformed_json"),
    ("JSON without an image", b'{"picture": "abc"}', "application/json", "malformed_request"),
    (
        "both image and images",
        _json({"image": _b64(_JPEG), "images": [_b64(_JPEG)]}),
        "application/json",
        "malformed_request",
    ),
    ("a bare list", _json([_b64(_JPEG)]), "application/json", "malformed_request"),
    ("an empty list", b'{"images": []}', "application/json", "malformed_request"),
    ("an image that is no string", b'{"image": 12}', "application/json", "malformed_request"),
    ("not base64", b'{"image": "%%%not base64%%%"}', "application/json", "malformed_base64"),
    ("too many images", _json({"images": [_b64(_JPEG)] * 9}), "application/json", "too_many_images"),
    ("an empty image", b'{"images": [""]}', "application/json", "empty_image"),
    ("not an image", b"hello, this is not an image", "image/jpeg", "not_an_image"),
    ("base64 of text", _json({"image": _b64(b"plain text")}), "application/json", "not_an_image"),
    ("GIF", gif_bytes(), "image/png", "unsupported_format"),
    ("WebP", b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(24), "image/jpeg", "unsupported_format"),
    ("truncated JPEG", truncated_image("JPEG"), "image/jpeg", "truncated_image"),
    ("truncated PNG", truncated_image("PNG"), "image/png", "truncated_image"),
    ("image above 4 MiB", _JPEG[:-2] + bytes(4 * 1024 * 1024) + b"\xff\xd9", "image/jpeg", "too_large"),
    ("request above 6 MiB", _json({"image": "A" * (6 * 1024 * 1024)}), "application/json", "too_large"),
    # Only the model, which decodes, can find these two.
    ("corrupt JPEG", destroyed_jpeg(), "image/jpeg", "corrupt_image"),
    ("decompression bomb", png_claiming_size(50_000, 50_000), "image/png", "too_many_pixels"),
]


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
    return {
        name: write_split_dir(root / name, per_count, seed) for seed, name in enumerate(("train", "validation", "test"))
    }


@pytest.fixture
def real_abid() -> Path:
    if not (SHARED_ABID / "bin-images").is_dir():
        pytest.skip(f"the local ABID mirror is not at {SHARED_ABID}; real-image tests need it")
    return SHARED_ABID
