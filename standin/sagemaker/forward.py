"""The SageMaker Model Registry, served by moto's SageMaker backend: the stand-in hands these requests
to the moto server (`--aws-endpoint`) as they came and returns moto's answer as it came.

The registry is bookkeeping (groups, versions, approval status, metadata), which moto implements; the
stand-in must not keep a second, invented one. What the stand-in still does for these calls is what it
does for every call: the call log (IAM's view) and botocore's validation, before the request leaves.

Not forwarded, though the API has them: DeleteModelPackage and DeleteModelPackageGroup (moto 5.2.5
answers them with an HTML 500, which botocore retries as a server fault; the stand-in refuses them as
not served instead), and AddTags / ListTags / DeleteTags on registry ARNs (moto's tag lookup does not
know model packages and also answers 500)."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

from standin.core import Answer, Headers

REGISTRY_OPERATIONS = frozenset(
    {
        "CreateModelPackageGroup",
        "DescribeModelPackageGroup",
        "ListModelPackageGroups",
        "CreateModelPackage",
        "DescribeModelPackage",
        "ListModelPackages",
        "UpdateModelPackage",
    }
)
# The moto server's call recorder (standin.moto_server) skips a request carrying this header: the
# stand-in has already written it to the call log, as the caller's.
FORWARDED_HEADER = "x-standin-forwarded"
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection, not to the request or the answer; Server
# and Date are written by the stand-in's own HTTP server.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "host"}
_WRITTEN_BY_SERVER = {"server", "date"}


class MotoForward:
    """Hands one AWS JSON 1.1 request to moto's server, unchanged but for the marker header, and brings
    moto's status, headers and body back."""

    def __init__(self, endpoint: str, timeout: float = 30.0) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the moto endpoint must be http(s)://host:port, not {endpoint!r}")
        self.connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout

    def __call__(self, headers: Headers, raw: bytes) -> Answer:
        sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"}
        sent[FORWARDED_HEADER] = "1"
        connection = self.connection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("POST", "/", body=raw, headers=sent)
            response = connection.getresponse()
            body = response.read()
            dropped = _HOP_BY_HOP | _WRITTEN_BY_SERVER | {"content-length"}
            answer = {k: v for k, v in response.getheaders() if k.lower() not in dropped}
            answer["Content-Length"] = str(len(body))
            return response.status, answer, body
        finally:
            connection.close()
