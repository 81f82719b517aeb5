"""A model server with the SageMaker PyTorch inference container's contract, run in the
container-side environment: `GET /ping`, `POST /invocations`, the model's `code/inference.py`
loaded through its four handlers.

  .venv-container/bin/python standin/sagemaker/model_worker.py --model-dir <extracted model.tar.gz> --port 8080

Errors are answered as the inference toolkit's `Transformer.handle_error` answers them (this part is
our imitation of sagemaker-inference, not the toolkit itself): a `BaseInferenceToolkitError` with its
`status_code`, its `phrase` (line breaks removed) as the reason line and `message + "\n" + traceback`
as the body, no Content-Type; any other error as status 500 with `str(error) + "\n" + traceback`.
The process never exits because of a request.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

UTF8_TYPES = ("application/json", "text/csv")  # sagemaker_inference.content_types.UTF8_TYPES


def load_handlers(model_dir: Path):
    sys.path.insert(0, str(model_dir / "code"))
    module = importlib.import_module("inference")
    model = module.model_fn(str(model_dir))
    return module, model


def toolkit_error(exc: BaseException) -> bool:
    """Whether the toolkit would answer `exc` with its own status: a BaseInferenceToolkitError, the
    toolkit's class or, where the toolkit is not installed, a class of that name with its contract."""
    try:
        from sagemaker_inference.errors import BaseInferenceToolkitError
    except ImportError:
        return any(c.__name__ == "BaseInferenceToolkitError" for c in type(exc).__mro__)
    return isinstance(exc, BaseInferenceToolkitError)


def error_answer(exc: BaseException, trace: str) -> tuple[int, str, bytes]:
    """(status, reason phrase, body) as Transformer.transform and handle_error make them."""
    if toolkit_error(exc):
        status, message, phrase = exc.status_code, exc.message, exc.phrase
    else:  # GenericInferenceToolkitError(500, str(e)): the message is its phrase too
        status, message = 500, str(exc) or "Invalid Request"
        phrase = message
    phrase = str(phrase).replace("\r", "").replace("\n", "")  # utils.remove_crlf
    phrase = phrase.encode("latin-1", "replace").decode("latin-1")  # what an HTTP status line can carry
    return int(status), phrase, f"{message}\n{trace}".encode()


def make_handler(module, model):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle's algorithm and delayed ACKs
        # add about 40 ms to every answer.
        disable_nagle_algorithm = True

        def _send(self, status: int, body: bytes, content_type: str | None, phrase: str | None = None) -> None:
            self.send_response(status, phrase)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            status = 200 if self.path == "/ping" else 404
            self._send(status, b"" if status == 200 else b"not found", "text/plain")

        def do_POST(self) -> None:
            if self.path != "/invocations":
                self._send(404, b"not found", "text/plain")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if self.headers.get("Content-Type") in UTF8_TYPES:  # the toolkit hands these over as text
                    body = body.decode("utf-8")
                data = module.input_fn(body, self.headers.get("Content-Type"))
                prediction = module.predict_fn(data, model)
                payload, content_type = module.output_fn(prediction, self.headers.get("Accept"))
                if isinstance(payload, str):
                    payload = payload.encode()
                self._send(200, payload, content_type)
            except Exception as exc:
                trace = traceback.format_exc()
                status, phrase, answer = error_answer(exc, trace)
                if status >= 500:
                    print(trace, file=sys.stderr, flush=True)
                self._send(status, answer, None, phrase)

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="the extracted model.tar.gz")
    parser.add_argument("--port", type=int, required=True, help="loopback port to serve on")
    args = parser.parse_args()
    module, model = load_handlers(Path(args.model_dir))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(module, model))
    print(f"serving {args.model_dir} on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
