"""Contrast enhancement (the seed project's "improve contrast"), image by image, store to store.

Methods, each with its parameters:
- `none`: the image as it is (copied byte for byte).
- `autocontrast`: stretch the histogram so that `cutoff` percent of the darkest and lightest
  pixels saturate; `preserve_tone` stretches luminance only, keeping the colours.
- `equalize`: histogram equalisation of each channel.

The method and its parameters are written with the output (`enhancement.json`), and the output
prefix is derived from them (`enhancement_id`), so outputs of different settings never mix and a
re-run skips what is already there.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageOps

from bin_counter.abid import MissingObject, Source, Store, image_path
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


def resolve(method: str, params: Mapping[str, object] | None = None) -> dict[str, object]:
    """The full parameters of `method`: defaults overridden by `params`; unknown names refused."""
    if method not in METHODS:
        raise ValueError(f"unknown enhancement method {method!r}; choose one of {sorted(METHODS)}")
    params = dict(params or {})
    unknown = set(params) - set(METHODS[method])
    if unknown:
        raise ValueError(f"{method} takes {sorted(METHODS[method]) or 'no parameters'}, not {sorted(unknown)}")
    resolved = {**METHODS[method], **params}
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
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if method == "autocontrast":
            out = ImageOps.autocontrast(img, cutoff=resolved["cutoff"], preserve_tone=resolved["preserve_tone"])
        else:
            out = ImageOps.equalize(img)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def enhance_keys(
    source: Source,
    dest: Store,
    keys: Sequence[str],
    method: str,
    params: Mapping[str, object] | None = None,
    workers: int = 4,
    progress_every: float = 10.0,
) -> dict:
    """Enhance `bin-images/<key>.jpg` of each key from `source` into `dest`, skipping keys whose
    output exists. Writes `enhancement.json` to `dest` and returns it."""
    resolved = resolve(method, params)
    started = last_log = time.time()
    done = {"written": 0, "skipped": 0}

    def one(key: str) -> str:
        path = image_path(key)
        try:
            dest.size(path)
            return "skipped"
        except MissingObject:
            pass
        dest.write(path, enhance_image(source.read(path), method, resolved))
        return "written"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for n, outcome in enumerate(pool.map(one, keys), 1):
            done[outcome] += 1
            now = time.time()
            if now - last_log >= progress_every:
                last_log = now
                log.info("enhance progress: %d/%d images (%.1f/s)", n, len(keys), n / (now - started))
    record = {"method": method, "params": resolved, "id": enhancement_id(method, resolved),
              "images": len(keys), **done, "seconds": round(time.time() - started, 2)}
    dest.write(RECORD, json.dumps(record, indent=2).encode())
    log.info("enhanced %d images with %s %s: %d written, %d already there, in %.1fs",
             len(keys), method, resolved, done["written"], done["skipped"], record["seconds"])
    return record
