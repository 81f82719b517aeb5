"""What the stand-in's services share: the account their ARNs name, the shape of an HTTP answer,
and the error as AWS sends it, which each service's `exceptions` module names and shapes for its
protocol."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, overload

ACCOUNT = "000000000000"

# (status, headers, body): what a service's responses layer, or the gateway, answers a request with.
Answer = tuple[int, dict[str, str], bytes]


class Headers(Protocol):
    """A request's headers as the responses layers read them: a Mapping, or the HTTP server's
    `email.message.Message` (no Mapping, and its `get` ignores case)."""

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, default: str, /) -> str: ...
    def items(self) -> Iterable[tuple[str, str]]: ...


class AwsError(Exception):
    """An error as AWS sends it: a code, an HTTP status and a message, with any details the code carries."""

    code: str
    status = 400

    def __init__(self, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.message, self.extra = message, extra or {}
