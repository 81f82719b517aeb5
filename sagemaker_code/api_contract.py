"""The public API's error vocabulary and its request checks, shared by the two layers that check a
request: the Lambda function (lambda/handler.py, before it calls the model) and the model's serving
code (inference.py), as preprocessing.py is shared by training and serving. The function's zip and
the model's code/ both carry this module with its table, `api_contract.json` (the codes, their
statuses and public messages, the limits, the image signatures), so a fault gets the same code and
status whichever layer finds it.

Standard library only: it runs in the Lambda runtime (no torch) and in the PyTorch containers.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

CONTRACT_FILE = "api_contract.json"


def contract_path() -> Path:
    """The table, beside this module wherever it ships (the function's zip, the model's code/)."""
    return Path(__file__).resolve().parent / CONTRACT_FILE


CONTRACT = json.loads(contract_path().read_text())
ERRORS: dict[str, dict] = CONTRACT["errors"]
LIMITS: dict[str, int] = CONTRACT["limits"]
FORMATS: list[dict] = CONTRACT["formats"]
IMAGE_TYPES: tuple[str, ...] = tuple(CONTRACT["content_types"]["image"])
JSON_TYPES: tuple[str, ...] = tuple(CONTRACT["content_types"]["json"])


def describe(code: str, fields: dict) -> str:
    """The code's detail with `fields` filled in, or its public message when they do not fit."""
    entry = ERRORS[code]
    if fields and "detail" in entry:
        try:
            return entry["detail"].format(**fields)
        except (KeyError, IndexError, ValueError):
            pass
    return entry["message"]


class ApiError(Exception):
    """A request the API answers with an error: `code` from the table, its `status`, a `message`."""

    def __init__(self, code: str, message: str | None = None, **fields: Any) -> None:
        self.code, self.status = code, ERRORS[code]["status"]
        self.message = message or describe(code, fields)
        super().__init__(self.message)


def _matches(data: bytes, signature: str) -> bool:
    pattern = [
        None if signature[i : i + 2] == ".." else int(signature[i : i + 2], 16) for i in range(0, len(signature), 2)
    ]
    return len(data) >= len(pattern) and all(b is None or data[i] == b for i, b in enumerate(pattern))


def identify(data: bytes) -> dict | None:
    """The table's format whose signature the data starts with, or None."""
    return next((f for f in FORMATS if any(_matches(data, s) for s in f["signatures"])), None)


def intact(data: bytes, image_format: dict) -> bool:
    """Whether the file ends as an intact one does (a truncated upload loses its end marker)."""
    return bytes.fromhex(image_format["end"]) in data.rstrip(b"\x00")[-image_format["end_within"] :]


def check_image(data: bytes, index: int) -> str:
    """The image's content type, after the checks that need no image library: size, signature, end."""
    if not data:
        raise ApiError("empty_image", index=index)
    if len(data) > LIMITS["max_image_bytes"]:
        raise ApiError("too_large", what=f"image {index}", size=len(data), limit=LIMITS["max_image_bytes"])
    image_format = identify(data)
    if image_format is None:
        raise ApiError("not_an_image", index=index)
    if not image_format.get("supported"):
        raise ApiError("unsupported_format", index=index, format=image_format["name"])
    if not intact(data, image_format):
        raise ApiError("truncated_image", index=index, format=image_format["name"])
    return image_format["content_type"]


def decode_base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ApiError("malformed_request", problem=f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError("malformed_base64", what=what) from exc


def base_content_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def limits_for(endpoint_kind: str | None) -> dict[str, int]:
    """The limits for requests to an endpoint of `endpoint_kind` ("instances", "serverless"; None: instances)."""
    by_kind = CONTRACT.get("limits_by_endpoint", {}).get(endpoint_kind or "", {})
    return {**LIMITS, **{k: v for k, v in by_kind.items() if not k.startswith("/")}}


def parse_body(
    raw: bytes, content_type: str | None, limits: dict[str, int] | None = None
) -> tuple[list[bytes], bool, dict | None]:
    """(images, single, the JSON document if any) from a request body, every image checked, within
    `limits` (the endpoint kind's, limits_for; by default the table's)."""
    limits = limits or LIMITS
    if not raw:
        raise ApiError("empty_body")
    if len(raw) > limits["max_request_bytes"]:
        raise ApiError("too_large", what="the request", size=len(raw), limit=limits["max_request_bytes"])
    kind = base_content_type(content_type)
    document = None
    if kind in IMAGE_TYPES:
        images, single = [raw], True
    elif kind in JSON_TYPES:
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError("malformed_json", reason=str(exc)) from exc
        if not isinstance(document, dict) or ("image" in document) == ("images" in document):
            raise ApiError("malformed_request", problem='the JSON is not an object with one of "image" and "images"')
        single = "image" in document
        encoded = [document["image"]] if single else document["images"]
        if not isinstance(encoded, list) or not encoded:
            raise ApiError("malformed_request", problem='"images" must be a non-empty list')
        if len(encoded) > LIMITS["max_images"]:
            raise ApiError("too_many_images", count=len(encoded), limit=LIMITS["max_images"])
        images = [decode_base64(text, f"image {i}") for i, text in enumerate(encoded)]
    else:
        raise ApiError("unsupported_content_type", content_type=kind)
    for index, data in enumerate(images):
        check_image(data, index)
    return images, single, document
