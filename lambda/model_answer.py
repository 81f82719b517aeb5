"""What the API function makes of its model's refusals: the model's code and a short message of it,
read from the first line of the answer's body, and nothing else the endpoint says. Standard library
only, so the container tests can hold it against the inference toolkit's real error answers."""

from __future__ import annotations

import json

from api_contract import ERRORS, ApiError

# The longest message of the model's that is passed on to a client; anything else gets the table's.
MAX_MODEL_MESSAGE = 300


def model_refusal(status: int, body: str | None) -> ApiError:
    """The client's error for a model's 4xx answer. The model's code travels in the first line of its
    body, `{"error": code, "message": ...}` (the inference toolkit sends `message + "\\n" + traceback`);
    only a code of the table's client errors and a short one-line message of it are passed on, never
    the rest of the body."""
    try:
        detail = json.loads((body or "").split("\n", 1)[0])
    except json.JSONDecodeError:
        detail = None
    code = detail.get("error") if isinstance(detail, dict) else None
    if not (isinstance(code, str) and code in ERRORS and 400 <= ERRORS[code]["status"] < 500 and 400 <= status < 500):
        return ApiError("rejected_by_model")
    message = detail.get("message")
    if not (isinstance(message, str) and 0 < len(message) <= MAX_MODEL_MESSAGE and message.isprintable()):
        message = None
    return ApiError(code, message)
