"""The monitor's run time per captured requests: `--requests` requests (10,000 by default) of an hour,
each a small generated photo (64 x 48 px JPEG, about 1 KB) with its answer, written as the stand-in
writes SageMaker's data capture (standin/sagemaker/capture.py: its lines, its key layout, 100 requests
a file) into a moto server's bucket, and each request's API log line in moto's CloudWatch Logs; then
bin_count_monitor's work on that hour, step by step, as its tasks call it: list and read the captures,
read the log lines, assess (join, live accuracy, drift, photo statistics), write the report.

  PYTHONPATH=plugins .venv/bin/python -m bench.monitor_scale --requests 10000 [--photos ../shared/abid/bin-images]

`--photos`: real photos from that folder (in turn) instead of the generated ones.

The baseline (the serving model's card and 200 test photos, read from S3) is left out of the timing:
it does not grow with traffic; its 200 photos' statistics are made here beforehand. moto on loopback
stands in for S3 and CloudWatch Logs, so the reading times are a floor of what AWS takes (no
network), the computing times are what a worker spends.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

BUCKET, ENDPOINT, FUNCTION = "bench", "bench-endpoint", "bench-function"
PER_FILE = 100


def photo(rng: random.Random, count: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 48), (40 + rng.randint(0, 30), 35, 30))
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        x, y = rng.randint(0, 52), rng.randint(0, 36)
        draw.rectangle((x, y, x + 10, y + 10), fill=(rng.randint(150, 255), rng.randint(100, 255), 90))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def generate(s3, logs, n: int, start: datetime, real: list[Path]) -> None:
    """`n` captured requests spread over the hour after `start`, and their API log lines."""
    from bin_counter.capture import data_capture_config, log_group
    from standin.sagemaker.capture import capture_key, capture_line

    rng = random.Random(0)
    config = data_capture_config(BUCKET, 100)
    group = log_group(FUNCTION)
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="bench")
    lines, events = [], []
    for i in range(n):
        when = start + timedelta(seconds=3600 * i / n)
        count = rng.randint(0, 5)
        answered = min(max(count + rng.choice((-1, 0, 0, 0, 1)), 0), 5)
        confidence = round(rng.uniform(0.3, 0.95), 3)
        request_id = str(uuid.uuid4())
        answer = {"predictions": [{"count": answered, "confidence": confidence}], "model_version": "bench"}
        body = real[i % len(real)].read_bytes() if real else photo(rng, count)
        request = (body, "image/jpeg")
        lines.append(
            (when, capture_line(config, request, (json.dumps(answer).encode(), "application/json"), request_id, when))
        )
        verdict = "match" if answered == count else "mismatch"
        line = {"event": "answer", "request_id": request_id, "status": 200, "images": 1, "model_version": "bench",
                "latency_ms": 50, "answers": [{"count": answered, "confidence": confidence, "expected": count,
                                               "verdict": verdict}]}  # fmt: skip
        # Logged as the request ends, its latency after it arrived (the capture's inferenceTime).
        events.append({"timestamp": int(when.timestamp() * 1000) + line["latency_ms"], "message": json.dumps(line)})
        if len(lines) == PER_FILE:
            _, key = capture_key(config["DestinationS3Uri"], ENDPOINT, "AllTraffic", lines[0][0])
            s3.put_object(Bucket=BUCKET, Key=key, Body="\n".join(text for _, text in lines).encode())
            lines = []
    for first in range(0, len(events), 1000):
        logs.put_log_events(logGroupName=group, logStreamName="bench", logEvents=events[first : first + 1000])


def measure(s3, logs, start: datetime, end: datetime) -> dict:
    """The monitor's steps on the window, each timed."""
    from bin_counter import capture, monitor, monitor_report

    rng = random.Random(1)
    test_photos = [monitor.photo_statistics(photo(rng, rng.randint(0, 5))) for _ in range(200)]
    baseline = {
        "model": "bench",
        "count_histogram": [100] * 6,
        "confidence_histogram": [0, 0, 0, 10, 10, 10, 10, 10, 10, 0],
        # As monitor_baseline makes it from 200 test photos (made here, outside the timing).
        "photo_statistics": {name: [s[name] for s in test_photos if s] for name in monitor.PHOTO_STATISTICS},
    }
    times = {}
    began = time.perf_counter()
    keys = capture.capture_keys(s3, BUCKET, ENDPOINT, start, end)
    captures = list(capture.read_captures(s3, BUCKET, keys, start, end))
    times["read_captures_s"] = time.perf_counter() - began
    began = time.perf_counter()
    verdicts = capture.read_verdicts(logs, FUNCTION, start, end)
    times["read_verdicts_s"] = time.perf_counter() - began
    began = time.perf_counter()
    window = {"start": start.isoformat(), "end": end.isoformat()}
    figures = monitor.assess(captures, verdicts, baseline, monitor.Thresholds(), window)
    times["assess_s"] = time.perf_counter() - began
    began = time.perf_counter()
    monitor_report.write_report(s3, BUCKET, ENDPOINT, start, figures)
    times["report_s"] = time.perf_counter() - began
    times = {k: round(v, 2) for k, v in times.items()}
    total = sum(times.values())
    return {
        "capture_files": len(keys),
        "captures": len(captures),
        "verdict_lines": len(verdicts),
        "joined": figures["joined"]["joined"],
        **times,
        "total_s": round(total, 2),
        "live_accuracy": figures["live"]["accuracy"] if figures["live"] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000, help="captured requests in the hour")
    parser.add_argument("--photos", default="", help="a folder of JPEG photos to send instead of generated ones")
    args = parser.parse_args()

    import boto3

    from standin.launch import start_moto

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc, endpoint = start_moto()
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        logs = boto3.client("logs", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        began = time.perf_counter()
        real = sorted(Path(args.photos).glob("*.jpg")) if args.photos else []
        generate(s3, logs, args.requests, start, real)
        print(f"generated {args.requests} requests in {time.perf_counter() - began:.0f} s", flush=True)
        size = sum(p.stat().st_size for p in real) / len(real) if real else None
        result = {
            "requests": args.requests,
            "photos": args.photos or "generated",
            "mean_photo_bytes": size,
            **measure(s3, logs, start, start + timedelta(hours=1)),
        }
        result["seconds_per_10000"] = round(result["total_s"] * 10000 / args.requests, 1)
        print(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
