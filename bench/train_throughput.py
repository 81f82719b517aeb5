"""Training throughput of the final recipe against the naive version of it, side by side in one run.

  .venv-container/bin/python -m bench.train_throughput --train build/bench-train/split/train --images 640
  .venv-container/bin/python -m bench.train_throughput --train ... --compare processes

--compare processes: one process against two under torchrun (SageMaker's torch_distributed), at the
same global batch (each of the two takes half of --batch-size), the defaults otherwise.

naive: fp32 (`--amp off`), every image decoded again in every epoch (`--cache none`), the same
model, batch and image size otherwise. final: the defaults (bf16 autocast where the CPU has it,
images decoded once into a uint8 memory cache, channels-last). Both train on the same images for
the same epochs; the table gives training images per second of the last epoch, and the wall time
of the whole run (decoding included).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "sagemaker_code" / "train.py"
VARIANTS = {"naive (fp32, decode every epoch)": ["--amp", "off", "--cache", "none"], "final (defaults)": []}
TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


def variants(compare: str, batch_size: int) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (what comes before train.py, its flags)."""
    if compare == "processes":
        return {"one process": ([], ["--batch-size", str(batch_size)]),
                "two processes (torchrun)": (TORCHRUN, ["--batch-size", str(batch_size // 2)])}
    return {name: ([], flags) for name, flags in VARIANTS.items()}


def subset(train_dir: Path, images: int, out: Path) -> int:
    """Every n-th image of each count folder, `images` in all, copied into `out`."""
    files = sorted(train_dir.rglob("*.jpg"))
    step = max(1, len(files) // images)
    chosen = files[::step][:images]
    for path in chosen:
        target = out / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="a training split folder (<count>/<key>.jpg)")
    parser.add_argument("--images", type=int, default=640, help="images taken from --train")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant")
    parser.add_argument("--extra", default="", help="more train.py flags for both (e.g. --arch efficientnet_lite0)")
    parser.add_argument("--compare", choices=("recipe", "processes"), default="recipe",
                        help="recipe: naive against final; processes: one process against two under torchrun")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size (--compare processes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train"
        n = subset(Path(args.train), args.images, data)
        rows = []
        for name, (launcher, flags) in variants(args.compare, args.batch_size).items():
            command = [sys.executable, *launcher, str(TRAIN), "--train", str(data), "--epochs", str(args.epochs),
                       "--model-dir", str(Path(tmp) / "model"), "--warmup-epochs", "0", *flags, *args.extra.split()]
            started = time.time()
            run = subprocess.run(command, capture_output=True, text=True, check=True)
            wall = time.time() - started
            rates = [float(x) for x in re.findall(r"images_per_s=([\d.]+)", run.stdout)]
            rows.append({"variant": name, "images": n, "epochs": args.epochs, "last_epoch_images_per_s": rates[-1],
                         "wall_s": round(wall, 1), "flags": " ".join(flags)})
            print(json.dumps(rows[-1]), flush=True)
    print("| variant | images per s (last epoch) | wall time, whole run |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['last_epoch_images_per_s']} | {row['wall_s']} s |")
    print(f"speed-up: {rows[1]['last_epoch_images_per_s'] / rows[0]['last_epoch_images_per_s']:.2f}x per epoch, "
          f"{rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x whole run")


if __name__ == "__main__":
    main()
