"""Serving handlers for SageMaker's PyTorch inference container (`code/inference.py`).

Requests:
  image/jpeg, image/png, application/x-image   one image, raw bytes
  application/json   {"image": "<base64>"} or {"images": ["<base64>", ...]} (other keys are ignored)
Response (application/json):
  one image:  {"count": 3, "probabilities": [...], "confidence": 0.61, "expected_count": 2.9,
               "model_version": "..."}
  a list:     {"predictions": [{...}, ...], "model_version": "..."}

Bad input raises a `RequestError`, the inference toolkit's `BaseInferenceToolkitError` (or a stand-in
with its contract where the toolkit is absent): the toolkit answers it with `status_code`, `phrase` as
the reason line and `message + "\n" + traceback` as the body, and SageMaker Runtime hands status and
body to the caller as a ModelError. So `message`, the body's first line, is the compact JSON
`{"error": code, "message": ...}` that the API's Lambda function reads, and `phrase` is the code.
Codes, statuses, messages and limits are `api_contract.json`'s, the table the function checks
requests with too: a fault has the same code whichever layer finds it. The worker never dies on input.

The model card decides the architecture (`backbone`, and `head`: "linear" unless it says "ordinal")
and how a count is read from the model: `test_time_augmentation` ("none", or
"hflip" / "flips": class probabilities averaged over mirrored copies) and `decoding` ("argmax", the
most likely count; "median", the smallest count whose cumulative probability reaches one half,
which never lands between two likely neighbours; or "expected", the expected count rounded).
Cards without them mean "none" and "argmax".
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from pathlib import Path

import torch

import backbones
import preprocessing

try:  # present in SageMaker's inference containers: the toolkit answers its status_code and phrase
    from sagemaker_inference.errors import BaseInferenceToolkitError
except ImportError:  # pragma: no cover - exercised only outside the container

    class BaseInferenceToolkitError(Exception):
        """sagemaker_inference.errors.BaseInferenceToolkitError's contract, where the toolkit is absent."""

        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)


CONTRACT = json.loads((Path(__file__).resolve().parent / "api_contract.json").read_text())
ERRORS: dict[str, dict] = CONTRACT["errors"]
LIMITS: dict[str, int] = CONTRACT["limits"]
FORMATS: list[dict] = CONTRACT["formats"]
IMAGE_CONTENT_TYPES = tuple(CONTRACT["content_types"]["image"])
JSON_CONTENT_TYPES = tuple(CONTRACT["content_types"]["json"])
ACCEPT_TYPES = tuple(CONTRACT["content_types"]["accept"])
JSON_CONTENT_TYPE = "application/json"


class RequestError(BaseInferenceToolkitError):
    """A request the model will not answer: a code of the table, with its status and message."""

    def __init__(self, code: str, **fields) -> None:
        entry = ERRORS[code]
        detail = entry["message"]
        if fields and "detail" in entry:
            with contextlib.suppress(KeyError, IndexError, ValueError):  # fields that do not fit: the message
                detail = entry["detail"].format(**fields)
        self.code, self.detail = code, detail
        super().__init__(entry["status"], json.dumps({"error": code, "message": detail}, separators=(",", ":")), code)

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.detail}"


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


def _matches(data: bytes, signature: str) -> bool:
    pattern = [None if signature[i:i + 2] == ".." else int(signature[i:i + 2], 16) for i in range(0, len(signature), 2)]
    return len(data) >= len(pattern) and all(b is None or data[i] == b for i, b in enumerate(pattern))


def _check_image(data: bytes, index: int) -> None:
    """The table's checks that need no decoding: size, signature, an intact end."""
    if not data:
        raise RequestError("empty_image", index=index)
    if len(data) > LIMITS["max_image_bytes"]:
        raise RequestError("too_large", what=f"image {index}", size=len(data), limit=LIMITS["max_image_bytes"])
    image_format = next((f for f in FORMATS if any(_matches(data, s) for s in f["signatures"])), None)
    if image_format is None:
        raise RequestError("not_an_image", index=index)
    if not image_format.get("supported"):
        raise RequestError("unsupported_format", index=index, format=image_format["name"])
    if bytes.fromhex(image_format["end"]) not in data.rstrip(b"\x00")[-image_format["end_within"]:]:
        raise RequestError("truncated_image", index=index, format=image_format["name"])


def _decode_base64(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError("malformed_request", problem=f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("malformed_base64", what=what) from exc


def _images_from_json(body: bytes) -> tuple[list[bytes], bool]:
    """The images of a JSON request, and whether it asked about one image ({"image": ...})."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError("malformed_json", reason=str(exc)) from exc
    if not isinstance(payload, dict) or ("image" in payload) == ("images" in payload):
        raise RequestError("malformed_request", problem='the JSON is not an object with one of "image" and "images"')
    single = "image" in payload
    items = [payload["image"]] if single else payload["images"]
    if not isinstance(items, list) or not items:
        raise RequestError("malformed_request", problem='"images" must be a non-empty list')
    if len(items) > LIMITS["max_images"]:
        raise RequestError("too_many_images", count=len(items), limit=LIMITS["max_images"])
    return [_decode_base64(item, f"image {i}") for i, item in enumerate(items)], single


def input_fn(request_body, request_content_type: str) -> dict:
    """Request bytes to checked images; `single` says whether the answer is one object or a list."""
    if isinstance(request_body, str):
        request_body = request_body.encode()
    body = bytes(request_body or b"")
    if not body:
        raise RequestError("empty_body")
    if len(body) > LIMITS["max_request_bytes"]:
        raise RequestError("too_large", what="the request", size=len(body), limit=LIMITS["max_request_bytes"])
    content_type = _base_content_type(request_content_type)
    if content_type in IMAGE_CONTENT_TYPES:
        raw_images, single = [body], True
    elif content_type in JSON_CONTENT_TYPES:
        raw_images, single = _images_from_json(body)
    else:
        raise RequestError("unsupported_content_type", content_type=content_type)
    for index, data in enumerate(raw_images):
        _check_image(data, index)
    # Decoding needs the model's input size, so it happens in predict_fn (same error contract).
    return {"images": raw_images, "single": single, "max_pixels": LIMITS["max_pixels"]}


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
            # preprocessing's reasons are the table's codes; input_fn has seen a JPEG or PNG signature
            # and end, so data Pillow cannot identify is a damaged image here.
            code = exc.reason if exc.reason in ERRORS and exc.reason != "not_an_image" else "corrupt_image"
            raise RequestError(code, index=index, limit=input_object["max_pixels"],
                               format=exc.image_format or "another format") from exc
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
    if _base_content_type(accept) not in ACCEPT_TYPES:
        raise RequestError("unsupported_accept", accept=accept)
    return json.dumps(prediction), JSON_CONTENT_TYPE
