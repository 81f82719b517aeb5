"""Contrast enhancement (the seed project's "improve contrast"), image by image, store to store.

Methods, each with its parameters:
- `none`: the image as it is (copied byte for byte).
- `autocontrast`: stretch the histogram so that `cutoff` percent of the darkest and lightest
  pixels saturate; `preserve_tone` stretches luminance only, keeping the colours.
- `equalize`: histogram equalisation of each channel.

The method and its parameters are written with the output (`enhancement.json`), and the output
prefix is derived from them (`enhancement_id`), so outputs of different settings never mix and a
re-run skips what is already there. Each photo's metadata is copied beside it, so that the output is
in ABID's own layout (`bin-images/` + `metadata/`), the layout a dataset's manifests point a training
channel at.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageOps

from bin_counter.abid import MissingObject, Source, Store, image_path, metadata_path
from bin_counter.artifacts import digest

log = logging.getLogger(__name__)

METHODS: dict[str, dict[str, object]] = {
    # method -> its parameters with their defaults
    "none": {},
    "autocontrast": {"cutoff": 1.0, "preserve_tone": True},
    "equalize": {},
}
JPEG_QUALITY = 95
RECORD = "enhancement.json"


def resolve(method: str, params: Mapping[str, object] | None = None) -> dict[str, Any]:
    """The full parameters of `method`: defaults overridden by `params`; unknown names refused."""
    if method not in METHODS:
        raise ValueError(f"unknown enhancement method {method!r}; choose one of {sorted(METHODS)}")
    params = dict(params or {})
    unknown = set(params) - set(METHODS[method])
    if unknown:
        raise ValueError(f"{method} takes {sorted(METHODS[method]) or 'no parameters'}, not {sorted(unknown)}")
    resolved: dict[str, Any] = {**METHODS[method], **params}  # as given (a Param's JSON), checked below
    if method == "autocontrast":
        cutoff = float(resolved["cutoff"])
        if not 0 <= cutoff < 50:
            raise ValueError(f"autocontrast cutoff must be in [0, 50), got {cutoff}")
        resolved = {"cutoff": cutoff, "preserve_tone": bool(resolved["preserve_tone"])}
    return resolved


def enhancement_id(method: str, params: Mapping[str, object] | None = None) -> str:
    """A short stable name for a method and its parameters, e.g. `autocontrast-3f2a9c1b`."""
    resolved = resolve(method, params)
    return method if method == "none" else f"{method}-{digest([method, resolved], 8)}"


def enhance_image(data: bytes, method: str, params: Mapping[str, object] | None = None) -> bytes:
    """One image's bytes, enhanced. `none` returns the input unchanged."""
    resolved = resolve(method, params)
    if method == "none":
        return data
    with Image.open(io.BytesIO(data)) as original:
        img = original.convert("RGB")
        if method == "autocontrast":
            out = ImageOps.autocontrast(img, cutoff=resolved["cutoff"], preserve_tone=resolved["preserve_tone"])
        else:
            out = ImageOps.equalize(img)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def record(method: str, params: Mapping[str, object] | None = None) -> dict:
    """What `enhancement.json` says: the method, its full parameters and the id they give."""
    resolved = resolve(method, params)
    return {"method": method, "params": resolved, "id": enhancement_id(method, resolved)}


def write_record(dest: Store, method: str, params: Mapping[str, object] | None = None) -> dict:
    """`enhancement.json` into `dest`: the same for every shard of one enhancement, so shards that
    write it side by side agree."""
    written = record(method, params)
    dest.write(RECORD, json.dumps(written, indent=2).encode())
    return written


def enhance_keys(
    source: Source,
    dest: Store,
    keys: Sequence[str],
    method: str,
    params: Mapping[str, object] | None = None,
    workers: int = 4,
    progress_every: float = 10.0,
) -> dict:
    """Enhance `bin-images/<key>.jpg` of each key from `source` into `dest` and copy its
    `metadata/<key>.json` beside it, skipping what `dest` already holds. Returns what was done."""
    resolved = resolve(method, params)
    started = last_log = time.time()
    done = {"written": 0, "skipped": 0}

    def missing(path: str) -> bool:
        try:
            dest.size(path)
            return False
        except MissingObject:
            return True

    def one(key: str) -> str:
        image, metadata = image_path(key), metadata_path(key)
        wrote = False
        if missing(image):
            dest.write(image, enhance_image(source.read(image), method, resolved))
            wrote = True
        if missing(metadata):  # last: a key interrupted half way is finished by the next run
            dest.write(metadata, source.read(metadata))
            wrote = True
        return "written" if wrote else "skipped"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for n, outcome in enumerate(pool.map(one, keys), 1):
            done[outcome] += 1
            now = time.time()
            if now - last_log >= progress_every:
                last_log = now
                log.info("enhance progress: %d/%d images (%.1f/s)", n, len(keys), n / (now - started))
    result = {**record(method, resolved), "images": len(keys), **done, "seconds": round(time.time() - started, 2)}
    log.info(
        "enhanced %d images with %s %s: %d written, %d already there, in %.1fs",
        len(keys),
        method,
        resolved,
        done["written"],
        done["skipped"],
        result["seconds"],
    )
    return result
