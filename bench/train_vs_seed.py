"""Train the default recipe and the seed's recipe on the same key-block split of real ABID images.

  PYTHONPATH=plugins .venv-container/bin/python -m bench.train_vs_seed --abid ../shared/abid --work /tmp/bench-train

Both recipes train on the same train/validation blocks and are scored on the same held-out test
blocks, counts 0 to 5, in one run, one after the other. The split and each training run are
scripts/train_published_model.py's (`make model` runs it with the published recipe). The seed
fine-tuned only the last layer of an ImageNet ResNet34; where ResNet34's ImageNet weights cannot be
downloaded, `--seed-arch mobilenet_v2` (the default here) stands in for it with the same "head only"
recipe. `--only default --default-args "..."` trains one variant of the default recipe (the accuracy
experiments in BENCHMARKS.md).
Prints a JSON summary as its last line and writes it to <work>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.train_published_model import ROOT, prepare_split, run_train


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"), help="local ABID mirror")
    parser.add_argument("--work", default="build/bench-train", help="scratch folder for the split and models")
    parser.add_argument("--max-count", type=int, default=5, help="top count class")
    parser.add_argument("--block-size", type=int, default=100, help="keys per split block")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the block split")
    parser.add_argument("--seed-arch", default="mobilenet_v2", help="backbone for the seed's head-only recipe")
    parser.add_argument("--seed-epochs", type=int, default=6, help="epochs of the seed recipe")
    parser.add_argument("--seed-lr", type=float, default=3e-3, help="learning rate of the seed recipe")
    parser.add_argument("--default-args", default="", help="extra train.py flags for the default recipe")
    parser.add_argument("--only", choices=("seed", "default"), default=None, help="run one recipe only")
    parser.add_argument(
        "--train-above-max",
        action="store_true",
        help="also put images with more than --max-count items into the training split (blocks "
        "already assigned to train only, so validation and test stay the same); pair with "
        "--default-args '--above-max clip'",
    )
    return parser


def run_recipe(name: str, split_dir: Path, work: Path, flags: list[str]) -> dict:
    return {"recipe": name, **run_train(split_dir, work / f"model-{name}", flags)}


def main() -> None:
    args = get_args_parser().parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    split = prepare_split(Path(args.abid), work, args.max_count, args.block_size, args.split_seed, args.train_above_max)
    print(f"split (images per count): {json.dumps(split['summary'])}", flush=True)
    recipes = {
        "seed": [
            "--arch",
            args.seed_arch,
            "--mode",
            "head",
            "--weights",
            "imagenet",
            "--epochs",
            str(args.seed_epochs),
            "--lr",
            str(args.seed_lr),
            "--label-smoothing",
            "0",
            "--augment",
            "false",
        ],
        "default": args.default_args.split(),
    }
    results = [
        run_recipe(name, split["dir"], work, flags) for name, flags in recipes.items() if args.only in (None, name)
    ]
    summary = {"split": split["summary"], "results": results}
    (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        t = r["test"]
        print(
            f"| {r['recipe']} | {t['n']} | {t['accuracy']:.3f} | {t['rmse']:.3f} | {t['within_1']:.3f} "
            f"| {r['train_seconds'] / 60:.1f} min |"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
