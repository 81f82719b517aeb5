"""Train the published model's recipe on the key-block split of a local ABID mirror.

  PYTHONPATH=plugins .venv-container/bin/python -m scripts.train_published_model --abid ../shared/abid \\
      --work build/model [-- more train.py flags]

`make model` runs this, then scripts/publish_model.py on <work>/model with the test photos of
<work>/split/test. The split: the mirror's photos with 0 to 5 items, dealt by blocks of
100 consecutive keys (bin_counter.split.assign_splits, seed 0, stratified by count) and copied into
<work>/split/<train|validation|test>/<count>/<key>.jpg. The recipe: train.py's defaults with
RECIPE's flags; train.py trains on train, keeps the epoch with the best validation accuracy and
scores the held-out test blocks, which no training step sees. Flags after `--` go to train.py after
the recipe's (the last of a repeated flag wins). Prints a JSON summary as its last line.
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
RECIPE = ("--epochs", "10")  # the published model: train.py's defaults, 10 epochs instead of 6


def prepare_split(
    abid: Path, work: Path, max_count: int = 5, block_size: int = 100, seed: int = 0, train_above_max: bool = False
) -> dict:
    """The key-block split of the mirror's photos with 0 to `max_count` items, written to <work>/split.
    `train_above_max` also puts photos with more items into train (from blocks already dealt to train,
    so validation and test stay the same). Returns the folder and the photos per split and count."""
    every = read_local_records(abid)
    records = [r for r in every if r.count <= max_count]
    # The split is drawn from the 0..max-count photos alone, so it is the same with or without extras.
    assignment = assign_splits(records, DEFAULT_SHARES, block_size, seed)
    if train_above_max:
        block_split = {key_block(key, block_size): split for key, split in assignment.items()}
        extra = [r for r in every if r.count > max_count and block_split.get(key_block(r.key, block_size)) == "train"]
        assignment.update({r.key: "train" for r in extra})
        records += extra
    split_dir = work / "split"
    write_split_layout(records, assignment, LocalStore(abid), LocalStore(split_dir, create=True), str(abid), block_size)
    return {"dir": split_dir, "summary": summarize(records, assignment)}


def run_train(split_dir: Path, model_dir: Path, flags: list[str]) -> dict:
    """train.py on the split's three folders into `model_dir`; its card's test metrics and the time."""
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
    return {
        "model_dir": str(model_dir),
        "flags": " ".join(flags),
        "train_seconds": round(seconds, 1),
        "best_epoch": card["metrics"]["best_epoch"],
        "test": card["metrics"]["test"],
        "images": card["data"]["images"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"), help="local ABID mirror")
    parser.add_argument("--work", default="build/model", help="folder for split/ and model/")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: more train.py flags")
    args = parser.parse_args(argv)
    extra = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    split = prepare_split(Path(args.abid), work)
    print(f"split (photos per count): {json.dumps(split['summary'])}", flush=True)
    result = run_train(split["dir"], work / "model", [*RECIPE, *extra])
    print(json.dumps({"split": split["summary"], **result}))


if __name__ == "__main__":
    main()
