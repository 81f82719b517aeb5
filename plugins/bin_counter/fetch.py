"""Copy an ABID subset from a source into a store (local folder or S3 prefix), checking every file.

Plain functions: the data-prep operator wraps them, the demo calls them directly.

- Parallel with a bounded pool; each object retried with exponential backoff on transient errors.
- Resumable: a key whose image and metadata are already at the destination with the source's
  sizes is skipped, so a re-run after an interruption fetches only the rest. Where a store can list
  (S3), the sizes of a whole shard come from a listing of its key range (a request per thousand
  objects) instead of a HEAD per file. The metadata is
  written last, so a key interrupted half way has no metadata and is fetched again; local files
  are written under a temporary name and renamed.
- Every image must decode and every metadata file must carry EXPECTED_QUANTITY. Keys missing at
  the source or failing the checks are reported, not fatal, unless their share exceeds
  `max_bad_share`.
- Sharded: `shard_keys` cuts a selection into shards that fetch on their own (the data-prep DAG maps
  one task over them), and `merge_reports` joins the shards' reports into the selection's, where the
  bad share is judged over the whole selection.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from bin_counter.abid import (
    IMAGE_PREFIX,
    METADATA_PREFIX,
    LocalStore,
    MissingObject,
    Source,
    Store,
    image_path,
    metadata_path,
    parse_count,
)

log = logging.getLogger(__name__)


class SourceUnavailable(RuntimeError):
    """The source could not be read even after retries (network down, no access, no such bucket)."""


class TooManyBadKeys(RuntimeError):
    """More keys than allowed were missing or invalid; the report is attached."""

    def __init__(self, message: str, report: FetchReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class FetchReport:
    source: str
    requested: int = 0
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already complete at the destination
    missing: list[str] = field(default_factory=list)  # absent at the source
    invalid: dict[str, str] = field(default_factory=dict)  # key -> why it was rejected
    filtered: list[str] = field(default_factory=list)  # EXPECTED_QUANTITY not among the wanted counts
    counts: dict[str, int] = field(default_factory=dict)  # key -> EXPECTED_QUANTITY, for good keys
    seconds: float = 0.0

    @property
    def bad(self) -> int:
        return len(self.missing) + len(self.invalid)

    def summary(self) -> str:
        return (
            f"{self.requested} requested from {self.source}: {len(self.fetched)} fetched, "
            f"{len(self.skipped)} already present, {len(self.filtered)} of other counts left out, "
            f"{len(self.missing)} missing at the source, {len(self.invalid)} invalid, in {self.seconds:.1f}s"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict) -> FetchReport:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def shard_keys(keys: Sequence[str], shard_size: int) -> list[list[str]]:
    """`keys` without repeats, in their order, cut into shards of at most `shard_size`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    unique = list(dict.fromkeys(keys))
    return [unique[i : i + shard_size] for i in range(0, len(unique), shard_size)]


def merge_reports(reports: Sequence[FetchReport]) -> FetchReport:
    """The shards' reports as one: lists joined in shard order, seconds summed (the time spent, not the
    wall time of shards that ran side by side)."""
    merged = FetchReport(source=reports[0].source if reports else "")
    for report in reports:
        merged.requested += report.requested
        for name in ("fetched", "skipped", "missing", "filtered"):
            getattr(merged, name).extend(getattr(report, name))
        merged.invalid.update(report.invalid)
        merged.counts.update(report.counts)
        merged.seconds = round(merged.seconds + report.seconds, 2)
    return merged


def check_bad_share(report: FetchReport, max_bad_share: float) -> None:
    """TooManyBadKeys when missing + invalid keys exceed `max_bad_share` of those requested."""
    if report.requested and report.bad / report.requested > max_bad_share:
        raise TooManyBadKeys(
            f"{report.bad} of {report.requested} keys missing or invalid, above the allowed share "
            f"{max_bad_share:.0%} (missing: {report.missing[:5]}, invalid: {list(report.invalid.items())[:3]})",
            report,
        )


def check_image(data: bytes) -> None:
    """Raise ValueError unless `data` is a whole JPEG or PNG that decodes."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG"):
                raise ValueError(f"format {img.format} is not JPEG or PNG")
            img.load()  # a truncated file fails here, not in verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"image does not decode: {exc}") from exc


def _with_retries(call: Callable[[], bytes], retries: int, backoff: float) -> bytes:
    for attempt in range(retries + 1):
        try:
            return call()
        except MissingObject:
            raise
        except Exception as exc:  # network errors vary by source; all are worth a retry
            if attempt == retries:
                raise
            delay = backoff * 2**attempt
            log.warning(
                "retrying after %s: %s (attempt %d of %d, waiting %.1fs)",
                type(exc).__name__,
                exc,
                attempt + 1,
                retries,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def known_sizes(store: Source, keys: Sequence[str]) -> dict[str, int] | None:
    """The sizes of `keys`' images and metadata in `store`, from listings of the range of their
    paths: every path in the range is either listed or absent, so the answer is authoritative for
    all of them. None for a store that cannot list (a local folder, HTTPS): ask it file by file."""
    listing = getattr(store, "listing", None)
    if listing is None or not keys:
        return None
    # Keys of one length at a time: "99999" and "100000" are neighbours as numbers, not as strings,
    # and one range from the first to the second would list nearly the whole bucket.
    by_length: dict[int, list[str]] = {}
    for key in keys:
        by_length.setdefault(len(key), []).append(key)
    sizes = {}
    try:
        for group in by_length.values():
            for folder, path_of in ((IMAGE_PREFIX, image_path), (METADATA_PREFIX, metadata_path)):
                paths = [path_of(key) for key in group]
                sizes.update({path: size for path, (size, _) in listing(folder, min(paths), max(paths)).items()})
    except Exception as exc:  # a store that may be read but not listed (s3:ListBucket denied)
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code not in ("AccessDenied", "403"):
            raise
        log.warning("%s cannot be listed (%s): asking file by file", store.uri, code)
        return None
    return sizes


def _size(store: Source, path: str, known: dict[str, int] | None) -> int:
    if known is None:
        return store.size(path)
    if path not in known:
        raise MissingObject(f"{store.uri}/{path}")
    return known[path]


def _already_complete(
    source: Source,
    dest: Store,
    key: str,
    source_sizes: dict[str, int] | None = None,
    dest_sizes: dict[str, int] | None = None,
) -> bool:
    for path in (metadata_path(key), image_path(key)):
        try:
            if _size(dest, path, dest_sizes) != _size(source, path, source_sizes):
                return False
        except MissingObject:
            return False
    return True


def fetch_key(
    source: Source,
    dest: Store,
    key: str,
    retries: int = 3,
    backoff: float = 0.5,
    counts: Collection[int] | None = None,
    source_sizes: dict[str, int] | None = None,
    dest_sizes: dict[str, int] | None = None,
) -> tuple[str, Any]:
    """Fetch one key. Returns ("fetched"|"skipped", count), ("filtered", count) when its count is not
    in `counts` (its image is then not downloaded), ("missing", path) or ("invalid", reason).
    `source_sizes` and `dest_sizes` (from `known_sizes`) spare a request per file where given."""
    if _already_complete(source, dest, key, source_sizes, dest_sizes):
        count = parse_count(dest.read(metadata_path(key)))
        return ("skipped" if counts is None or count in counts else "filtered"), count
    try:
        metadata = _with_retries(lambda: source.read(metadata_path(key)), retries, backoff)
    except MissingObject as exc:
        return "missing", str(exc)
    try:
        count = parse_count(metadata)
    except ValueError as exc:
        return "invalid", f"metadata: {exc}"
    if counts is not None and count not in counts:
        return "filtered", count
    try:
        image = _with_retries(lambda: source.read(image_path(key)), retries, backoff)
    except MissingObject as exc:
        return "missing", str(exc)
    try:
        check_image(image)
    except ValueError as exc:
        return "invalid", str(exc)
    dest.write(image_path(key), image)
    dest.write(metadata_path(key), metadata)  # last: its presence marks the key complete
    return "fetched", count


def fetch_subset(
    source: Source,
    keys: Sequence[str],
    dest: Store | str | Path,
    workers: int = 8,
    retries: int = 3,
    backoff: float = 0.5,
    max_bad_share: float = 0.5,
    progress_every: float = 10.0,
    counts: Collection[int] | None = None,
) -> FetchReport:
    """Fetch `keys` from `source` into `dest` (ABID layout) and report what happened.

    `dest` is a store, or a local folder path. `counts`, when given, keeps only keys whose
    EXPECTED_QUANTITY is among them (read from the metadata first, so other images are never
    downloaded). Raises TooManyBadKeys when missing + invalid keys
    exceed `max_bad_share` of those requested, SourceUnavailable when the source stops answering.
    """
    if isinstance(dest, str | Path):
        dest = LocalStore(dest, create=True)
    unique = list(dict.fromkeys(keys))
    report = FetchReport(source=source.uri, requested=len(unique))
    started = last_log = time.time()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        wanted = None if counts is None else frozenset(int(c) for c in counts)
        dest_sizes = known_sizes(dest, unique)
        # Against an empty destination every key is fetched: the source's sizes would not be asked.
        source_sizes = None if dest_sizes == {} else known_sizes(source, unique)
        results = pool.map(
            lambda k: (k, *fetch_key(source, dest, k, retries, backoff, wanted, source_sizes, dest_sizes)), unique
        )
        for done, (key, outcome, detail) in enumerate(results, 1):
            if outcome in ("fetched", "skipped"):
                getattr(report, outcome).append(key)
                report.counts[key] = detail
            elif outcome == "filtered":
                report.filtered.append(key)
            elif outcome == "missing":
                report.missing.append(key)
            else:
                report.invalid[key] = detail
                log.warning("rejected %s: %s", key, detail)
            now = time.time()
            if now - last_log >= progress_every:
                last_log = now
                log.info(
                    "fetch progress: %d/%d keys (%.1f/s), %d bad so far",
                    done,
                    len(unique),
                    done / (now - started),
                    report.bad,
                )
    except Exception as exc:
        # One key failing after all its retries means the source itself is failing: stop now
        # instead of retrying every remaining key. What arrived is kept; a re-run resumes.
        pool.shutdown(wait=True, cancel_futures=True)
        raise SourceUnavailable(
            f"cannot read from {source.uri} after {retries} retries ({type(exc).__name__}: {exc}); "
            f"{len(report.fetched)} keys arrived before that and a re-run skips them. Without internet "
            "access, use a local mirror in the ABID layout (ABID_SOURCE=../shared/abid)."
        ) from exc
    pool.shutdown()
    report.seconds = round(time.time() - started, 2)
    log.info("%s", report.summary())
    check_bad_share(report, max_bad_share)
    return report
