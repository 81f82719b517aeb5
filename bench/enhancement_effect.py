"""Does contrast enhancement help the counter? Same split, same recipe, with and without it.

  PYTHONPATH=plugins .venv-container/bin/python -m bench.enhancement_effect --abid ../shared/abid \
      --work build/bench-train --methods autocontrast [--with-plain]

Uses the split of bench/train_vs_seed.py (same work folder, same blocks). For each method, every
image of the split is enhanced (train, validation and test alike, as the data-prep DAG does) into
<work>/split-<id>, and the default recipe trains and is scored there. `--with-plain` also trains
on the unenhanced split in the same run. Last line: a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.train_vs_seed import ROOT, prepare_split, run_recipe
from bin_counter.enhance import enhance_image, enhancement_id, resolve


def enhanced_copy(split_dir: Path, out: Path, method: str) -> float:
    started = time.time()
    for image in sorted(split_dir.rglob("*.jpg")):
        target = out / image.relative_to(split_dir)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(enhance_image(image.read_bytes(), method))
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"), help="local ABID mirror")
    parser.add_argument("--work", default="build/bench-train", help="scratch folder (shared with train_vs_seed)")
    parser.add_argument("--methods", default="autocontrast", help="comma-separated enhancement methods")
    parser.add_argument("--with-plain", action="store_true", help="also train on the unenhanced images")
    parser.add_argument("--train-args", default="", help="extra train.py flags (same for every variant)")
    args = parser.parse_args()
    work = Path(args.work)
    split = prepare_split(Path(args.abid), work, 5, 100, 0)
    results = []
    if args.with_plain:
        results.append(run_recipe("plain", split["dir"], work, args.train_args.split()))
    for method in args.methods.split(","):
        ident = enhancement_id(method)
        out = work / f"split-{ident}"
        seconds = enhanced_copy(split["dir"], out, method)
        result = run_recipe(ident, out, work, args.train_args.split())
        result.update({"method": method, "params": resolve(method), "enhance_seconds": round(seconds, 1)})
        results.append(result)
    for r in results:
        t = r["test"]
        print(f"| {r['recipe']} | {t['n']} | {t['accuracy']:.3f} | {t['rmse']:.3f} | {t['within_1']:.3f} |")
    (work / "enhancement-results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
