"""One fault, one code: the API function's own checks (lambda/api_contract.py, standard library only, so
it runs here beside the model's code) and the model's (inference.py) answer every fault of a request
with the same code, status and message of sagemaker_code/api_contract.json; a fault only the model
finds reaches the client, through the inference toolkit's error answer and the function, as the
model's code and message and nothing else."""

from __future__ import annotations

import sys
import threading
import traceback
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from standin.sagemaker import model_worker
from tests.conftest import REPO, REQUEST_FAULTS, make_bin_image, truncated_image

import api_contract
import inference

sys.path.insert(0, str(REPO / "lambda"))
try:
    import model_answer  # the function's reading of the model's answer: standard library only
finally:
    sys.path.remove(str(REPO / "lambda"))

# What predict_fn needs of a model; no weights, so no training: every fault is found before the network.
MODEL = {"model": lambda batch: torch.zeros(batch.shape[0], 4), "image_size": 32,
         "card": {"classes": [0, 1, 2, 3], "model_version": "contract-test"}}


def model_error(body: bytes, content_type: str | None) -> inference.RequestError:
    with pytest.raises(inference.RequestError) as caught:
        inference.output_fn(inference.predict_fn(inference.input_fn(body, content_type), MODEL), "application/json")
    return caught.value


def api_error(body: bytes, content_type: str | None) -> api_contract.ApiError | None:
    try:
        api_contract.parse_body(body, content_type)
    except api_contract.ApiError as exc:
        return exc
    return None


def toolkit_answer(exc: Exception) -> tuple[int, str, str]:
    """(status, reason phrase, body) of the inference toolkit for an error a handler raised: its own
    Transformer.handle_error where sagemaker-inference is installed, else the stand-in's imitation."""
    try:
        raise exc
    except Exception:
        trace = traceback.format_exc()
    try:
        from sagemaker_inference.transformer import Transformer
    except ImportError:
        status, phrase, body = model_worker.error_answer(exc, trace)
        return status, phrase, body.decode()
    seen = {}
    context = SimpleNamespace(set_response_status=lambda code, phrase: seen.update(code=code, phrase=phrase))
    body = Transformer.handle_error(context, exc, trace)[0]
    return seen["code"], seen["phrase"], body


def test_the_two_layers_read_one_table():
    assert inference.api_contract is api_contract
    assert api_contract.contract_path() == (REPO / "sagemaker_code" / "api_contract.json")


@pytest.mark.parametrize(("name", "body", "content_type", "code"), REQUEST_FAULTS,
                         ids=[case[0] for case in REQUEST_FAULTS])
def test_one_fault_one_code_at_every_layer(name, body, content_type, code):
    entry = api_contract.ERRORS[code]
    from_model = model_error(body, content_type)
    assert (from_model.status_code, from_model.code) == (entry["status"], code)
    from_api = api_error(body, content_type)
    if "api" in entry["checked_by"]:
        assert from_api is not None, f"{name}: the function let it through"
        assert (from_api.status, from_api.code, from_api.message) == (entry["status"], code, from_model.detail)
    else:
        assert from_api is None, f"{name}: the function refused what only the model can check"
    # Found by the model: the toolkit answers status, phrase and message + traceback; the function
    # passes on the model's code, the table's status and the model's one-line message, never the rest.
    status, phrase, answer = toolkit_answer(from_model)
    assert (status, phrase) == (entry["status"], code) and "Traceback" in answer
    seen = model_answer.model_refusal(status, answer)
    assert (seen.status, seen.code, seen.message) == (entry["status"], code, from_model.detail)
    assert "Traceback" not in seen.message and "\n" not in seen.message


def test_a_good_request_passes_both_layers():
    for body, content_type in ((make_bin_image(2, 3), "image/jpeg"), (make_bin_image(1, 2, fmt="PNG"), "image/png")):
        images, single, _ = api_contract.parse_body(body, content_type)
        assert single and images == [body]
        data = inference.input_fn(body, content_type)
        assert inference.predict_fn(data, MODEL)["model_version"] == "contract-test"


def test_a_refusal_the_function_cannot_read_is_not_passed_on():
    for body in ("image 0 is cut short\nTraceback (most recent call last):\n  File ...",  # an older model's
                 '{"error": "arn:aws:iam::123456789012:role/x", "message": "m"}\nTraceback',  # a code not in the table
                 '{"error": "model_error", "message": "m"}',  # not a client error
                 ""):
        seen = model_answer.model_refusal(400, body)
        assert (seen.status, seen.code) == (400, "rejected_by_model")
        assert seen.message == api_contract.ERRORS["rejected_by_model"]["message"]
    long_message = '{"error": "truncated_image", "message": "%s"}' % ("x" * 1000)
    assert model_answer.model_refusal(400, long_message).message == api_contract.ERRORS["truncated_image"]["message"]


@pytest.fixture
def worker():
    """standin/sagemaker/model_worker.py's server around inference.py and a model that fails on a marked image."""
    failing = SimpleNamespace(**{name: getattr(inference, name) for name in ("input_fn", "output_fn")})

    def predict_fn(data, model):
        if data["images"][0] == FAILING:
            raise RuntimeError("CUDA error: device-side assert")
        return inference.predict_fn(data, model)

    failing.predict_fn = predict_fn
    server = ThreadingHTTPServer(("127.0.0.1", 0), model_worker.make_handler(failing, MODEL))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/invocations"
    server.shutdown()
    server.server_close()


FAILING = make_bin_image(3, 3)


def post(url: str, body: bytes, content_type: str) -> tuple[int, str, str, str | None]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status, response.reason, response.read().decode(), response.headers.get("Content-Type")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.reason, exc.read().decode(), exc.headers.get("Content-Type")


def test_the_stand_ins_worker_answers_errors_as_the_toolkit_does(worker):
    status, reason, body, content_type = post(worker, make_bin_image(1, 1), "image/jpeg")
    assert (status, content_type) == (200, "application/json") and "count" in body

    status, reason, body, content_type = post(worker, truncated_image("JPEG"), "image/jpeg")
    first, rest = body.split("\n", 1)
    assert (status, reason, content_type) == (400, "truncated_image", None)
    assert first == '{"error":"truncated_image","message":"image 0 is cut short (no JPEG end marker)"}'
    assert rest.startswith("Traceback (most recent call last):") and "RequestError" in rest
    assert model_answer.model_refusal(status, body).code == "truncated_image"

    # Any other exception: 500, its text as the phrase and the body's first line.
    status, reason, body, _ = post(worker, FAILING, "image/jpeg")
    assert (status, reason) == (500, "CUDA error: device-side assert")
    assert body.startswith("CUDA error: device-side assert\nTraceback (most recent call last):")
