"""One model worker, as TorchServe's Python backend worker runs it for SageMaker's PyTorch inference
image: the image's own handler service (sagemaker-pytorch-inference 2.0.25, which bundles
sagemaker_inference) loads the model and answers every request, on this process's main thread, one
request at a time. `model_frontend.py`, the front end, starts one such process per worker and hands each
request to an idle one over a socket; the process exits when that socket closes (or its front end dies).

  PYTHONPATH=<model dir>/code python -P standin/sagemaker/model_backend.py --model-dir <dir> --fd <socket fd>

What is AWS's code: `sagemaker_pytorch_serving_container.handler_service.HandlerService`, the
`DefaultHandlerService` around `Transformer(default_inference_handler=DefaultPytorchInferenceHandler())`.
It finds the model's module (`SAGEMAKER_PROGRAM`, default inference.py, on the path through
PYTHONPATH as the image's torchserve.py sets it), loads the model with `model_fn`, and answers every
request with `Transformer.transform(data, context)`: content type and Accept from the request's
headers, UTF-8 types decoded to text, input_fn / predict_fn / output_fn, and a handler's error through
`Transformer.handle_error` (its status, its phrase as the reason line, `message + "\\n" + traceback`).

What is ours, in place of TorchServe: the `Context` the toolkit is handed, the shape of TorchServe
0.12.0's `ts.context.Context` and `RequestProcessor`, filled as TorchServe's
`Service.retrieve_data_for_inference` fills it; and the answer built from it as
`create_predict_response` and the front end's `RestJob` build it: the status and phrase the toolkit
set (an empty phrase on success, as TorchServe sends it), its content type (none on an error), the
body as the toolkit returned it (text as UTF-8, other objects as indented JSON). Requests run on the
main thread, as in TorchServe's backend: a thread per request would give each its own OpenMP team.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

MODEL_NAME = "model"  # the image's torchserve.py starts TorchServe with `--models model=/opt/ml/model`
TS_VERSION = "0.12.0"  # the TorchServe of AWS's PyTorch 2.6.0 inference image

logger = logging.getLogger(__name__)


class RequestProcessor:
    """TorchServe 0.12.0's ts.context.RequestProcessor: one request's headers and its answer's
    status, phrase and headers."""

    def __init__(self, request_header: dict) -> None:
        self._status_code = 200
        self._reason_phrase = None
        self._response_header: dict[str, str] = {}
        self._request_header = request_header

    def get_request_property(self, key: str):
        return self._request_header.get(key)

    def report_status(self, code, reason_phrase=None) -> None:
        self._status_code = code
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self):
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict:
        return self._response_header

    def get_response_header(self, key: str):
        return self._response_header.get(key)

    def get_request_properties(self) -> dict:
        return self._request_header


class Context:
    """TorchServe 0.12.0's ts.context.Context, the part a handler service reads and writes: the
    model's system properties, the batch's request processors, the answers' status and headers."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict | None,
        batch_size: int,
        gpu: int | None,
        mms_version: str,
        limit_max_image_pixels: bool = True,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] | None = None
        self.metrics = None
        self.model_yaml_config: dict[str, Any] = {}
        self.stopping_criteria = None

    @property
    def system_properties(self) -> dict:
        return self._system_properties

    def get_request_id(self, idx: int = 0):
        return None if self.request_ids is None else self.request_ids.get(idx)

    def _processors(self) -> list[RequestProcessor]:
        if self.request_processor is None:  # no request yet: a TypeError, as TorchServe's Context indexing None
            raise TypeError("the context has no request processors yet")
        return self.request_processor

    def get_request_header(self, idx: int, key: str):
        return self._processors()[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict:
        return self._processors()[idx].get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int):
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int):
        return (
            self._processors()[idx].get_response_status_code(),
            self._processors()[idx].get_response_status_phrase(),
        )

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if self.request_processor is not None and self.request_processor[idx] is not None:
            self.request_processor[idx].report_status(code, reason_phrase=phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self._processors():
            processor.report_status(code, reason_phrase=phrase)

    def get_response_headers(self, idx: int) -> dict:
        return self._processors()[idx].get_response_headers()

    def set_response_header(self, idx, key, value) -> None:
        self._processors()[idx].add_response_property(key, value)


def load(model_dir: str) -> tuple[Any, Context]:
    """The image's handler service and its Context, initialised as TorchServe initialises it when the
    model loads: the user module found and `model_fn(model_dir)` run. A model that fails to load raises."""
    import torch
    from sagemaker_pytorch_serving_container.handler_service import HandlerService

    gpu = 0 if torch.cuda.is_available() else None
    context = Context(MODEL_NAME, model_dir, {"model": {"modelName": MODEL_NAME}}, 1, gpu, TS_VERSION)
    service = HandlerService()
    service.initialize(context)
    return service, context


def body_bytes(value) -> bytes:
    """A response body as ts.protocol.otf_message_handler.create_predict_response encodes it."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    import torch

    if isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()
    return json.dumps(value, indent=2).encode("utf-8")


def ts_error(status: int, kind: str, message: str) -> tuple[int, str | None, dict, bytes]:
    """TorchServe's front end's own error (NettyUtils.sendError): an ErrorResponse as indented JSON."""
    body = json.dumps({"code": status, "type": kind, "message": message}, indent=2) + "\n"
    return status, None, {"content-type": "application/json"}, body.encode()


def predict(
    service: Any, context: Context, body: bytes, headers: list[tuple[str, str]], request_id: str
) -> tuple[int, str | None, dict, bytes]:
    """(status, reason phrase, response headers, body) for one request, as TorchServe's backend
    (Service.predict) and front end (RestJob.responseInference) make them of the handler's answer."""
    mime = next((value for name, value in headers if name.lower() == "content-type"), "")
    request_header: dict[str, Any] = {"body": {"content-type": mime.split(";")[0].strip()}}  # the parameter's headers
    request_header.update(headers)  # then the request's, names as sent
    context.request_ids = {0: request_id}
    context.request_processor = [RequestProcessor(request_header)]
    try:
        answer = service.handle([{"body": body}], context)
    except MemoryError:
        logger.error("System out of memory", exc_info=True)
        return ts_error(507, "InternalServerException", "Out of resources")
    except Exception as exc:  # what TorchServe answers when the handler service itself fails
        logger.warning("Invoking custom service failed.", exc_info=True)
        if "CUDA" in str(exc):
            return ts_error(507, "InternalServerException", "Out of resources")
        return ts_error(503, "InternalServerException", "Prediction failed")
    if not isinstance(answer, list):
        return ts_error(503, "InternalServerException", "Invalid model predict output")
    if len(answer) != 1:
        return ts_error(503, "InternalServerException", "number of batch response mismatched")
    try:
        payload = body_bytes(answer[0])
    except TypeError:
        logger.warning("Unable to serialize model output.", exc_info=True)
        return ts_error(503, "InternalServerException", "Unsupported model output data type.")
    code, phrase = context.get_response_status(0)
    # Netty writes the status line's phrase a byte per character, '?' for one beyond Latin-1.
    phrase = (phrase or "").encode("latin-1", "replace").decode("latin-1")
    return (200 if code is None else int(code)), phrase, dict(context.get_response_headers(0)), payload


def die_with_parent() -> None:
    """End this process soon after the front end that started it ends, even while the model loads
    (PR_SET_PDEATHSIG would fire when the starting thread ends, and the front end starts replacements
    from short-lived threads)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(connection: Connection, service: Any, context: Context) -> None:
    """Answer requests from the front end until it closes the connection."""
    while True:
        try:
            body, headers, request_id = connection.recv()
        except (EOFError, OSError):
            return
        try:
            answer = predict(service, context, body, headers, request_id)
        except Exception:  # the worker stays; TorchServe answers a failed prediction so
            logger.warning("Invoking custom service failed.", exc_info=True)
            answer = ts_error(503, "InternalServerException", "Prediction failed")
        connection.send(answer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="the extracted model.tar.gz")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the front end, inherited")
    args = parser.parse_args()
    die_with_parent()
    # TorchServe's backend worker logs to stdout (the toolkit's handle_error logs there too).
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    connection = Connection(socket.socket(fileno=args.fd).detach())
    code_dir = f"{args.model_dir}/code"
    if code_dir not in sys.path:  # PYTHONPATH names it when endpoints.py starts the worker, as torchserve.py does
        sys.path.insert(0, code_dir)
    service, context = load(args.model_dir)
    try:
        connection.send("ready")
    except OSError:
        return 0  # the front end went away while the model loaded
    serve(connection, service, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
