"""Photos per second through a batch transform job against the same photos through the public API
with concurrent clients, same model, same run; and how good the batch report's verdicts are.

  PYTHONPATH=plugins .venv/bin/python -m bench.batch_vs_api --model models/bin-counter.tar.gz \\
      --abid ../shared/abid --photos 2000 --clients 4

Starts a moto server and the stand-in on loopback, serves the model at an endpoint behind the API
function, and uploads --photos mirror photos in ABID's layout: the held-out test photos of the
accuracy experiments' key-block split first (blocks of 100 keys, seed 0, counts 0 to 5: the
published model never trained on them), then other keys in order. Then, one after the other:
  1. the API: every photo once through POST /count (gateway -> Lambda -> endpoint), --clients at a time;
  2. the batch count as bin_count_batch runs it (batch.prepare, one transform job with
     MaxConcurrentTransforms = --clients, batch.write_report), with an expected-counts CSV that is
     right for every other photo and one off (or two) for the rest.
The verdicts' quality is read from that report: of the wrong expectations, the share flagged
`mismatch` (caught); of the right ones, the share flagged `mismatch` (false alarms); the API's
thresholds. Prints one JSON line per phase and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

from bench.stack import API_KEY, ENDPOINT, api_stack
from bin_counter import batch
from bin_counter.abid import key_block, read_local_records
from bin_counter.api_load import gateway_sender
from bin_counter.sagemaker_config import transform_job_config
from bin_counter.split import DEFAULT_SHARES, assign_splits

PREFIX = "audits/bench/"


def choose_photos(abid: Path, count: int, max_count: int = 5) -> tuple[list, set[str]]:
    """The test split's photos first, then others in key order; and the test split's keys."""
    records = [r for r in read_local_records(abid) if r.count <= max_count]
    assignment = assign_splits(records, DEFAULT_SHARES, 100, 0)
    test = sorted((r for r in records if assignment[r.key] == "test"), key=lambda r: r.key)
    rest = sorted((r for r in records if assignment[r.key] != "test"), key=lambda r: (key_block(r.key, 100), r.key))
    chosen = (test + rest)[:count]
    return chosen, {r.key for r in test}


def wrong_count(true: int, index: int, top: int) -> int:
    """One off for most, two off for every fourth; within 0..top."""
    step = 2 if index % 4 == 3 else 1
    return true + step if true + step <= top else true - step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model.tar.gz as train.py writes it")
    parser.add_argument("--abid", required=True, help="the ABID mirror (bin-images/, metadata/)")
    parser.add_argument("--photos", type=int, default=2000, help="photos counted by each path")
    parser.add_argument(
        "--clients", type=int, default=4, help="API clients at once, and the transform job's MaxConcurrentTransforms"
    )
    parser.add_argument("--instances", type=int, default=1, help="the transform job's instance count")
    args = parser.parse_args()
    abid = Path(args.abid)
    photos, test_keys = choose_photos(abid, args.photos)
    if not photos:
        raise SystemExit(f"no photos in {abid}")

    rows = []
    with api_stack(Path(args.model), "bench-batch-") as stack:
        url, s3 = stack.url, stack.s3
        expected_lines = ["key,expected"]
        truth: dict[str, tuple[int, int, bool]] = {}  # key -> (true, expected, in the test split)
        for index, record in enumerate(photos):
            s3.put_object(
                Bucket="bench",
                Key=f"{PREFIX}bin-images/{record.key}.jpg",
                Body=(abid / "bin-images" / f"{record.key}.jpg").read_bytes(),
            )
            expected = record.count if index % 2 == 0 else wrong_count(record.count, index // 2, 5)
            expected_lines.append(f"{record.key},{expected}")
            truth[f"{PREFIX}bin-images/{record.key}.jpg"] = (record.count, expected, record.key in test_keys)
        s3.put_object(Bucket="bench", Key="lists/expected.csv", Body="\n".join(expected_lines).encode())

        # 1. The API, every photo once, --clients at a time (warmed first: Lambda environments, the model).
        files = [abid / "bin-images" / f"{r.key}.jpg" for r in photos]
        send = gateway_sender(f"{url}/count", API_KEY, files)
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(send, range(args.clients * 2)))
            started = time.time()
            statuses = list(pool.map(send, range(len(files))))
        seconds = time.time() - started
        api = {
            "path": f"API, {args.clients} clients (POST /count)",
            "photos": len(files),
            "answered_200": statuses.count(200),
            "seconds": round(seconds, 1),
            "photos_per_s": round(len(files) / seconds, 2),
        }
        print(json.dumps(api), flush=True)
        rows.append(api)

        # 2. The batch count, as bin_count_batch's tasks run it.
        sm = boto3.client("sagemaker", endpoint_url=url)
        started = time.time()
        plan = batch.prepare(
            s3, f"s3://bench/{PREFIX}bin-images/", "s3://bench/batch-counts/bench/", "s3://bench/lists/expected.csv", 6
        )
        config = transform_job_config(
            "bin-counter-bench-batch",
            ENDPOINT,
            plan["manifest_uri"],
            plan["transform_output_uri"],
            "ml.m5.xlarge",
            args.instances,
            args.clients,
            6,
            environment=batch.REFUSALS_ENVIRONMENT,
        )
        sm.create_transform_job(**config)
        while (job := sm.describe_transform_job(TransformJobName="bin-counter-bench-batch"))["TransformJobStatus"] in (
            "InProgress",
            "Stopping",
        ):
            time.sleep(1)
        if job["TransformJobStatus"] != "Completed":
            raise SystemExit(f"the transform job ended {job['TransformJobStatus']}: {job.get('FailureReason')}")
        summary = batch.write_report(s3, plan, job, {"model": ENDPOINT})
        seconds = time.time() - started
        job_s = (job["TransformEndTime"] - job["TransformStartTime"]).total_seconds()
        batch_row = {
            "path": f"batch transform, MaxConcurrentTransforms {args.clients}, {args.instances} instance(s)",
            "photos": summary["photos"],
            "answered_200": summary["counted"],
            "seconds": round(seconds, 1),
            "photos_per_s": round(summary["photos"] / seconds, 2),
            "job_seconds": round(job_s, 1),
        }
        print(json.dumps(batch_row), flush=True)
        rows.append(batch_row)

        report = [
            json.loads(line)
            for line in s3.get_object(Bucket="bench", Key="batch-counts/bench/report.jsonl")["Body"]
            .read()
            .decode()
            .splitlines()
        ]
        quality = {}
        for subset, keep in (("test split", lambda k: truth[k][2]), ("all photos", lambda k: True)):
            chosen = [r for r in report if keep(r["key"]) and r.get("verdict") not in (None, "failed")]
            right = [r for r in chosen if r["expected"] == truth[r["key"]][0]]
            wrong = [r for r in chosen if r["expected"] != truth[r["key"]][0]]
            quality[subset] = {
                "photos": len(chosen),
                "accuracy": round(sum(r["count"] == truth[r["key"]][0] for r in chosen) / len(chosen), 4),
                "right_expected": len(right),
                "false_alarms": round(sum(r["verdict"] == "mismatch" for r in right) / len(right), 3),
                "right_matched": round(sum(r["verdict"] == "match" for r in right) / len(right), 3),
                "wrong_expected": len(wrong),
                "caught": round(sum(r["verdict"] == "mismatch" for r in wrong) / len(wrong), 3),
                "wrongly_matched": round(sum(r["verdict"] == "match" for r in wrong) / len(wrong), 3),
            }
        print(json.dumps({"verdicts": quality}), flush=True)
    print("| path | photos | answered | seconds | photos/s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['path']} | {row['photos']} | {row['answered_200']} | {row['seconds']} | {row['photos_per_s']} |")
    print("\n| photos | accuracy | right expectations: false alarms / matched | wrong ones: caught / wrongly matched |")
    print("| --- | --- | --- | --- |")
    for subset, q in quality.items():
        print(
            f"| {subset} ({q['photos']}) | {q['accuracy']} | {q['false_alarms']} / {q['right_matched']} "
            f"| {q['caught']} / {q['wrongly_matched']} |"
        )


if __name__ == "__main__":
    main()
