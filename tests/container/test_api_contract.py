"""One fault, one code: the API function's own checks (lambda/api_contract.py, standard library only, so
it runs here beside the model's code) and the model's (inference.py) answer every fault of a request
with the same code, status and message of sagemaker_code/api_contract.json; a fault only the model
finds reaches the client, through the inference toolkit's error answer and the function, as the
model's code and message and nothing else. The toolkit is AWS's own (sagemaker-pytorch-inference
2.0.25, as the PyTorch 2.6.0 inference image has it), and the stand-in's model worker serves through it."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import threading
import traceback
import types
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest
import sagemaker_inference
import torch
from sagemaker_inference.transformer import Transformer

from standin.sagemaker import model_backend, model_frontend
from tests.conftest import REPO, REQUEST_FAULTS, make_bin_image, truncated_image

import api_contract
import inference

sys.path.insert(0, str(REPO / "lambda"))
try:
    import model_answer  # the function's reading of the model's answer: standard library only
finally:
    sys.path.remove(str(REPO / "lambda"))

# What predict_fn needs of a model; no weights, so no training: every fault is found before the network.
MODEL = {
    "model": lambda batch: torch.zeros(batch.shape[0], 4),
    "image_size": 32,
    "card": {"classes": [0, 1, 2, 3], "model_version": "contract-test"},
}


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
    """(status, reason phrase, body) of the inference toolkit's own Transformer.handle_error for an
    error a handler raised, with the TorchServe-shaped context the stand-in's worker hands it."""
    try:
        raise exc
    except Exception:
        trace = traceback.format_exc()
    context = model_backend.Context("model", "/opt/ml/model", None, 1, None, model_backend.TS_VERSION)
    context.request_processor = [model_backend.RequestProcessor({})]
    body = Transformer.handle_error(context, exc, trace)[0]
    status, phrase = context.get_response_status(0)
    return status, phrase, body


def test_the_toolkit_is_the_images():
    """sagemaker_inference is the copy bundled in sagemaker-pytorch-inference, not a separate package,
    and inference.py's RequestError is the toolkit's own error class."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    assert version("sagemaker-pytorch-inference") == "2.0.25"
    with pytest.raises(PackageNotFoundError):
        distribution("sagemaker-inference")
    files = {str(f) for f in distribution("sagemaker-pytorch-inference").files}
    assert "sagemaker_inference/transformer.py" in files
    from sagemaker_inference.errors import BaseInferenceToolkitError

    assert issubclass(inference.RequestError, BaseInferenceToolkitError)
    assert inference.BaseInferenceToolkitError is BaseInferenceToolkitError
    from sagemaker_pytorch_serving_container.handler_service import HandlerService

    assert isinstance(HandlerService()._service, Transformer)


def test_the_two_layers_read_one_table():
    assert inference.api_contract is api_contract
    assert api_contract.contract_path() == (REPO / "sagemaker_code" / "api_contract.json")


@pytest.mark.parametrize(
    ("name", "body", "content_type", "code"), REQUEST_FAULTS, ids=[case[0] for case in REQUEST_FAULTS]
)
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
    for body in (
        "image 0 is cut short\nTraceback (most recent call last):\n  File ...",  # an older model's
        '{"error": "arn:aws:iam::123456789012:role/x", "message": "m"}\nTraceback',  # a code not in the table
        '{"error": "model_error", "message": "m"}',  # not a client error
        "",
    ):
        seen = model_answer.model_refusal(400, body)
        assert (seen.status, seen.code) == (400, "rejected_by_model")
        assert seen.message == api_contract.ERRORS["rejected_by_model"]["message"]
    long_message = '{"error": "truncated_image", "message": "%s"}' % ("x" * 1000)
    assert model_answer.model_refusal(400, long_message).message == api_contract.ERRORS["truncated_image"]["message"]


FAILING = make_bin_image(3, 3)
MULTILINE = make_bin_image(2, 2)


def failing_module() -> types.ModuleType:
    """inference.py with a model_fn that returns MODEL and a predict_fn that fails on marked images."""
    module = types.ModuleType("failing_inference")
    module.__spec__ = importlib.machinery.ModuleSpec("failing_inference", None)  # importlib's find_spec finds it
    module.input_fn, module.output_fn = inference.input_fn, inference.output_fn

    def model_fn(model_dir):
        return MODEL

    def predict_fn(data, model):
        if data["images"][0] == FAILING:
            raise RuntimeError("CUDA error: device-side assert")
        if data["images"][0] == MULTILINE:
            raise RuntimeError("line one\r\nline two")
        return inference.predict_fn(data, model)

    module.model_fn, module.predict_fn = model_fn, predict_fn
    return module


@pytest.fixture
def worker(monkeypatch, tmp_path):
    """standin/sagemaker/model_frontend.py's HTTP front on one worker's answers (model_backend.py's): the
    toolkit's handler service, found the model's module through SAGEMAKER_PROGRAM as in the image, around
    inference.py and a model that fails on marked images."""
    monkeypatch.setitem(sys.modules, "failing_inference", failing_module())
    monkeypatch.setenv("SAGEMAKER_PROGRAM", "failing_inference.py")
    monkeypatch.delenv("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", raising=False)
    monkeypatch.setenv("PYTHONPATH", "")  # HandlerService.initialize prepends the model's code/ to it
    service, context = model_backend.load(str(tmp_path))
    one_at_a_time = threading.Lock()  # one worker, as model_frontend.Workers hands requests to it

    def answer(body, headers, request_id):
        with one_at_a_time:
            return model_backend.predict(service, context, body, headers, request_id)

    server = ThreadingHTTPServer(("127.0.0.1", 0), model_frontend.make_handler(answer))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str, bytes, dict]:
    request = urllib.request.Request(
        url,
        data=body,
        headers=headers or {},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.reason, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.reason, exc.read(), dict(exc.headers)


def post(url: str, body: bytes, content_type: str, accept: str | None = None) -> tuple[int, str, str, str | None]:
    headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
    status, reason, answer, answer_headers = call(f"{url}/invocations", body, headers)
    return status, reason, answer.decode(), {k.lower(): v for k, v in answer_headers.items()}.get("content-type")


def test_the_stand_ins_worker_answers_errors_as_the_toolkit_does(worker):
    status, reason, body, content_type = post(worker, make_bin_image(1, 1), "image/jpeg")
    assert (status, content_type) == (200, "application/json") and "count" in body
    assert reason == ""  # TorchServe sends the phrase the handler set, none on success

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


def test_the_worker_runs_the_toolkits_transformer(worker):
    """The error's traceback runs through sagemaker_inference's own Transformer.transform and
    _default_transform_fn (the copy that sagemaker-pytorch-inference bundles); the phrase loses its line
    breaks as the toolkit's utils.remove_crlf does it (each one a space)."""
    toolkit = sagemaker_inference.__path__[0]
    status, reason, body, _ = post(worker, FAILING, "image/jpeg")
    for frame in ("in transform", "in _default_transform_fn", "in _run_handler_function"):
        assert f'File "{toolkit}/transformer.py"' in body and frame in body, frame
    status, reason, body, _ = post(worker, MULTILINE, "image/jpeg")
    assert (status, reason) == (500, "line one  line two")
    assert body.startswith("line one\r\nline two\nTraceback")


def test_accept_and_content_type_as_the_toolkit_reads_them(worker, monkeypatch):
    image = make_bin_image(1, 1)
    # No Accept, or */*: the toolkit's default accept (SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT, application/json).
    for accept in (None, "*/*"):
        assert post(worker, image, "image/jpeg", accept)[:1] == (200,)
    # An Accept the model does not answer: output_fn's RequestError, through the toolkit.
    status, reason, body, content_type = post(worker, image, "image/jpeg", "text/csv")
    assert (status, reason, content_type) == (406, "unsupported_accept", None)
    detail = "accept type 'text/csv': the model answers application/json only"
    assert json.loads(body.split("\n", 1)[0]) == {"error": "unsupported_accept", "message": detail}
    # A content type the model does not read: input_fn's RequestError, through the toolkit.
    status, reason, body, content_type = post(worker, image, "text/plain; charset=utf-8")
    assert (status, reason, content_type) == (415, "unsupported_content_type", None)
    assert "'text/plain'" in body.split("\n", 1)[0] and "RequestError" in body
    # JSON the toolkit hands over as text (a UTF-8 type); a body that is not UTF-8 fails in the
    # toolkit's own decoding, before input_fn: 500 with the UnicodeDecodeError's text.
    status, reason, body, _ = post(worker, b"\xff\xfe", "application/json")
    assert status == 500 and body.startswith("'utf-8' codec can't decode byte 0xff")
    assert "input_data.decode" in body


def test_ping_answers_as_torchserve(worker):
    status, reason, body, headers = call(f"{worker}/ping")
    assert (status, reason, body) == (200, "OK", b'{\n  "status": "Healthy"\n}\n')
    assert {k.lower(): v for k, v in headers.items()}["content-type"] == "application/json"
    status, _, body, _ = call(f"{worker}/nothing-here")
    assert status == 404 and json.loads(body)["type"] == "ResourceNotFoundException"
