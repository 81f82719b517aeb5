"""Files the retraining DAG stores in the bucket under their content hash, once: the code archive, the
published model, the backbone's ImageNet weights. Same bytes, same key; a key that exists is not
written again, so every run after the first costs one HeadObject. Standard library only (the
client's own exception classes), so the container-side tests can import what builds on it.
"""

from __future__ import annotations

import hashlib
import json


def digest(data: bytes | str | object, digits: int = 12) -> str:
    """The first `digits` hex digits of the sha256 of `data`: bytes as they are, text as UTF-8, anything
    else as JSON with sorted keys (the names and versions derived from parameters: the same parameters,
    the same name)."""
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes | bytearray):
        data = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:digits]


def content_key(prefix: str, data: bytes, name: str, digits: int = 16) -> str:
    """`<prefix>/<first digits of the sha256 of data>/<name>`."""
    return f"{prefix}/{digest(data, digits)}/{name}"


def put_once(s3, bucket: str, key: str, data: bytes) -> str:
    """Write `data` to `key` unless the key exists (content-addressed keys never change); its S3 URI."""
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"
