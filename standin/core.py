"""What the stand-in's services share: the account their ARNs name, the shape of an HTTP answer,
and the error as AWS sends it, which each service's `exceptions` module names and shapes for its
protocol."""

from __future__ import annotations

ACCOUNT = "000000000000"

# (status, headers, body): what a service's responses layer, or the gateway, answers a request with.
Answer = tuple[int, dict[str, str], bytes]


class AwsError(Exception):
    """An error as AWS sends it: a code, an HTTP status and a message, with any details the code carries."""

    code: str
    status = 400

    def __init__(self, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.message, self.extra = message, extra or {}
