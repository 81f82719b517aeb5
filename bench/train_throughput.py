"""Training throughput of the final recipe against the naive version of it, side by side in one run.

  .venv-container/bin/python -m bench.train_throughput --train build/bench-train/split/train --images 640
  .venv-container/bin/python -m bench.train_throughput --train ... --compare processes

--compare processes: one process against two under torchrun (SageMaker's torch_distributed), at the
same global batch (each of the two takes half of --batch-size), the defaults otherwise.

--compare cache: the memory cache (every photo decoded once, held as uint8) against streaming
(`--cache none`: decoded again in every epoch by `--workers` DataLoader processes), the defaults
otherwise, at each of the --images counts; with the peak memory (PSS) of the run's processes, which
grows with the photos for the cache and stays flat for streaming.

naive: fp32 (`--amp off`), every image decoded again in every epoch (`--cache none`), the same
model, batch and image size otherwise. final: the defaults (bf16 autocast where the CPU has it,
images decoded once into a uint8 memory cache, channels-last). Both train on the same images for
the same epochs; the table gives training images per second of the last epoch, and the wall time
of the whole run (decoding included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import descendants, memory_mb

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "sagemaker_code" / "train.py"
VARIANTS = {"naive (fp32, decode every epoch)": ["--amp", "off", "--cache", "none"], "final (defaults)": []}
TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


def variants(compare: str, batch_size: int, workers: int = 2) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (what comes before train.py, its flags)."""
    if compare == "cache":
        return {
            "memory cache": ([], ["--cache", "memory"]),
            f"streaming ({workers} decoding workers)": ([], ["--cache", "none", "--workers", str(workers)]),
        }
    if compare == "processes":
        return {
            "one process": ([], ["--batch-size", str(batch_size)]),
            "two processes (torchrun)": (TORCHRUN, ["--batch-size", str(batch_size // 2)]),
        }
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
    parser.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=[640],
        help="images taken from --train (several: each variant at each count)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant")
    parser.add_argument("--extra", default="", help="more train.py flags for both (e.g. --arch efficientnet_lite0)")
    parser.add_argument(
        "--compare",
        choices=("recipe", "processes", "cache"),
        default="recipe",
        help="recipe: naive against final; processes: one process against two under torchrun; "
        "cache: the memory cache against streaming",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size (--compare processes)")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers of the streaming variant")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for images in args.images:
            data = Path(tmp) / f"train-{images}"
            n = subset(Path(args.train), images, data)
            for name, (launcher, flags) in variants(args.compare, args.batch_size, args.workers).items():
                command = [
                    sys.executable,
                    *launcher,
                    str(TRAIN),
                    "--train",
                    str(data),
                    "--epochs",
                    str(args.epochs),
                    "--model-dir",
                    str(Path(tmp) / "model"),
                    "--warmup-epochs",
                    "0",
                    *flags,
                    *args.extra.split(),
                ]
                started = time.time()
                stdout, peak = run_measured(command)
                wall = time.time() - started
                rates = [float(x) for x in re.findall(r"images_per_s=([\d.]+)", stdout)]
                rows.append(
                    {
                        "variant": name,
                        "images": n,
                        "epochs": args.epochs,
                        "last_epoch_images_per_s": rates[-1],
                        "wall_s": round(wall, 1),
                        "peak_pss_mb": peak["pss_mb"],
                        "processes": peak["processes"],
                        "flags": " ".join(flags),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print("| variant | images | images per s (last epoch) | wall time, whole run | peak memory (PSS) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['variant']} | {row['images']} | {row['last_epoch_images_per_s']} | {row['wall_s']} s | "
            f"{row['peak_pss_mb']} MB ({row['processes']} processes) |"
        )
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        print(
            f"{first['images']} images: {second['variant']} against {first['variant']}: "
            f"{second['last_epoch_images_per_s'] / first['last_epoch_images_per_s']:.2f}x per epoch, "
            f"{first['wall_s'] / second['wall_s']:.2f}x whole run"
        )


def run_measured(command: list[str]) -> tuple[str, dict]:
    """Run `command`, sampling the memory of it and its children (DataLoader workers, torchrun's
    processes) every 0.2 s: its output and the peak."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        peak = {"processes": 0, "rss_mb": 0, "pss_mb": 0}
        while process.poll() is None:
            with contextlib.suppress(OSError, StopIteration):  # a process ended while it was read
                peak = max(peak, memory_mb([process.pid, *descendants(process.pid)]), key=lambda m: m["pss_mb"])
            time.sleep(0.2)
        out.seek(0)
        stdout = out.read()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stdout[-3000:]}")
    return stdout, peak


if __name__ == "__main__":
    main()
