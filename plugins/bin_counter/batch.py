"""The batch count: every photo under an S3 prefix counted by a SageMaker Batch Transform job, joined
into one report with the counts the inventory records expect.

Layout of one run's output prefix (`<output>/`):
  input/manifest.json   the transform job's ManifestFile: the photos sent, relative to the input prefix
  input/photos.json     every object found: sent or refused before sending (and why), expected counts
  transform/            the job's S3OutputPath: `<relative key>.out`, one JSON answer per photo
  report.jsonl          one line per photo: key, count, confidence, expected, verdict, model version,
                        or the error code and message of a photo that could not be counted
  summary.json          totals, the counts' histogram, the verdicts, the failures

A photo is refused before the job only when Batch Transform itself would fail the job on it: bigger
than MaxPayloadInMB, or than the model server in SageMaker's PyTorch image takes in one request
(TorchServe answers 413 to it before inference.py sees it). Everything else goes to the model, which
answers a bad photo with its refusal (inference.py's BIN_COUNTER_REFUSALS=answer, set on the job): one
corrupt photo among thousands is a line of the report, never a failed job.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from botocore.exceptions import ClientError

from bin_counter.abid import IMAGE_PREFIX, parse_count
from bin_counter.api_function import function_settings
from bin_counter.paths import LAMBDA_DIR
from bin_counter.sagemaker_config import MANIFEST_SUFFIX, run_digest

MANIFEST = "input/manifest.json"
PLAN = "input/photos.json"
TRANSFORM = "transform/"
REPORT = "report.jsonl"
SUMMARY = "summary.json"
# What inference.py's handlers read from the job's environment to answer a refusal with status 200.
REFUSALS_ENVIRONMENT = {"BIN_COUNTER_REFUSALS": "answer"}
EXPECTED_SOURCES = ("auto", "none", "abid_metadata", "dataset_folders")
# MaxPayloadInMB's MB, in bytes. AWS defines it nowhere; what there is points to MiB (SageMaker's old
# 5 MB InvokeEndpoint limit was reported as "HTTP content length exceeded 5246976 bytes", 5 MiB + 4 KiB,
# aws/sagemaker-python-sdk#171; TorchServe's SageMaker execution-parameters plugin divides
# max_request_size by 1024 * 1024). The photos are chosen by the stricter reading, 10^6 bytes, so that a
# sent photo fits under either; a photo the MiB reading would add is too big for the model anyway
# (sagemaker_code/api_contract.json: max_image_bytes 4 MiB).
MB = 1000 * 1000
# The largest request the model server in SageMaker's PyTorch image takes: TorchServe 0.12.0's
# max_request_size, which the image's inference toolkit leaves at TorchServe's default
# (standin/sagemaker/model_frontend.py reads the same from the toolkit's own code). Netty answers a
# bigger request 413 before any handler, and Batch Transform fails the job on it.
MODEL_SERVER_MAX_REQUEST_BYTES = 6_553_500
READ_THREADS = 16  # S3 GETs of small objects: latency-bound, not CPU-bound


class BatchInputError(ValueError):
    """The run cannot start: no photos, an unknown expected-count source, a model that does not exist."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key or prefix) of an s3:// URI."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise BatchInputError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def folder(prefix: str) -> str:
    """A key prefix as a folder: '' or ending in '/'."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def run_output_uri(bucket: str, dag_id: str, run_id: str) -> str:
    """The run's output prefix when none is given: the same on every try and re-run of the run."""
    return f"s3://{bucket}/batch-counts/{run_digest(dag_id, run_id)}/"


# -- the model ------------------------------------------------------------------------------------
def batch_model(sm, model_name: str | None, endpoint_name: str) -> dict:
    """The SageMaker model to count with: `model_name`, or the one `endpoint_name` serves now."""
    from bin_counter.endpoint import serving_model

    if model_name:
        try:
            model = sm.describe_model(ModelName=model_name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ValidationException":
                raise
            raise BatchInputError(
                f"the SageMaker model {model_name} does not exist (SageMaker says: "
                f"{exc.response['Error'].get('Message')}). Set the model Param to a model that "
                "exists (aws sagemaker list-models), or leave it empty to count with the one "
                f"the endpoint {endpoint_name} serves."
            ) from exc
        return {
            "model": model_name,
            "model_data_url": model["PrimaryContainer"]["ModelDataUrl"],
            "source": "the model Param",
        }
    serving = serving_model(sm, endpoint_name)
    if serving is None:
        raise BatchInputError(
            f"the endpoint {endpoint_name} does not exist or serves nothing (Failed or OutOfService), so "
            "there is no serving model to count with: run bin_count_retrain first, or set the model Param "
            "to a SageMaker model."
        )
    return {
        "model": serving["model"],
        "model_data_url": serving["model_data_url"],
        "source": f"endpoint {endpoint_name} ({serving['endpoint_config']})",
    }


# -- the photos -----------------------------------------------------------------------------------
def list_photos(s3, input_uri: str, skip_prefix: str | None = None) -> tuple[str, list[dict]]:
    """The input's root (the prefix its objects are relative to) and its objects (key, relative key,
    size), sorted. The input is a prefix: every object under it but folder markers and anything under
    `skip_prefix` (the run's own output, when it lies inside the input). Or a dataset split's
    `.manifest`: the photos it lists (their metadata stays behind: it is read for the expected counts)."""
    bucket, prefix = split_s3_uri(input_uri)
    if input_uri.endswith(MANIFEST_SUFFIX):
        return manifest_photos(s3, input_uri)
    prefix = folder(prefix)
    photos = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") or (skip_prefix and key.startswith(skip_prefix)):
                continue
            photos.append({"key": key, "relative": key[len(prefix) :], "size": obj["Size"]})
    return f"s3://{bucket}/{prefix}", sorted(photos, key=lambda p: p["key"])


def manifest_photos(s3, manifest_uri: str) -> tuple[str, list[dict]]:
    """The photos (`bin-images/...`) a ManifestFile lists, their sizes listed from their folder."""
    bucket, key = split_s3_uri(manifest_uri)
    try:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        root_bucket, root = split_s3_uri(manifest[0]["prefix"])
    except (ClientError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise BatchInputError(f"the manifest {manifest_uri} cannot be read as a SageMaker ManifestFile: {exc}") from exc
    entries = [entry for entry in manifest[1:] if entry.startswith(IMAGE_PREFIX)]
    sizes: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=root_bucket, Prefix=root + IMAGE_PREFIX):
        sizes.update((obj["Key"], obj["Size"]) for obj in page.get("Contents", []))
    gone = [entry for entry in entries if root + entry not in sizes]
    if gone:
        raise BatchInputError(
            f"{len(gone)} photos that {manifest_uri} lists are not in s3://{root_bucket}/{root} "
            f"(first: {gone[:3]}): the dataset's photos were deleted"
        )
    photos = [{"key": root + entry, "relative": entry, "size": sizes[root + entry]} for entry in entries]
    return f"s3://{root_bucket}/{root}", sorted(photos, key=lambda p: p["key"])


def expected_source(source: str | None, input_is_dataset: bool, input_uri: str) -> str:
    """The expected-count source to use: `auto` is abid_metadata for a dataset's manifest or an ABID
    `bin-images/` prefix, dataset_folders for a copied dataset's split, else none."""
    source = source or "auto"
    if source != "auto":
        if source not in EXPECTED_SOURCES and not source.startswith("s3://"):
            raise BatchInputError(
                f"expected={source!r}: choose one of {EXPECTED_SOURCES} or an s3:// URI of a "
                'CSV (key,expected) or JSON lines ({"key": ..., "expected": ...}) file'
            )
        return source
    if input_is_dataset:  # a dataset's split: its manifest (ABID's layout) or, copied, its count folders
        return "abid_metadata" if input_uri.endswith(MANIFEST_SUFFIX) else "dataset_folders"
    if input_uri.endswith(MANIFEST_SUFFIX):
        return "abid_metadata"
    return "abid_metadata" if folder(split_s3_uri(input_uri)[1]).endswith("bin-images/") else "none"


def _count(value) -> int | None:
    """A count from a record: a whole number of at least 0, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdigit() else None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def metadata_key(key: str) -> str:
    """ABID's layout: `<root>/bin-images/<id>.jpg` is described by `<root>/metadata/<id>.json`."""
    path = PurePosixPath(key)
    return str(path.parent.parent / "metadata" / f"{path.stem}.json")


def parse_expected_file(text: str) -> dict[str, int | None]:
    """A CSV (`key,expected`, header optional) or JSON lines (`{"key": ..., "expected": ...}`) file."""
    found: dict[str, int | None] = {}
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                found[str(record["key"])] = _count(record.get("expected"))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BatchInputError(
                    f"expected counts, line {number}: not a JSON object with a key: {line[:80]!r}"
                ) from exc
        return found
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or (number == 1 and row[0].strip().lower() == "key"):
            continue
        if len(row) < 2:
            raise BatchInputError(f"expected counts, line {number}: need key,expected: {','.join(row)[:80]!r}")
        found[row[0].strip()] = _count(row[1])
    return found


def expected_counts(s3, source: str, bucket: str, photos: list[dict]) -> dict[str, int | None]:
    """Expected count per photo key (None where the source has none); the photos are in `bucket`."""
    if source == "none":
        return {}
    if source == "dataset_folders":  # datasets/<version>/<split>/<count>/<key>.jpg
        return {p["key"]: _count(PurePosixPath(p["key"]).parent.name) for p in photos}
    if source == "abid_metadata":

        def read(photo: dict) -> tuple[str, int | None]:
            try:
                body = s3.get_object(Bucket=bucket, Key=metadata_key(photo["key"]))["Body"].read()
                return photo["key"], parse_count(body)
            except ClientError as exc:
                if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                    return photo["key"], None
                raise
            except ValueError:  # a metadata file without a usable EXPECTED_QUANTITY: no expectation
                return photo["key"], None

        with ThreadPoolExecutor(READ_THREADS) as pool:
            return dict(pool.map(read, photos))
    list_bucket, key = split_s3_uri(source)
    try:
        text = s3.get_object(Bucket=list_bucket, Key=key)["Body"].read().decode("utf-8-sig")
    except ClientError as exc:
        raise BatchInputError(f"the expected counts file {source} cannot be read: {exc}") from exc
    listed = parse_expected_file(text)
    # A file names photos by their key, their key relative to the input prefix, or their ABID id.
    return {
        p["key"]: next(
            (listed[k] for k in (p["key"], p["relative"], PurePosixPath(p["key"]).stem) if k in listed), None
        )
        for p in photos
    }


def plan_photos(photos: list[dict], max_payload_mb: int) -> tuple[list[dict], list[dict]]:
    """(sent, refused): a photo bigger than the job's MaxPayloadInMB or than the model server takes would
    fail the whole transform job (AWS does not split an object without SplitType), so it is listed
    with its reason instead."""
    payload_limit = max_payload_mb * MB
    sent, refused = [], []
    for photo in photos:
        if photo["size"] > payload_limit:
            reason = f"the transform job's MaxPayloadInMB is {max_payload_mb} ({payload_limit} bytes)"
        elif photo["size"] > MODEL_SERVER_MAX_REQUEST_BYTES:
            reason = (
                f"the model server (TorchServe's max_request_size) takes at most "
                f"{MODEL_SERVER_MAX_REQUEST_BYTES} bytes per request"
            )
        else:
            sent.append(photo)
            continue
        refused.append({**photo, "error": "too_large", "message": f"the photo is {photo['size']} bytes; {reason}"})
    return sent, refused


def manifest(root_uri: str, sent: Iterable[dict]) -> list:
    """SageMaker's ManifestFile: the prefix, then each object relative to it."""
    bucket, prefix = split_s3_uri(root_uri)
    return [{"prefix": f"s3://{bucket}/{folder(prefix)}"}, *[p["relative"] for p in sent]]


def prepare(s3, input_uri: str, output_uri: str, expected: str, max_payload_mb: int) -> dict:
    """List the photos, read their expected counts, write the manifest and the plan to the output
    prefix. Returns what the transform job and the report need (small: for XCom)."""
    out_bucket, out_prefix = split_s3_uri(output_uri)
    out_prefix = folder(out_prefix)
    in_bucket = split_s3_uri(input_uri)[0]
    root, photos = list_photos(s3, input_uri, skip_prefix=out_prefix if in_bucket == out_bucket else None)
    if not photos:
        raise BatchInputError(f"no objects under {input_uri}: nothing to count (is the prefix right?)")
    counts = expected_counts(s3, expected, split_s3_uri(root)[0], photos)
    sent, refused = plan_photos(photos, max_payload_mb)
    if not sent:
        raise BatchInputError(
            f"none of the {len(photos)} objects under {input_uri} can be sent: every one is "
            f"bigger than MaxPayloadInMB={max_payload_mb} or than the model server takes"
        )
    rows = [
        {
            "key": p["key"],
            "relative": p["relative"],
            "size": p["size"],
            "expected": counts.get(p["key"]),
            **({"error": p["error"], "message": p["message"]} if "error" in p else {}),
        }
        for p in sorted(sent + refused, key=lambda p: p["key"])
    ]
    s3.put_object(Bucket=out_bucket, Key=out_prefix + MANIFEST, Body=json.dumps(manifest(root, sent)).encode())
    s3.put_object(Bucket=out_bucket, Key=out_prefix + PLAN, Body=json.dumps(rows).encode())
    return {
        "input_uri": input_uri,
        "output_uri": f"s3://{out_bucket}/{out_prefix}",
        "expected": expected,
        "manifest_uri": f"s3://{out_bucket}/{out_prefix}{MANIFEST}",
        "transform_output_uri": f"s3://{out_bucket}/{out_prefix}{TRANSFORM}",
        "photos": len(photos),
        "sent": len(sent),
        "refused": len(refused),
        "with_expected": sum(1 for r in rows if r["expected"] is not None),
    }


# -- the report -----------------------------------------------------------------------------------
def api_verdict() -> Callable[[list[float], int], dict]:
    """The API's own verdict (lambda/verdicts.py) with the thresholds the API function runs with
    (lambda/function.json), so a batch report and the API judge a count alike."""
    spec = importlib.util.spec_from_file_location("bin_counter_api_verdicts", LAMBDA_DIR / "verdicts.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no module loader for {LAMBDA_DIR / 'verdicts.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = function_settings().get("Environment", {})
    limits = (
        float(settings.get("MATCH_THRESHOLD", module.DEFAULT_MATCH_THRESHOLD)),
        float(settings.get("MISMATCH_THRESHOLD", module.DEFAULT_MISMATCH_THRESHOLD)),
    )

    def judge(probabilities: list[float], expected: int) -> dict:
        return module.verdict(probabilities, expected, limits)

    return judge


def report_row(planned: Mapping, answer: bytes | None, judge: Callable[[list[float], int], dict]) -> dict:
    """One photo's line of the report, from its plan entry and the job's `.out` (None: no output)."""
    row = {"key": planned["key"], "expected": planned["expected"]}
    if "error" in planned:
        return {**row, "count": None, "verdict": "failed", "error": planned["error"], "message": planned["message"]}
    if answer is None:
        return {
            **row,
            "count": None,
            "verdict": "failed",
            "error": "no_output",
            "message": "the transform job wrote no output for this photo (see the job's log)",
        }
    try:
        result = json.loads(answer)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {
            **row,
            "count": None,
            "verdict": "failed",
            "error": "malformed_output",
            "message": f"the model's output is not JSON: {answer[:80]!r}",
        }
    if "error" in result:
        return {
            **row,
            "count": None,
            "verdict": "failed",
            "error": result["error"],
            "message": result.get("message", ""),
            "model_version": result.get("model_version"),
        }
    row.update(
        count=result["count"],
        confidence=result["confidence"],
        expected_count=result.get("expected_count"),
        model_version=result.get("model_version"),
    )
    if planned["expected"] is None:
        return {**row, "verdict": None}
    return {**row, **judge(result["probabilities"], planned["expected"])}


def read_outputs(s3, transform_output_uri: str, planned: list[dict]) -> dict[str, bytes | None]:
    """Each sent photo's `.out` (None where the job wrote none), by key."""
    bucket, prefix = split_s3_uri(transform_output_uri)
    prefix = folder(prefix)

    def read(row: dict) -> tuple[str, bytes | None]:
        try:
            return row["key"], s3.get_object(Bucket=bucket, Key=f"{prefix}{row['relative']}.out")["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return row["key"], None
            raise

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(pool.map(read, [r for r in planned if "error" not in r]))


def summarize(rows: list[dict], job: Mapping, model: Mapping) -> dict:
    """Totals for the task log, the asset event and summary.json."""
    counted = [r for r in rows if r["count"] is not None]
    failures = [{k: r.get(k) for k in ("key", "error", "message")} for r in rows if r["verdict"] == "failed"]
    verdicts = Counter(r["verdict"] for r in rows if r["verdict"] not in (None, "failed"))
    versions = sorted({r["model_version"] for r in counted if r.get("model_version")})
    return {
        "photos": len(rows),
        "counted": len(counted),
        "failed": len(failures),
        "counts": {str(k): v for k, v in sorted(Counter(r["count"] for r in counted).items())},
        "with_expected": sum(1 for r in rows if r["expected"] is not None),
        "verdicts": {v: verdicts.get(v, 0) for v in ("match", "mismatch", "uncertain")},
        "failures_by_reason": dict(sorted(Counter(f["error"] for f in failures).items())),
        "failures": failures,
        "model": model["model"],
        "model_versions": versions,
        "transform_job": job.get("TransformJobName"),
    }


def write_report(s3, plan: Mapping, job: Mapping, model: Mapping) -> dict:
    """Join the plan and the job's outputs into report.jsonl and summary.json; the summary."""
    out_bucket, out_prefix = split_s3_uri(plan["output_uri"])
    planned = json.loads(s3.get_object(Bucket=out_bucket, Key=out_prefix + PLAN)["Body"].read())
    outputs = read_outputs(s3, job["TransformOutput"]["S3OutputPath"], planned)
    judge = api_verdict()
    rows = [report_row(p, outputs.get(p["key"]), judge) for p in planned]
    report = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    s3.put_object(Bucket=out_bucket, Key=out_prefix + REPORT, Body=report.encode())
    summary = {
        **summarize(rows, job, model),
        "report": f"s3://{out_bucket}/{out_prefix}{REPORT}",
        "input": plan["input_uri"],
        "expected_source": plan["expected"],
    }
    s3.put_object(Bucket=out_bucket, Key=out_prefix + SUMMARY, Body=json.dumps(summary, indent=1).encode())
    return summary


def summary_lines(summary: Mapping, failures_shown: int = 20) -> list[str]:
    """The summary as on-call staff read it in the task log."""
    lines = [
        f"{summary['photos']} photos under {summary['input']}: {summary['counted']} counted, "
        f"{summary['failed']} not counted; model {summary['model']} "
        f"(version {', '.join(summary['model_versions']) or 'none'}), job {summary['transform_job']}",
        "counts: " + (", ".join(f"{k}: {v}" for k, v in summary["counts"].items()) or "none"),
    ]
    if summary["with_expected"]:
        v = summary["verdicts"]
        lines.append(
            f"against the expected counts ({summary['with_expected']} photos, from "
            f"{summary['expected_source']}): {v['match']} match, {v['mismatch']} mismatch, "
            f"{v['uncertain']} uncertain"
        )
    else:
        lines.append("no expected counts: no verdicts")
    if summary["failed"]:
        lines.append(
            "not counted, by reason: " + ", ".join(f"{k} {n}" for k, n in summary["failures_by_reason"].items())
        )
        for failure in summary["failures"][:failures_shown]:
            lines.append(f"  {failure['key']}: {failure['error']}: {failure['message']}")
        if summary["failed"] > failures_shown:
            lines.append(f"  ... and {summary['failed'] - failures_shown} more in the report")
    lines.append(f"report: {summary['report']}")
    return lines
