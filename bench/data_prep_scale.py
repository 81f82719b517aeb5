"""Data preparation at scale: the data-prep DAG's tasks on generated catalogues of growing size, each
task in its own process as an Airflow worker runs it, with its wall time and peak memory; then, at the
smallest size, a dataset of manifests against one of copied photos, for the split and for what a
training job downloads.

  PYTHONPATH=plugins .venv/bin/python -m bench.data_prep_scale --sizes 10000 30000 100000 --shard-size 5000

The catalogue is an ABID-layout folder of small generated photos (64 px JPEGs, about 1 KB) with their
metadata; the bucket is a moto server this script starts on loopback; the operators are the DAG's own,
reading and writing through the Airflow connection as in a run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench"


def write_catalogue(root: Path, size: int, seed: int = 0) -> Path:
    """`size` keys of small generated photos (0-5 coloured squares) and their metadata."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "bin-images").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for i in range(size):
        key = f"{i:06d}"
        count = rng.randint(0, 5)
        image = Image.new("RGB", (64, 64), (rng.randint(0, 80),) * 3)
        draw = ImageDraw.Draw(image)
        for _ in range(count):
            x, y = rng.randint(0, 52), rng.randint(0, 52)
            draw.rectangle((x, y, x + 10, y + 10), fill=(rng.randint(100, 255), rng.randint(100, 255), 90))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        (root / "bin-images" / f"{key}.jpg").write_bytes(buf.getvalue())
        (root / "metadata" / f"{key}.json").write_text(json.dumps({"EXPECTED_QUANTITY": count, "BIN_FCSKU_DATA": {}}))
    return root


# -- one task, in the process this script starts for it ------------------------------------------------------
def run_task(spec: dict) -> dict:
    """Execute one operator as a worker would (without the scheduler): its result, wall time, peak RSS."""
    from bin_counter import data_prep_operators as operators

    started = time.perf_counter()
    kind = spec.pop("operator")
    if kind == "copy_split":  # the layout of earlier releases, for the comparison
        result = copy_split(**spec)
    else:
        result = getattr(operators, kind)(task_id=kind, **spec).execute(context={})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"result": result, "seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_mb, 1)}


def copy_split(bucket: str, keys_path: str, version: str) -> dict:
    """The split as earlier releases wrote it: every photo read and written under the dataset."""
    from bin_counter import abid, split
    from bin_counter.data_prep_operators import _s3_client, _store

    client = _s3_client("aws_default")
    counts = json.loads(_store(client, bucket, "abid/raw").read(keys_path))
    records = [abid.Record(k, int(c)) for k, c in counts.items()]
    assignment = split.assign_splits(records)
    rows = split.write_split_layout(
        records, assignment, _store(client, bucket, "abid/raw"), _store(client, bucket, f"datasets/{version}"), "raw"
    )
    return {"images": len(rows)}


def in_process(spec: dict, env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.data_prep_scale", "--task", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{spec['operator']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the runs -------------------------------------------------------------------------------------------------
def prepare(size: int, source: Path, shard_size: int, env: dict) -> dict:
    """select, every fetch shard, report, split (manifests), one process each, one after the other."""
    from bin_counter.dataset import split_parameters

    common = {"bucket": BUCKET, "source": str(source), "subset": "key_range"}
    timings: dict = {"keys": size}
    select = in_process(
        {"operator": "AbidSelectOperator", **common, "key_range": f"000000:{size:06d}", "shard_size": shard_size}, env
    )
    shards = select["result"]
    fetches = [in_process({"operator": "AbidFetchOperator", **common, "shard": shard}, env) for shard in shards]
    report = in_process(
        {
            "operator": "FetchReportOperator",
            "bucket": BUCKET,
            "shards": [f["result"] for f in fetches],
            "max_bad_share": 0.0,
        },
        env,
    )
    keys_path = report["result"]["keys_path"]
    split = in_process(
        {
            "operator": "BlockSplitOperator",
            "bucket": BUCKET,
            "keys_prefix": "abid/raw",
            "keys_path": keys_path,
            "image_prefix": "abid/raw",
            "dataset": {"version": f"v-{size}", "split": split_parameters()},
        },
        env,
    )
    fetch_seconds = [f["seconds"] for f in fetches]
    timings.update(
        {
            "shards": len(shards),
            "select": {k: select[k] for k in ("seconds", "peak_rss_mb")},
            "fetch_per_shard": {
                "seconds_mean": round(sum(fetch_seconds) / len(fetch_seconds), 2),
                "seconds_max": max(fetch_seconds),
                "peak_rss_mb_max": max(f["peak_rss_mb"] for f in fetches),
            },
            "fetch_task_seconds_total": round(sum(fetch_seconds), 1),
            "report": {k: report[k] for k in ("seconds", "peak_rss_mb")},
            "split_manifests": {k: split[k] for k in ("seconds", "peak_rss_mb")},
            "keys_path": keys_path,
        }
    )
    timings["sequential_wall_s"] = round(sum(t["seconds"] for t in (select, report, split)) + sum(fetch_seconds), 1)
    return timings


def compare_layouts(size: int, keys_path: str, env: dict, work: Path) -> dict:
    """The split, and a training channel's download, for a manifest dataset against a copied one."""
    import boto3

    from standin.sagemaker.training import download_channel

    copied = in_process(
        {"operator": "copy_split", "bucket": BUCKET, "keys_path": keys_path, "version": f"copied-{size}"}, env
    )
    s3 = boto3.client("s3", endpoint_url=env["BENCH_MOTO"], region_name="us-east-1")
    downloads = {}
    for name, source in (
        ("manifest", {"S3DataType": "ManifestFile", "S3Uri": f"s3://{BUCKET}/datasets/v-{size}/train.manifest"}),
        ("copied", {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/datasets/copied-{size}/train/"}),
    ):
        started = time.perf_counter()
        objects = download_channel(s3, {"DataSource": {"S3DataSource": source}}, work / f"channel-{name}")
        downloads[name] = {"objects": objects, "seconds": round(time.perf_counter() - started, 1)}
    return {"split_copied": {k: copied[k] for k in ("seconds", "peak_rss_mb")}, "train_channel_download": downloads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000], help="catalogue sizes (keys)")
    parser.add_argument("--shard-size", type=int, default=5000, help="keys per fetch task (the DAG's shard_size)")
    parser.add_argument("--work", default="", help="where the catalogues and channels go (default: a temporary folder)")
    parser.add_argument("--no-compare", action="store_true", help="skip the manifest-against-copy comparison")
    parser.add_argument("--task", default="", help=argparse.SUPPRESS)  # internal: run one task in this process
    args = parser.parse_args()
    if args.task:
        print(json.dumps(run_task(json.loads(args.task))))
        return

    from standin.launch import airflow_connection, start_moto

    work = Path(args.work or tempfile.mkdtemp(prefix="data-prep-scale-"))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    results: dict = {"shard_size": args.shard_size, "runs": []}
    for size in args.sizes:
        source = work / f"catalogue-{size}"
        if not (source / "metadata").is_dir():
            started = time.perf_counter()
            write_catalogue(source, size)
            print(f"catalogue of {size} keys in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        # A fresh bucket per size: a catalogue's fetch must not find an earlier one's keys there.
        proc, endpoint = start_moto()
        try:
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]),
                "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(airflow_connection(endpoint, login=None)),
                "BENCH_MOTO": endpoint,
            }
            run = prepare(size, source, args.shard_size, env)
            if not args.no_compare and size == min(args.sizes):
                run["layouts"] = compare_layouts(size, run["keys_path"], env, work / f"channels-{size}")
            results["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
