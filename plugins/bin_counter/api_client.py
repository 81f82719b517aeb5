"""Count the items in bin photos through the public API (API Gateway on AWS, or the local gateway).

  python -m bin_counter.api_client --url https://<api>.execute-api.<region>.amazonaws.com/prod/count \\
      --api-key $BIN_COUNTER_API_KEY photo.jpg more-photos/
  python -m bin_counter.api_client --url http://127.0.0.1:5055/count photo.jpg --expected 3

One line per image: its count, the confidence and the model version, or the API's error. With
--expected, also the probability of exactly that count and the verdict (match, mismatch,
uncertain). Throttled (429) and unavailable (503) answers are retried with backoff a few times.
Exit code 0 when every image was counted, 1 otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
RETRIED = (429, 503)


def add_target_arguments(parser: argparse.ArgumentParser, paths_help: str) -> None:
    """The images and the API they go to: what every command-line tool of the API takes."""
    parser.add_argument("paths", nargs="+", help=paths_help)
    parser.add_argument("--url", required=True, help="the API's POST /count URL")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BIN_COUNTER_API_KEY"),
        help="sent as x-api-key (default: $BIN_COUNTER_API_KEY)",
    )


def request_headers(image: Path, api_key: str | None) -> dict[str, str]:
    content_type = CONTENT_TYPES.get(image.suffix.lower(), "application/octet-stream")
    return {"Content-Type": content_type, **({"x-api-key": api_key} if api_key else {})}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_target_arguments(parser, "images, or folders of .jpg/.png images")
    parser.add_argument("--expected", type=int, default=None, help="the count you expect in every image")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for each answer")
    parser.add_argument("--attempts", type=int, default=4, help="tries per image on 429 and 503")
    parser.add_argument("--json", action="store_true", help="print each answer as one JSON line")
    return parser


def images_in(paths: list[str]) -> list[Path]:
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in CONTENT_TYPES)
        else:
            found.append(path)
    return found


def count(
    url: str, image: Path, api_key: str | None, expected: int | None, timeout: float, attempts: int
) -> tuple[int, dict]:
    """(HTTP status, answer) for one image."""
    target = f"{url}?expected={expected}" if expected is not None else url
    headers = request_headers(image, api_key)
    data = image.read_bytes()
    for attempt in range(attempts):
        request = urllib.request.Request(target, data=data, headers=headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the user's URL
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        if status not in RETRIED or attempt == attempts - 1:
            try:
                return status, json.loads(body)
            except json.JSONDecodeError:
                return status, {"message": body.decode(errors="replace")[:200]}
        time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def describe(image: Path, status: int, answer: dict) -> str:
    if status != 200:
        error = answer.get("error", "error")
        return f"{image}: {status} {error}: {answer.get('message', '')}"
    line = (
        f"{image}: {answer['count']} items (confidence {answer['confidence']:.2f}, model {answer.get('model_version')})"
    )
    if "verdict" in answer:
        line += f"; expected {answer['expected']}: {answer['verdict']} (p={answer['expected_probability']})"
    return line


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    images = images_in(args.paths)
    if not images:
        print("no images found in " + ", ".join(args.paths), file=sys.stderr)
        return 1
    failures = 0
    for image in images:
        if not image.is_file():
            failures += 1
            print(f"{image}: no such file", flush=True)
            continue
        try:
            status, answer = count(args.url, image, args.api_key, args.expected, args.timeout, args.attempts)
        except (OSError, urllib.error.URLError) as exc:
            status, answer = 0, {"error": "unreachable", "message": str(exc)}
        failures += status != 200
        print(
            json.dumps({"image": str(image), "status": status, **answer})
            if args.json
            else describe(image, status, answer),
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
