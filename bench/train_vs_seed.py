"""Train the default recipe and the seed's recipe on the same key-block split of real ABID images.

  PYTHONPATH=plugins .venv-container/bin/python -m bench.train_vs_seed --abid ../shared/abid --work /tmp/bench-train

Both recipes train on the same train/validation blocks and are scored on the same held-out test
blocks, counts 0 to 5, in one run, one after the other. The seed fine-tuned only the last layer of
an ImageNet ResNet34; where ResNet34's ImageNet weights cannot be downloaded, `--seed-arch
mobilenet_v2` (the default here) stands in for it with the same "head only" recipe.
Prints a JSON summary as its last line and writes it to <work>/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bin_counter.abid import LocalStore, key_block, read_local_records
from bin_counter.split import DEFAULT_SHARES, assign_splits, summarize, write_split_layout

ROOT = Path(__file__).resolve().parents[1]

TRAIN = ROOT / "sagemaker_code" / "train.py"


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


def prepare_split(
    abid: Path, work: Path, max_count: int, block_size: int, seed: int, train_above_max: bool = False
) -> dict:
    every = read_local_records(abid)
    records = [r for r in every if r.count <= max_count]
    # The split is drawn from the 0..max-count images alone, so it is the same with or without extras.
    assignment = assign_splits(records, DEFAULT_SHARES, block_size, seed)
    if train_above_max:
        block_split = {key_block(key, block_size): split for key, split in assignment.items()}
        extra = [r for r in every if r.count > max_count and block_split.get(key_block(r.key, block_size)) == "train"]
        assignment.update({r.key: "train" for r in extra})
        records += extra
    split_dir = work / "split"
    write_split_layout(records, assignment, LocalStore(abid), LocalStore(split_dir, create=True), str(abid), block_size)
    return {"dir": split_dir, "summary": summarize(records, assignment)}


def run_recipe(name: str, split_dir: Path, work: Path, flags: list[str]) -> dict:
    model_dir = work / f"model-{name}"
    command = [
        sys.executable,
        str(TRAIN),
        "--train",
        str(split_dir / "train"),
        "--validation",
        str(split_dir / "validation"),
        "--test",
        str(split_dir / "test"),
        "--model-dir",
        str(model_dir),
        *flags,
    ]
    print("$", " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, check=True)
    seconds = time.time() - started
    card = json.loads((model_dir / "model_card.json").read_text())
    test = card["metrics"]["test"]
    return {
        "recipe": name,
        "flags": " ".join(flags),
        "train_seconds": round(seconds, 1),
        "best_epoch": card["metrics"]["best_epoch"],
        "test": test,
        "images": card["data"]["images"],
    }


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
