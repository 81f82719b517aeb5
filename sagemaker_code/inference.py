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
The request checks are api_contract.py's, with its table (`api_contract.json`), the same module the
API's Lambda function checks requests with: a fault has the same code whichever layer finds it.
The worker never dies on input.

With `BIN_COUNTER_REFUSALS=answer` in the model's environment (the batch-counting DAG sets it on its
transform jobs), a refused input is answered instead: status 200 and
`{"error": code, "message": ..., "status": <the status it would have had>, "model_version": ...}`.
Batch Transform fails the whole job on one non-200 record, and a nightly audit of thousands of photos
must list a bad photo with its reason, not lose the other counts. Endpoints keep the default, `error`.

The network runs as serving_graph.py builds it (the frozen TorchScript graph `model.pt`, all of a
request's views in one batch, the worker's share of the cores), warmed up in `model_fn` so that an
endpoint's first client waits no longer than its tenth. The model card decides the architecture
(`backbone`, and `head`: "linear" unless it says "ordinal"; used only for archives without `model.pt`)
and how a count is read from the model: `test_time_augmentation` ("none", or
"hflip" / "flips": class probabilities averaged over mirrored copies) and `decoding` ("argmax", the
most likely count; "median", the smallest count whose cumulative probability reaches one half,
which never lands between two likely neighbours; or "expected", the expected count rounded).
Cards without them mean "none" and "argmax".
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

import api_contract
import preprocessing
import serving_graph

try:  # present in SageMaker's inference containers: the toolkit answers its status_code and phrase
    from sagemaker_inference.errors import BaseInferenceToolkitError
except ImportError:  # pragma: no cover - exercised only outside the container

    class _ToolkitErrorStandIn(Exception):
        """sagemaker_inference.errors.BaseInferenceToolkitError's contract, where the toolkit is absent."""

        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)

    BaseInferenceToolkitError = _ToolkitErrorStandIn


ACCEPT_TYPES = tuple(api_contract.CONTRACT["content_types"]["accept"])
JSON_CONTENT_TYPE = "application/json"


class RequestError(BaseInferenceToolkitError):
    """A request the model will not answer: a code of the table, with its status and message."""

    def __init__(self, code: str, message: str | None = None, **fields) -> None:
        error = api_contract.ApiError(code, message, **fields)
        self.code, self.detail = code, error.message
        super().__init__(
            error.status, json.dumps({"error": code, "message": error.message}, separators=(",", ":")), code
        )

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.detail}"

    def answer(self) -> dict:
        """The refusal as an answer's body (BIN_COUNTER_REFUSALS=answer)."""
        return {"error": self.code, "message": self.detail, "status": self.status_code}


REFUSALS_SETTING = "BIN_COUNTER_REFUSALS"
REFUSAL_MODES = ("error", "answer")


def refusals_answered() -> bool:
    """Whether refused input is answered with 200 and the refusal (batch jobs) rather than raised."""
    mode = os.environ.get(REFUSALS_SETTING) or "error"
    if mode not in REFUSAL_MODES:
        raise ValueError(f"{REFUSALS_SETTING}={mode!r}: choose one of {REFUSAL_MODES}")
    return mode == "answer"


def refuse(error: RequestError) -> dict:
    """Raise `error` (endpoints), or return the answer that says it (batch jobs)."""
    if not refusals_answered():
        raise error
    return error.answer()


def model_fn(model_dir: str) -> dict:
    """The model as a worker serves it: this process's share of the cores, then `load_model`."""
    threads = serving_graph.set_threads()
    return {**load_model(model_dir), "threads": threads}


def load_model(model_dir: str) -> dict:
    """The serving graph with its model card, warmed up; the threads left as they are (evaluate.py
    and train.py score models with their own)."""
    card = json.loads((Path(model_dir) / "model_card.json").read_text())
    model = {
        "model": serving_graph.load(Path(model_dir), card),
        "card": card,
        "image_size": card["preprocessing"]["resize"][0],
    }
    warm_up(model)
    return model


# TorchScript's profiling executor optimises a graph on its second run; the third runs as every later one.
WARM_UP_RUNS = 3


def warm_up(model: dict) -> None:
    """Decode a generated photo and run it through the graph, so that no client pays for the graph's
    optimisation or Pillow's first JPEG decode. The handlers themselves are not called: a model whose
    predict_fn fails on some requests still loads, as before, and answers those with its error."""
    from PIL import Image

    size = model["image_size"]
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 120, 110)).save(buffer, "JPEG")
    images = preprocessing.normalize(preprocessing.decode(buffer.getvalue(), size).unsqueeze(0).float() / 255)
    for _ in range(WARM_UP_RUNS):
        class_probabilities(model["model"], images, model["card"].get("test_time_augmentation", "none"))


def input_fn(request_body, request_content_type: str) -> dict:
    """Request bytes to checked images; `single` says whether the answer is one object or a list."""
    if isinstance(request_body, str):
        request_body = request_body.encode()
    try:
        images, single, _ = api_contract.parse_body(bytes(request_body or b""), request_content_type)
    except api_contract.ApiError as exc:
        return {"refused": refuse(RequestError(exc.code, exc.message))}
    # Decoding needs the model's input size, so it happens in predict_fn (same error contract).
    return {"images": images, "single": single, "max_pixels": api_contract.LIMITS["max_pixels"]}


# name -> the mirror images averaged (h: left-right, v: top-bottom); mirroring never changes a count
TTA_VIEWS = {"none": ("",), "hflip": ("", "h"), "flips": ("", "h", "v", "hv")}
DECODINGS = ("argmax", "median", "expected")


def class_probabilities(
    net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, tta: str = "none"
) -> torch.Tensor:
    """Softmax over count classes of a normalised batch, averaged over the TTA views: every view of
    every image in one forward pass (one call into the graph instead of one per view; a batch of n
    images is n x views images in the network at once)."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {sorted(TTA_VIEWS)}")
    views = TTA_VIEWS[tta]
    batch = torch.cat([mirrored(images, view) for view in views])
    with torch.inference_mode():
        probabilities = torch.softmax(net(batch).float(), dim=1)
    return probabilities.view(len(views), images.shape[0], -1).mean(0)


def mirrored(images: torch.Tensor, view: str) -> torch.Tensor:
    """The NCHW batch mirrored as `view` says: "h" left-right, "v" top-bottom."""
    images = images.flip(3) if "h" in view else images
    return images.flip(2) if "v" in view else images


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
    version = model["card"]["model_version"]
    if "refused" in input_object:
        return {**input_object["refused"], "model_version": version}
    size = model["image_size"]
    batch = []
    for index, data in enumerate(input_object["images"]):
        try:
            batch.append(preprocessing.decode(data, size, input_object["max_pixels"]))
        except preprocessing.ImageRejected as exc:
            # preprocessing's reasons are the table's codes; input_fn has seen a JPEG or PNG signature
            # and end, so data Pillow cannot identify is a damaged image here.
            code = exc.reason if exc.reason in api_contract.ERRORS and exc.reason != "not_an_image" else "corrupt_image"
            return {
                **refuse(
                    RequestError(
                        code, index=index, limit=input_object["max_pixels"], format=exc.image_format or "another format"
                    )
                ),
                "model_version": version,
            }
    images = preprocessing.normalize(torch.stack(batch).float() / 255)
    card = model["card"]
    probabilities = class_probabilities(model["model"], images, card.get("test_time_augmentation", "none"))
    chosen = decode(probabilities, card.get("decoding", "argmax"))
    classes = torch.tensor(card["classes"], dtype=torch.float32)
    predictions = []
    for probs, index in zip(probabilities, chosen.tolist(), strict=True):
        predictions.append(
            {
                "count": int(card["classes"][index]),
                "probabilities": [round(p, 5) for p in probs.tolist()],
                "confidence": round(probs[index].item(), 5),
                "expected_count": round(float((probs * classes).sum()), 4),
            }
        )
    if input_object["single"]:
        return {**predictions[0], "model_version": version}
    return {"predictions": predictions, "model_version": version}


def output_fn(prediction: dict, accept: str | None) -> tuple[str, str]:
    if api_contract.base_content_type(accept) not in ACCEPT_TYPES:
        prediction = {
            **refuse(RequestError("unsupported_accept", accept=accept)),
            "model_version": prediction.get("model_version"),
        }
    return json.dumps(prediction), JSON_CONTENT_TYPE
