"""The Amazon Bin Image Dataset: its keys, its subsets, and the places it can be read from.

Keys are the ids in `bin-images/<key>.jpg` and `metadata/<key>.json`. They are not always
zero-padded, and `121` and `00121` are different images: keys are strings, never ints.

Sources, all read the same way (`read(path) -> bytes`, `size(path)`); the local folder and S3
ones are also stores that can be written (`write(path, data)`), the destinations of a fetch:
- `s3://aft-vbi-pds` (the default): the public bucket, read anonymously, or any `s3://bucket/prefix`
  with the caller's boto3 client;
- `https://aft-vbi-pds.s3.amazonaws.com`: the same bucket over plain HTTPS;
- a local directory in the bucket's layout, e.g. `../shared/abid`.
"""

from __future__ import annotations

import json
import os
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PUBLIC_BUCKET = "aft-vbi-pds"
PUBLIC_SOURCE = f"s3://{PUBLIC_BUCKET}"
PUBLIC_REGION = "us-east-1"
IMAGE_PREFIX = "bin-images/"
METADATA_PREFIX = "metadata/"
FILE_LIST = "file_list.json"


class MissingObject(LookupError):
    """The source has no object at that path."""


@dataclass(frozen=True)
class Record:
    """One labelled image: its key and EXPECTED_QUANTITY."""

    key: str
    count: int


def parse_count(metadata: bytes | str) -> int:
    """EXPECTED_QUANTITY of a metadata document; ValueError if it has none."""
    try:
        count = json.loads(metadata)["EXPECTED_QUANTITY"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"no EXPECTED_QUANTITY in the metadata ({type(exc).__name__}: {exc})") from exc
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"EXPECTED_QUANTITY must be a non-negative integer, got {count!r}")
    return count


def read_local_records(root: str | Path) -> list[Record]:
    """Records of a local folder in the ABID layout: keys that have both an image and metadata."""
    root = Path(root)
    records = []
    for meta in sorted((root / METADATA_PREFIX).glob("*.json")):
        if (root / image_path(meta.stem)).is_file():
            records.append(Record(meta.stem, parse_count(meta.read_bytes())))
    return records


def image_path(key: str) -> str:
    return f"{IMAGE_PREFIX}{key}.jpg"


def metadata_path(key: str) -> str:
    return f"{METADATA_PREFIX}{key}.json"


def key_block(key: str, block_size: int) -> str:
    """The block of consecutive keys `key` belongs to.

    Consecutive keys are often the same bin photographed again, so splits keep whole blocks on
    one side. Padded keys (`00121`, and those of 5 digits or more) and short unpadded ones (`121`)
    are separate series of photos, hence separate blocks.
    """
    if not key.isdigit():
        return f"x:{key}"
    series = "p" if len(key) >= 5 else "u"
    return f"{series}:{int(key) // block_size}"


def parse_file_list(data: bytes | str) -> dict[int, list[str]]:
    """`file_list.json` ({"1": ["data/metadata/00012.json", ...], ...}) as keys per count."""
    raw = json.loads(data)
    return {int(count): [Path(p).stem for p in paths] for count, paths in raw.items()}


def packaged_file_list() -> dict[int, list[str]]:
    """The seed project's `file_list.json` (10,441 keys, counts 1 to 5), shipped with this package
    because the public bucket does not hold it."""
    return parse_file_list((Path(__file__).parent / "data" / FILE_LIST).read_bytes())


def file_list_from(source: Source) -> dict[int, list[str]]:
    """The source's own `file_list.json` if it has one, else the packaged copy."""
    try:
        return parse_file_list(source.read(FILE_LIST))
    except MissingObject:
        return packaged_file_list()


def select_keys(
    by_count: dict[int, list[str]],
    counts: Iterable[int] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[str]:
    """A reproducible subset of a file list: keys of the given counts, at most `limit` in all,
    drawn evenly across counts."""
    wanted = sorted(by_count) if counts is None else sorted(set(counts))
    pools = {c: sorted(by_count.get(c, [])) for c in wanted}
    rng = random.Random(seed)
    for pool in pools.values():
        rng.shuffle(pool)
    if limit is None:
        return sorted(k for pool in pools.values() for k in pool)
    chosen: list[str] = []
    while len(chosen) < limit and any(pools.values()):
        for c in wanted:
            if pools[c] and len(chosen) < limit:
                chosen.append(pools[c].pop())
    return sorted(chosen)


def key_range(start: int, stop: int, width: int = 5) -> list[str]:
    """Zero-padded consecutive keys, e.g. key_range(1000, 1003) -> ['01000', '01001', '01002']."""
    return [f"{i:0{width}d}" for i in range(start, stop)]


def parse_key_range(text: str) -> list[str]:
    """The keys of "START:STOP" (STOP excluded), as wide as START is written: "01000:01003" ->
    ['01000', '01001', '01002']. ValueError for anything else."""
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(stop) <= int(start):
        raise ValueError(f"expected START:STOP with zero-padded keys, e.g. 01000:01600, got {text!r}")
    return key_range(int(start), int(stop), width=len(start))


class Source(Protocol):
    uri: str

    def read(self, path: str) -> bytes: ...

    def size(self, path: str) -> int: ...


class Store(Source, Protocol):
    def write(self, path: str, data: bytes) -> None: ...


class LocalStore:
    """A local folder. Writes go to a temporary name first: a kill never leaves half a file."""

    def __init__(self, root: str | Path, create: bool = False) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ABID source directory {self.root} does not exist")
        self.uri = str(self.root)

    def _file(self, path: str) -> Path:
        file = self.root / path
        if not file.is_file():
            raise MissingObject(f"{self.uri}/{path}")
        return file

    def read(self, path: str) -> bytes:
        return self._file(path).read_bytes()

    def size(self, path: str) -> int:
        return self._file(path).stat().st_size

    def write(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, target)


class S3Store:
    """An S3 prefix in the ABID layout. `client` defaults to an anonymous one for the public bucket."""

    def __init__(self, bucket: str, prefix: str = "", client=None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        if client is None:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            client = boto3.client("s3", region_name=PUBLIC_REGION, config=Config(signature_version=UNSIGNED))
        self.client = client

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def read(self, path: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()
        except self.client.exceptions.NoSuchKey as exc:
            raise MissingObject(f"{self.uri}/{path}") from exc

    def size(self, path: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(path))["ContentLength"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise MissingObject(f"{self.uri}/{path}") from exc
            raise

    def write(self, path: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data)

    def listing(
        self, folder: str = "", first: str | None = None, last: str | None = None
    ) -> dict[str, tuple[int, str]]:
        """The objects under `folder`, or only those whose paths lie between `first` and `last`
        (inclusive, in S3's order): path -> (size, ETag). One request per thousand objects, where a
        HEAD per object would take one each."""
        found: dict[str, tuple[int, str]] = {}
        start = len(self._key(""))
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self._key(folder),
            # StartAfter is exclusive: start just before `first` (a string one character shorter sorts first).
            **({"StartAfter": self._key(first)[:-1]} if first else {}),
        )
        for page in pages:
            for obj in page.get("Contents", []):
                path = obj["Key"][start:]
                if last is not None and path > last:
                    return found
                if first is None or path >= first:
                    found[path] = (obj["Size"], obj["ETag"].strip('"'))
        return found


class HttpsSource:
    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.uri = base_url.rstrip("/")
        self.timeout = timeout

    def _open(self, path: str, method: str):
        # open_source only builds this class for http(s) URIs, never file: or custom schemes.
        request = urllib.request.Request(f"{self.uri}/{path}", method=method)  # noqa: S310
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):  # S3 answers 403 for a missing key without list rights
                raise MissingObject(f"{self.uri}/{path}") from exc
            raise

    def read(self, path: str) -> bytes:
        with self._open(path, "GET") as response:
            return response.read()

    def size(self, path: str) -> int:
        with self._open(path, "HEAD") as response:
            return int(response.headers["Content-Length"])


def open_source(uri: str = PUBLIC_SOURCE, s3_client=None) -> Source:
    """A source from a URI: `s3://bucket[/prefix]`, `http(s)://...` or a local directory."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if s3_client is None and bucket != PUBLIC_BUCKET:
            import boto3

            s3_client = boto3.client("s3")
        return S3Store(bucket, prefix, s3_client)
    if uri.startswith(("https://", "http://")):
        return HttpsSource(uri)
    return LocalStore(uri)


def open_store(uri: str, s3_client=None) -> Store:
    """A writable store: `s3://bucket[/prefix]` (through `s3_client`) or a local folder (created)."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if s3_client is None:
            import boto3

            s3_client = boto3.client("s3")
        return S3Store(bucket, prefix, s3_client)
    if "://" in uri:
        raise ValueError(f"cannot write to {uri}: use s3://bucket/prefix or a local folder")
    return LocalStore(uri, create=True)
