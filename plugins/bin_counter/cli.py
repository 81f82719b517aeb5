"""Command line for the data functions, for use without Airflow (the demo, benchmarks, by hand).

python -m bin_counter.cli fetch --source s3://aft-vbi-pds --keys 01000:01600 --dest data/abid
python -m bin_counter.cli fetch --source ../shared/abid --file-list --counts 1,2,3 --limit 300 --dest data/abid
python -m bin_counter.cli split --abid data/abid --out data/split --max-count 5
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from bin_counter import abid, fetch, split


def parse_key_range(text: str) -> list[str]:
    """abid.parse_key_range for argparse: its message as the usage error."""
    try:
        return abid.parse_key_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_shares(text: str) -> dict[str, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != len(split.SPLITS):
        raise argparse.ArgumentTypeError("expected three shares: train,validation,test")
    return dict(zip(split.SPLITS, parts, strict=True))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bin_counter.cli", description="ABID data preparation")
    commands = parser.add_subparsers(dest="command", required=True)

    f = commands.add_parser("fetch", help="copy an ABID subset into a local folder, checking every file")
    f.add_argument(
        "--source",
        default=abid.PUBLIC_SOURCE,
        help="s3://bucket[/prefix], https://... or a local folder in the ABID layout",
    )
    which = f.add_mutually_exclusive_group(required=True)
    which.add_argument("--keys", type=parse_key_range, help="consecutive keys START:STOP, e.g. 01000:01600")
    which.add_argument("--file-list", action="store_true", help="keys from the source's file_list.json")
    f.add_argument("--counts", default=None, help="with --file-list: only these counts, e.g. 1,2,3")
    f.add_argument("--limit", type=int, default=None, help="with --file-list: at most this many keys")
    f.add_argument("--seed", type=int, default=0, help="with --file-list and --limit: which keys are drawn")
    f.add_argument("--dest", required=True, help="local folder; written in the ABID layout")
    f.add_argument("--workers", type=int, default=8, help="parallel downloads")
    f.add_argument(
        "--max-bad-share", type=float, default=0.5, help="fail when more than this share of keys is missing or invalid"
    )
    f.add_argument("--report", default=None, help="write the fetch report (JSON) here")

    s = commands.add_parser("split", help="split a local ABID folder into train/validation/test by key blocks")
    s.add_argument("--abid", required=True, help="local folder in the ABID layout")
    s.add_argument("--out", required=True, help="output: <split>/<count>/<key>.jpg and manifest.csv")
    s.add_argument("--shares", type=parse_shares, default=split.DEFAULT_SHARES, help="train,validation,test")
    s.add_argument("--block-size", type=int, default=split.DEFAULT_BLOCK_SIZE, help="consecutive keys per block")
    s.add_argument("--max-count", type=int, default=None, help="leave out images with more items than this")
    s.add_argument("--seed", type=int, default=0, help="seed of the block assignment")
    return parser


def run_fetch(args: argparse.Namespace) -> dict:
    source = abid.open_source(args.source)
    if args.keys:
        keys = args.keys
    else:
        by_count = abid.file_list_from(source)
        counts = [int(c) for c in args.counts.split(",")] if args.counts else None
        keys = abid.select_keys(by_count, counts, args.limit, args.seed)
    report = fetch.fetch_subset(source, keys, args.dest, workers=args.workers, max_bad_share=args.max_bad_share)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return {"summary": report.summary(), "missing": len(report.missing), "invalid": report.invalid}


def run_split(args: argparse.Namespace) -> dict:
    records = abid.read_local_records(args.abid)
    if args.max_count is not None:
        records = [r for r in records if r.count <= args.max_count]
    if not records:
        raise SystemExit(f"no labelled images in {args.abid}")
    assignment = split.assign_splits(records, args.shares, args.block_size, args.seed)
    out = Path(args.out)
    for name in [*split.SPLITS, split.MANIFEST]:  # a previous split of other data must not linger
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    split.write_split_layout(
        records, assignment, abid.LocalStore(args.abid), abid.LocalStore(out, create=True), args.abid, args.block_size
    )
    return {"manifest": str(out / split.MANIFEST), "images": split.summarize(records, assignment)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        result = run_fetch(args) if args.command == "fetch" else run_split(args)
    except (fetch.TooManyBadKeys, fetch.SourceUnavailable, abid.MissingObject, FileNotFoundError, ValueError) as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
