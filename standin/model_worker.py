"""A model server with the SageMaker PyTorch inference container's contract, run in the
container-side environment: `GET /ping`, `POST /invocations`, the model's `code/inference.py`
loaded through its four handlers.

  .venv-container/bin/python standin/model_worker.py --model-dir <extracted model.tar.gz> --port 8080

Errors raised by a handler with a `status_code` (the inference toolkit's convention) are answered
with that status and the error's `phrase` as the body; any other error is a 500. The process
never exits because of a request.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def load_handlers(model_dir: Path):
    sys.path.insert(0, str(model_dir / "code"))
    module = importlib.import_module("inference")
    model = module.model_fn(str(model_dir))
    return module, model


def make_handler(module, model):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle's algorithm and delayed ACKs
        # add about 40 ms to every answer.
        disable_nagle_algorithm = True

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
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
                data = module.input_fn(body, self.headers.get("Content-Type"))
                prediction = module.predict_fn(data, model)
                payload, content_type = module.output_fn(prediction, self.headers.get("Accept"))
                if isinstance(payload, str):
                    payload = payload.encode()
                self._send(200, payload, content_type)
            except Exception as exc:
                status = getattr(exc, "status_code", 500)
                phrase = getattr(exc, "phrase", None) or f"{type(exc).__name__}: {exc}"
                if status >= 500:
                    traceback.print_exc()
                self._send(status, str(phrase).encode(), "application/json")

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
