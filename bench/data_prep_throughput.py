"""Data-prep throughput: fetch from the local mirror into a moto S3 server, concurrent against
sequential, side by side; then enhancement and split of the whole mirror, S3 to S3.

  PYTHONPATH=plugins .venv/bin/python -m bench.data_prep_throughput --abid ../shared/abid [--fetch-keys 2000]

Everything goes over real HTTP to a moto server this script starts on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import boto3

from bin_counter import abid, enhance, fetch, split
from standin.launch import start_moto

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"), help="local ABID mirror")
    parser.add_argument("--fetch-keys", type=int, default=2000, help="keys for the fetch comparison")
    parser.add_argument("--workers", type=int, default=8, help="the fetch's default concurrency")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc, endpoint = start_moto()
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        source = abid.LocalStore(args.abid)
        all_keys = [r.key for r in abid.read_local_records(args.abid)]
        subset = all_keys[: args.fetch_keys]
        results = {"images_in_mirror": len(all_keys), "fetch_keys": len(subset)}
        for name, workers in (("sequential", 1), (f"concurrent_{args.workers}", args.workers)):
            started = time.perf_counter()
            report = fetch.fetch_subset(source, subset, abid.S3Store("bench", f"fetch-{name}", s3), workers=workers)
            seconds = time.perf_counter() - started
            rate = round(len(report.fetched) / seconds, 1)
            results[f"fetch_{name}"] = {"seconds": round(seconds, 1), "images_per_s": rate}
        results["fetch_speedup"] = round(
            results[f"fetch_concurrent_{args.workers}"]["images_per_s"] / results["fetch_sequential"]["images_per_s"], 2
        )

        raw = abid.S3Store("bench", "raw", s3)
        started = time.perf_counter()
        report = fetch.fetch_subset(source, all_keys, raw, workers=args.workers)
        results["fetch_whole_mirror_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        enhance.enhance_keys(raw, abid.S3Store("bench", "enhanced", s3), all_keys, "autocontrast")
        results["enhance_whole_mirror_autocontrast_s"] = round(time.perf_counter() - started, 1)
        records = [abid.Record(k, c) for k, c in report.counts.items()]
        started = time.perf_counter()
        assignment = split.assign_splits(records)
        split.write_split_layout(
            records, assignment, abid.S3Store("bench", "enhanced", s3), abid.S3Store("bench", "dataset", s3), "bench"
        )
        results["split_whole_mirror_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(results))
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
