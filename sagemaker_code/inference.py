"""Serving handlers for SageMaker's PyTorch inference container (`code/inference.py`).

Requests:
  image/jpeg, image/png, application/x-image   one image, raw bytes
  application/json   {"image": "<base64>"}, {"images": ["<base64>", ...]} or ["<base64>", ...]
Response (application/json):
  one image:  {"count": 3, "probabilities": [...], "confidence": 0.61, "expected_count": 2.9,
               "model_version": "..."}
  a list:     {"predictions": [{...}, ...], "model_version": "..."}

Bad input raises an error carrying an HTTP status (the inference toolkit sends it to the caller
as is; SageMaker Runtime returns it as a ModelError): 400 malformed, 413 too large,
415 unsupported content type, 406 unsupported accept type. The worker never dies on input.

The model card decides the architecture (`backbone`, and `head`: "linear" unless it says "ordinal")
and how a count is read from the model: `test_time_augmentation` ("none", or
"hflip" / "flips": class probabilities averaged over mirrored copies) and `decoding` ("argmax", the
most likely count; "median", the smallest count whose cumulative probability reaches one half,
which never lands between two likely neighbours; or "expected", the expected count rounded).
Cards without them mean "none" and "argmax".

Limits come from the environment: BIN_COUNTER_MAX_IMAGE_BYTES (default 10 MB),
BIN_COUNTER_MAX_PIXELS (default 40 million), BIN_COUNTER_MAX_BATCH (default 16).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

import torch

import backbones
import preprocessing

try:  # present in SageMaker's inference containers: its status code reaches the client
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:  # pragma: no cover - exercised only outside the container

    class _ToolkitError(Exception):
        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            super().__init__(status_code, message, phrase)
            self.status_code = status_code
            self.message = message
            self.phrase = phrase


IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_CONTENT_TYPE = "application/json"


class RequestError(_ToolkitError):
    """A request the model will not answer; `status_code` and a JSON body say why."""

    def __init__(self, status_code: int, reason: str, message: str) -> None:
        body = json.dumps({"error": reason, "message": message})
        super().__init__(status_code, message, body)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status_code} {self.reason}: {self.message}"


def _limit(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def model_fn(model_dir: str) -> dict:
    """Load model.pth with its model card; the card decides architecture and preprocessing."""
    card = json.loads((Path(model_dir) / "model_card.json").read_text())
    model = backbones.build_model(card["backbone"], len(card["classes"]), weights="none",
                                  head=card.get("head", "linear"))
    state = torch.load(Path(model_dir) / "model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return {"model": model, "card": card, "image_size": card["preprocessing"]["resize"][0]}


def _base_content_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _decode_base64(value, index: int) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, "malformed_json", f"image {index} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "malformed_base64", f"image {index} is not valid base64: {exc}") from exc


def _images_from_json(body: bytes) -> tuple[list[bytes], bool]:
    """The images of a JSON request, and whether it asked about one image ({"image": ...})."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "malformed_json", f"the body is not valid JSON: {exc}") from exc
    if isinstance(payload, dict) and "image" in payload:
        items = [payload["image"]]
    elif isinstance(payload, dict) and "images" in payload:
        items = payload["images"]
    elif isinstance(payload, list):
        items = payload
    else:
        raise RequestError(400, "malformed_json", 'expected {"image": b64}, {"images": [b64, ...]} or [b64, ...]')
    if not isinstance(items, list) or not items:
        raise RequestError(400, "malformed_json", "no images in the request")
    max_batch = _limit("BIN_COUNTER_MAX_BATCH", 16)
    if len(items) > max_batch:
        raise RequestError(413, "too_many_images", f"{len(items)} images in one request; the limit is {max_batch}")
    single = isinstance(payload, dict) and "image" in payload
    return [_decode_base64(item, i) for i, item in enumerate(items)], single


def input_fn(request_body, request_content_type: str) -> dict:
    """Request bytes to a uint8 batch; `single` says whether the answer is one object or a list."""
    if isinstance(request_body, str):
        request_body = request_body.encode()
    body = bytes(request_body or b"")
    max_bytes = _limit("BIN_COUNTER_MAX_IMAGE_BYTES", 10 * 1024 * 1024)
    content_type = _base_content_type(request_content_type)
    if content_type in IMAGE_CONTENT_TYPES:
        raw_images, single = [body], True
    elif content_type == JSON_CONTENT_TYPE:
        if len(body) > max_bytes * 2:  # base64 of a batch; each image is checked below
            raise RequestError(413, "too_large", f"the request is {len(body)} bytes")
        raw_images, single = _images_from_json(body)
    else:
        raise RequestError(
            415, "unsupported_content_type",
            f"content type {request_content_type!r} is not supported; send one of "
            f"{', '.join((*IMAGE_CONTENT_TYPES, JSON_CONTENT_TYPE))}",
        )
    for index, data in enumerate(raw_images):
        if len(data) > max_bytes:
            raise RequestError(413, "too_large", f"image {index} is {len(data)} bytes; the limit is {max_bytes}")
    # Decoding needs the model's input size, so it happens in predict_fn (same error contract).
    max_pixels = _limit("BIN_COUNTER_MAX_PIXELS", preprocessing.DEFAULT_MAX_PIXELS)
    return {"images": raw_images, "single": single, "max_pixels": max_pixels}


# name -> the mirror images averaged (h: left-right, v: top-bottom); mirroring never changes a count
TTA_VIEWS = {"none": ("",), "hflip": ("", "h"), "flips": ("", "h", "v", "hv")}
DECODINGS = ("argmax", "median", "expected")


def class_probabilities(net: torch.nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Softmax over count classes of a normalised batch, averaged over the TTA views."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {sorted(TTA_VIEWS)}")
    total = None
    with torch.inference_mode():
        for view in TTA_VIEWS[tta]:
            batch = images.flip(3) if "h" in view else images
            batch = batch.flip(2) if "v" in view else batch
            probabilities = torch.softmax(net(batch).float(), dim=1)
            total = probabilities if total is None else total + probabilities
    return total / len(TTA_VIEWS[tta])


def decode(probabilities: torch.Tensor, decoding: str = "argmax") -> torch.Tensor:
    """Class index per row of a (batch, classes) probability matrix."""
    if decoding == "argmax":
        return probabilities.argmax(1)
    if decoding == "median":
        return (probabilities.cumsum(1) < 0.5).sum(1).clamp(max=probabilities.shape[1] - 1)
    if decoding == "expected":
        # Half-way values go up: torch.round would send 2.5 to 2 and 3.5 to 4.
        classes = torch.arange(probabilities.shape[1], dtype=probabilities.dtype, device=probabilities.device)
        return torch.floor((probabilities * classes).sum(1) + 0.5).long().clamp(0, probabilities.shape[1] - 1)
    raise ValueError(f"unknown decoding {decoding!r}; choose one of {DECODINGS}")


def predict_fn(input_object: dict, model: dict) -> dict:
    size = model["image_size"]
    batch = []
    for index, data in enumerate(input_object["images"]):
        try:
            batch.append(preprocessing.decode(data, size, input_object["max_pixels"]))
        except preprocessing.ImageRejected as exc:
            status = {"too_many_pixels": 413, "unsupported_format": 415}.get(exc.reason, 400)
            raise RequestError(status, exc.reason, f"image {index}: {exc}") from exc
    images = preprocessing.normalize(torch.stack(batch).float() / 255)
    card = model["card"]
    probabilities = class_probabilities(model["model"], images, card.get("test_time_augmentation", "none"))
    chosen = decode(probabilities, card.get("decoding", "argmax"))
    classes = torch.tensor(card["classes"], dtype=torch.float32)
    predictions = []
    for probs, index in zip(probabilities, chosen.tolist(), strict=True):
        predictions.append({
            "count": int(card["classes"][index]),
            "probabilities": [round(p, 5) for p in probs.tolist()],
            "confidence": round(probs[index].item(), 5),
            "expected_count": round(float((probs * classes).sum()), 4),
        })
    version = model["card"]["model_version"]
    if input_object["single"]:
        return {**predictions[0], "model_version": version}
    return {"predictions": predictions, "model_version": version}


def output_fn(prediction: dict, accept: str | None) -> tuple[str, str]:
    accept_type = _base_content_type(accept)
    if accept_type not in ("", "*/*", JSON_CONTENT_TYPE, "application/*"):
        raise RequestError(406, "unsupported_accept", f"accept type {accept!r} is not supported; use application/json")
    return json.dumps(prediction), JSON_CONTENT_TYPE
