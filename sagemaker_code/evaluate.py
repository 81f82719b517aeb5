"""Evaluate a trained counter on labelled images, through the serving handlers.

  python sagemaker_code/evaluate.py --model <model dir or model.tar.gz> --data <dir>
      [--max-count 5] [--output metrics.json] [--show 10] [--tta flips] [--decoding median]

--data takes the split layout (`<count>/<key>.jpg`) or the ABID layout (`bin-images/` +
`metadata/`). The last line printed is one JSON object: n, accuracy, rmse, mae, within_1,
per_class_accuracy, confusion_matrix, predicted_histogram and confidence_histogram (plus
model_version and seconds), and `live`, the same scores on the live photos alone (keys `live-...`:
captured requests whose count was confirmed) when there are any. The two histograms are what the
monitor (bin_count_monitor) holds live answers against: answers per predicted count, and per tenth
of confidence (CONFIDENCE_BINS).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import datasets
import inference
import metrics
import preprocessing

# Equal-width bins of [0, 1]; plugins/bin_counter/monitor.py bins live confidences the same way.
CONFIDENCE_BINS = 10


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a bin counter on labelled images")
    parser.add_argument("--model", required=True, help="model directory or model.tar.gz (as SageMaker writes it)")
    parser.add_argument("--data", required=True, help="images in the split layout or the ABID layout")
    parser.add_argument(
        "--max-count", type=int, default=None, help="keep only images whose true count is at most this (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--output", default=None, help="also write the metrics JSON to this file")
    parser.add_argument("--show", type=int, default=0, help="print this many individual predictions first")
    parser.add_argument(
        "--tta",
        default=None,
        choices=sorted(inference.TTA_VIEWS),
        help="test-time augmentation instead of the model card's (to measure one before adopting it)",
    )
    parser.add_argument(
        "--decoding",
        default=None,
        choices=inference.DECODINGS,
        help="how a count is read from the probabilities, instead of the model card's",
    )
    return parser


def open_model(path: Path, workdir: Path) -> dict:
    if path.is_file() and path.name.endswith(".tar.gz"):
        with tarfile.open(path) as archive:
            archive.extractall(workdir, filter="data")
        path = workdir
    if not (path / "model_card.json").is_file():
        raise SystemExit(f"evaluate.py: {path} holds no model_card.json: not a model written by train.py")
    return inference.load_model(str(path))


def predict_counts(model: dict, samples: list[datasets.Sample], batch_size: int) -> list[dict]:
    """Predictions for each sample, through the same predict_fn the endpoint runs."""
    predictions = []
    for start in range(0, len(samples), batch_size):
        batch = [Path(s.path).read_bytes() for s in samples[start : start + batch_size]]
        request = {"images": batch, "single": False, "max_pixels": preprocessing.DEFAULT_MAX_PIXELS}
        predictions += inference.predict_fn(request, model)["predictions"]
    return predictions


def evaluate(
    model_path: str,
    data: str,
    max_count: int | None,
    batch_size: int,
    show: int = 0,
    tta: str | None = None,
    decoding: str | None = None,
) -> dict:
    started = time.time()
    samples = datasets.list_samples(data)
    if max_count is not None:
        samples = [s for s in samples if s.count <= max_count]
    if not samples:
        raise SystemExit(f"evaluate.py: no images in {data} with a count of at most {max_count}")
    with tempfile.TemporaryDirectory() as workdir:
        model = open_model(Path(model_path), Path(workdir))
        if tta is not None:
            model["card"]["test_time_augmentation"] = tta
        if decoding is not None:
            model["card"]["decoding"] = decoding
        predictions = predict_counts(model, samples, batch_size)
    for sample, prediction in list(zip(samples, predictions, strict=True))[:show]:
        print(
            f"image {sample.key}: true count {sample.count}, predicted {prediction['count']} "
            f"(confidence {prediction['confidence']:.2f})"
        )
    result = metrics.count_metrics(
        [s.count for s in samples], [p["count"] for p in predictions], len(model["card"]["classes"])
    )
    result.update(histograms(predictions, len(model["card"]["classes"])))
    live = [(s.count, p["count"]) for s, p in zip(samples, predictions, strict=True) if datasets.is_live(s.key)]
    if live:  # the captured photos among them (data prep's live source), scored on their own too
        truth, predicted = [t for t, _ in live], [p for _, p in live]
        result["live"] = metrics.count_metrics(truth, predicted, len(model["card"]["classes"]))
    result["model_version"] = model["card"]["model_version"]
    result["test_time_augmentation"] = model["card"].get("test_time_augmentation", "none")
    result["decoding"] = model["card"].get("decoding", "argmax")
    result["seconds"] = round(time.time() - started, 1)
    return result


def histograms(predictions: list[dict], num_classes: int) -> dict[str, list[int]]:
    """Answers per predicted count (the last class taking any above it) and per confidence bin."""
    counts, confidences = [0] * num_classes, [0] * CONFIDENCE_BINS
    for prediction in predictions:
        counts[min(max(int(prediction["count"]), 0), num_classes - 1)] += 1
        confidences[min(max(int(float(prediction["confidence"]) * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)] += 1
    return {"predicted_histogram": counts, "confidence_histogram": confidences}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = evaluate(args.model, args.data, args.max_count, args.batch_size, args.show, args.tta, args.decoding)
    except datasets.DataError as exc:
        print(f"evaluate.py: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
