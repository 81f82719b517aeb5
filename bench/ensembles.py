"""Do ensembles of the trained variants count better? Average the class probabilities of every subset
of the given models, with each model's serving TTA, and score argmax and median decoding.

Ensembles are chosen by validation accuracy and reported on the test images, so the choice never
sees the test split. Every model must have been trained on the same split, as the experiment runs
of bench/train_vs_seed.py are (same --abid, same seed).

  PYTHONPATH=sagemaker_code .venv-container/bin/python -m bench.ensembles build/exp/e10 build/exp/nbr build/exp/aug \\
      build/exp/lite0 build/exp/bal
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

import datasets
import evaluate
import inference
import metrics


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="train_vs_seed work folders (model-default/ and split/ in each)")
    parser.add_argument("--max-count", type=int, default=5, help="top count class")
    parser.add_argument("--tta", default="flips", choices=sorted(inference.TTA_VIEWS), help="TTA for every model")
    parser.add_argument("--top", type=int, default=12, help="ensembles to list, best on validation first")
    parser.add_argument("--output", default=None, help="also write every ensemble's scores here (JSON)")
    return parser


def probabilities(run: Path, split: str, max_count: int, tta: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys, true counts and class probabilities of one model on one split, through predict_fn."""
    samples = [s for s in datasets.list_samples(str(run / "split" / split)) if s.count <= max_count]
    with tempfile.TemporaryDirectory() as workdir:
        model = evaluate.open_model(run / "model-default", Path(workdir))
        model["card"]["test_time_augmentation"] = tta
        predictions = evaluate.predict_counts(model, samples, 64)
    return (
        [s.key for s in samples],
        torch.tensor([s.count for s in samples]),
        torch.tensor([p["probabilities"] for p in predictions]),
    )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    runs = [Path(r) for r in args.runs]
    scored: dict[str, dict[str, tuple]] = {}
    for run in runs:
        for split in ("validation", "test"):
            scored.setdefault(run.name, {})[split] = probabilities(run, split, args.max_count, args.tta)
            print(f"scored {run.name} on {split}", flush=True)
    for split in ("validation", "test"):
        keys = {tuple(scored[r.name][split][0]) for r in runs}
        if len(keys) != 1:
            raise SystemExit(f"the runs were not trained on the same split: their {split} images differ")
    rows = []
    for size in range(1, len(runs) + 1):
        for combo in itertools.combinations(sorted(scored), size):
            for decoding in inference.DECODINGS:
                row = {"models": list(combo), "decoding": decoding}
                for split in ("validation", "test"):
                    truth = scored[combo[0]][split][1]
                    mean = torch.stack([scored[name][split][2] for name in combo]).mean(0)
                    predicted = inference.decode(mean, decoding)
                    row[split] = metrics.count_metrics(truth.tolist(), predicted.tolist(), args.max_count + 1)
                rows.append(row)
    rows.sort(key=lambda r: (-r["validation"]["accuracy"], r["validation"]["rmse"]))
    print(f"\n| models (TTA {args.tta}) | decoding | validation accuracy / RMSE | test accuracy / RMSE / within 1 |")
    print("| --- | --- | --- | --- |")
    for row in rows[: args.top]:
        v, t = row["validation"], row["test"]
        print(
            f"| {' + '.join(row['models'])} | {row['decoding']} | {v['accuracy']:.3f} / {v['rmse']:.3f} | "
            f"{t['accuracy']:.3f} / {t['rmse']:.3f} / {t['within_1']:.3f} |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
