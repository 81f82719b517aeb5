"""Finding labelled images on disk, mapping counts to classes, and decoding them once.

Two layouts are read:
- split layout (a local split, and datasets of earlier releases): `<root>/<count>/<key>.jpg`
- ABID layout (the public bucket's): `<root>/bin-images/<key>.jpg` with its count either in
  `<root>/metadata/<key>.json` (`EXPECTED_QUANTITY`), or in a labels file `<root>/labels/*.csv`
  (`key,count`), which is what a channel of the data-prep DAG's manifests holds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

import preprocessing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# The keys of live photos (captured requests with a confirmed count): bin_counter.live.KEY_PREFIX,
# which a container-side test holds this to.
LIVE_KEY_PREFIX = "live-"
ABOVE_MAX_POLICIES = ("drop", "clip")


@dataclass(frozen=True)
class Sample:
    path: str
    count: int
    key: str


class DataError(ValueError):
    """A data folder that cannot be used; the message names the folder and what is wrong."""


def is_live(key: str) -> bool:
    """Whether a photo came from the live source (a client's request) rather than ABID."""
    return key.startswith(LIVE_KEY_PREFIX)


def is_abid_layout(root: str | os.PathLike) -> bool:
    root = Path(root)
    return (root / "bin-images").is_dir() and ((root / "metadata").is_dir() or (root / "labels").is_dir())


def read_labels(root: Path) -> dict[str, int] | None:
    """key -> count from the channel's labels files (`labels/*.csv`, `key,count`), or None without any."""
    files = sorted((root / "labels").glob("*.csv")) if (root / "labels").is_dir() else []
    if not files:
        return None
    counts = {}
    for path in files:
        with path.open(newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), 2):
                try:
                    counts[row["key"]] = int(row["count"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise DataError(f"{path}, line {number}: need key,count, got {row}") from exc
    return counts


def list_split_layout(root: str | os.PathLike) -> list[Sample]:
    samples = []
    for entry in sorted(Path(root).iterdir()):
        if not entry.is_dir():
            continue
        if not entry.name.isdigit():
            raise DataError(f"{entry}: class folders must be named by count (0, 1, 2, ...)")
        count = int(entry.name)
        for image in sorted(entry.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(str(image), count, image.stem))
    return samples


def list_abid_layout(root: str | os.PathLike) -> list[Sample]:
    root = Path(root)
    labels = read_labels(root)
    samples = []
    for image in sorted((root / "bin-images").iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if labels is not None and image.stem in labels:
            samples.append(Sample(str(image), labels[image.stem], image.stem))
            continue  # a photo the labels do not name (a mirror of many datasets' photos) may have metadata
        meta_path = root / "metadata" / f"{image.stem}.json"
        if not meta_path.is_file():
            continue  # an image without its label cannot be used for training or evaluation
        try:
            count = int(json.loads(meta_path.read_text())["EXPECTED_QUANTITY"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{meta_path}: no usable EXPECTED_QUANTITY ({exc})") from exc
        samples.append(Sample(str(image), count, image.stem))
    return samples


def list_samples(root: str | os.PathLike) -> list[Sample]:
    """All labelled images under `root`, in either layout, in a stable order."""
    if not Path(root).is_dir():
        raise DataError(f"data folder {root} does not exist")
    samples = list_abid_layout(root) if is_abid_layout(root) else list_split_layout(root)
    if not samples:
        raise DataError(
            f"no images found in {root}: expected <count>/<key>.jpg folders or the ABID layout "
            "(bin-images/ + metadata/)"
        )
    return samples


def apply_count_policy(samples: list[Sample], max_count: int, above_max: str) -> list[tuple[Sample, int]]:
    """(sample, class) pairs. Counts above `max_count` are dropped, or clipped into the top
    class, which then means "max_count or more"."""
    if above_max not in ABOVE_MAX_POLICIES:
        raise ValueError(f"above_max must be one of {ABOVE_MAX_POLICIES}")
    labelled = []
    for sample in samples:
        if sample.count < 0:
            raise DataError(f"{sample.path}: negative count {sample.count}")
        if sample.count > max_count:
            if above_max == "drop":
                continue
            labelled.append((sample, max_count))
        else:
            labelled.append((sample, sample.count))
    return labelled


def _decode_file(args: tuple[str, int]) -> tuple[bytes, str]:
    path, size = args
    data = Path(path).read_bytes()
    try:
        tensor = preprocessing.decode(data, size)
    except preprocessing.ImageRejected as exc:
        raise DataError(f"{path}: {exc}") from exc
    return tensor.numpy().tobytes(), hashlib.sha256(data).hexdigest()


@dataclass
class DecodedSet:
    images: torch.Tensor  # uint8 N x 3 x size x size
    labels: torch.Tensor  # int64 N
    samples: list[Sample]
    digests: list[str]  # sha256 of each source file, for the data fingerprint


def decode_all(labelled: list[tuple[Sample, int]], size: int, workers: int) -> DecodedSet:
    """Decode every image once into memory (uint8: 150 KB an image at 224 px).

    A file that does not decode stops training with its path: the data-prep step verifies images,
    so a bad one here means the channel is not what it should be.
    """
    n = len(labelled)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    digests = []
    jobs = [(sample.path, size) for sample, _ in labelled]

    def fill(results):
        for i, (raw, digest) in enumerate(results):
            images[i] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(3, size, size)
            digests.append(digest)

    if workers > 1 and n > 64:
        # spawn, not fork: forking after torch has started its thread pools can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            fill(pool.map(_decode_file, jobs, chunksize=32))
    else:
        fill(map(_decode_file, jobs))
    labels = torch.tensor([label for _, label in labelled], dtype=torch.int64)
    return DecodedSet(images, labels, [sample for sample, _ in labelled], digests)


def fingerprint_rows(named_sets: dict[str, DecodedSet | list[tuple[Sample, int]]]) -> list[tuple[str, str, str]]:
    """The data fingerprint's rows, one (channel, key, row) per image: which file, with which bytes
    (decoded sets; names and sizes for lazy, --cache none, sets) and which label. Rows of several
    processes' shares join into the whole set's; `digest_rows` makes the fingerprint of them."""
    rows = []
    for name, ds in named_sets.items():
        items: Iterable[tuple[Sample, str, int]]
        if isinstance(ds, DecodedSet):
            items = zip(ds.samples, ds.digests, ds.labels.tolist(), strict=True)
        else:
            items = ((s, f"size{os.path.getsize(s.path)}", label) for s, label in ds)
        rows += [(name, sample.key, f"{name}/{sample.key}:{content}:{label}\n") for sample, content, label in items]
    return rows


def digest_rows(rows: list[tuple[str, str, str]]) -> str:
    """The fingerprint: a digest of which files, with which bytes and labels, each channel held."""
    digest = hashlib.sha256()
    for _, _, row in sorted(rows, key=lambda r: (r[0], r[1])):
        digest.update(row.encode())
    return digest.hexdigest()


class LazyImageDataset(torch.utils.data.Dataset):
    """Decodes on every access: the naive path, for data that does not fit in memory."""

    def __init__(self, labelled: list[tuple[Sample, int]], size: int) -> None:
        self.labelled = labelled
        self.size = size

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample, label = self.labelled[index]
        return preprocessing.decode(Path(sample.path).read_bytes(), self.size), label
