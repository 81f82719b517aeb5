"""What the endpoint and the API function record about each request, read back for the monitor.

Two records, joined by the API's request id:

* SageMaker's data capture (https://docs.aws.amazon.com/sagemaker/latest/dg/model-monitor-data-capture-endpoint.html):
  the endpoint writes the sampled requests and its answers to
  `<DestinationS3Uri>/<endpoint>/<variant>/yyyy/mm/dd/hh/<file>.jsonl` (the hour of the invocation,
  UTC), one JSON document a line:
  `{"captureData": {"endpointInput": {"observedContentType", "mode": "INPUT", "data", "encoding"},
  "endpointOutput": {..., "mode": "OUTPUT"}}, "eventMetadata": {"eventId", "inferenceId",
  "inferenceTime"}, "eventVersion": "0"}`. `encoding` is JSON for the content types named in
  CaptureContentTypeHeader.JsonContentTypes, CSV for CsvContentTypes, and BASE64 for anything else
  (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_DataCaptureConfig.html: "If no headers
  are specified SageMaker AI will by default base64 encode"); photos are therefore BASE64.
  `inferenceId` is InvokeEndpoint's InferenceId, present only when the caller gave one
  (https://docs.aws.amazon.com/sagemaker/latest/dg/model-monitor-model-quality-merge.html); the API
  function gives its request id.
* The API function's log line, one per request, in CloudWatch Logs group `/aws/lambda/<function>`:
  `{"event": "answer", "request_id", "status", "images", "model_version", "latency_ms", "answers":
  [{"count", "confidence", "expected", "verdict"}]}` (lambda/handler.py). It carries the count the
  client expected, which the capture does not (the function sends the model only the photos).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

CAPTURE_PREFIX = "captures"  # SageMaker SDK's default is model-monitor/data-capture: ours is our own
# The content types the endpoint takes as JSON (sagemaker_code/inference.py); the rest are photos.
JSON_CONTENT_TYPES = ["application/json"]
ANSWER_EVENT = "answer"


def capture_destination(bucket: str) -> str:
    """DataCaptureConfig.DestinationS3Uri for the pipeline's bucket."""
    return f"s3://{bucket}/{CAPTURE_PREFIX}"


def data_capture_config(bucket: str, sampling_percent: int) -> dict:
    """SageMaker's DataCaptureConfig: requests and answers, `sampling_percent` of them (0 to 100; 0
    turns capture off), JSON bodies kept as JSON so that a list of photos stays readable."""
    if not 0 <= sampling_percent <= 100:
        raise ValueError(f"the capture sampling percentage must be 0 to 100, not {sampling_percent}")
    return {
        "EnableCapture": sampling_percent > 0,
        "InitialSamplingPercentage": int(sampling_percent),
        "DestinationS3Uri": capture_destination(bucket),
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": list(JSON_CONTENT_TYPES)},
    }


@dataclass(frozen=True)
class CapturedRequest:
    event_id: str
    inference_id: str | None  # the API's request id (the Lambda passes it as InferenceId)
    time: datetime  # inferenceTime, UTC
    endpoint: str
    variant: str
    content_type: str  # the request's content type
    images: list[bytes]  # the photos sent (one for an image body, several for {"images": [...]})
    predictions: list[dict]  # the model's answers, one per image ({"count", "probabilities", "confidence", ...})
    model_version: str | None


@dataclass(frozen=True)
class Verdict:
    request_id: str
    time: datetime
    model_version: str | None
    answers: list[dict]  # {"count", "confidence", "expected", "verdict"}
    status: int | None = None  # the API's HTTP status; answers is empty unless 200


class CaptureFormatError(ValueError):
    """A capture line that is not SageMaker's format."""


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour_folder(moment: datetime) -> str:
    return f"{moment:%Y/%m/%d/%H}"


def _variants(s3, bucket: str, endpoint_prefix: str) -> list[str]:
    paginator = s3.get_paginator("list_objects_v2")
    variants = []
    for page in paginator.paginate(Bucket=bucket, Prefix=endpoint_prefix, Delimiter="/"):
        variants += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    return variants


def capture_keys(s3, bucket: str, endpoint: str, start: datetime, end: datetime) -> list[str]:
    """The capture files of `endpoint`, every variant, in the hour folders that overlap [start, end).
    Listing starts after the first hour's folder and stops past the last, so a long history costs
    only the window's listing."""
    first, last = _hour(start), _hour(end)
    keys = []
    for variant_prefix in _variants(s3, bucket, f"{CAPTURE_PREFIX}/{endpoint}/"):
        # Keys sort by time: yyyy/mm/dd/hh are zero-padded. "/" sorts before digits, so the folder
        # name without its slash comes just before every key in it.
        after = variant_prefix + _hour_folder(first)
        stop = variant_prefix + _hour_folder(last + timedelta(hours=1))
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=variant_prefix, StartAfter=after)
        for page in pages:
            batch = [o["Key"] for o in page.get("Contents", [])]
            keys += [k for k in batch if k < stop and k.endswith(".jsonl")]
            if batch and batch[-1] >= stop:
                break
    return sorted(keys)


def _payload(part: dict) -> bytes:
    """The body SageMaker saw or sent, from a captured endpointInput/endpointOutput."""
    data, encoding = part.get("data", ""), part.get("encoding")
    if encoding == "BASE64":
        return base64.b64decode(data, validate=True)
    if encoding in ("JSON", "CSV"):
        return data.encode() if isinstance(data, str) else json.dumps(data).encode()
    raise CaptureFormatError(f"unknown encoding {encoding!r}")


def _base_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _images(body: bytes, content_type: str) -> list[bytes]:
    if _base_type(content_type) not in JSON_CONTENT_TYPES:
        return [body]  # a photo sent as the body (image/jpeg, image/png, application/x-image)
    document = json.loads(body)
    encoded = document.get("images") or ([document["image"]] if "image" in document else [])
    return [base64.b64decode(i, validate=True) for i in encoded]


def _answers(body: bytes, content_type: str) -> tuple[list[dict], str | None]:
    """(the answers, one per photo, and the model version) from the endpoint's JSON answer; none
    from anything else (another model's CSV, say)."""
    if _base_type(content_type) not in JSON_CONTENT_TYPES:
        return [], None
    answer = json.loads(body)
    if not isinstance(answer, dict):
        return [], None
    version = answer.get("model_version")
    if "predictions" in answer:
        return list(answer["predictions"]), version
    if "count" in answer:
        return [{k: v for k, v in answer.items() if k != "model_version"}], version
    return [], version  # a refusal: {"error", "message", ...}


def _key_names(key: str) -> tuple[str, str]:
    """(endpoint, variant) from `.../<endpoint>/<variant>/yyyy/mm/dd/hh/<file>`."""
    parts = key.split("/")
    if len(parts) < 7:
        raise CaptureFormatError(f"{key} is not in SageMaker's capture layout")
    return parts[-7], parts[-6]


def parse_capture_line(line: str, endpoint: str, variant: str) -> CapturedRequest:
    """One line of a capture file as a CapturedRequest; CaptureFormatError if it is not one."""
    try:
        record = json.loads(line)
        capture, meta = record["captureData"], record["eventMetadata"]
        request, response = capture.get("endpointInput"), capture.get("endpointOutput")
        content_type = request["observedContentType"] if request else ""
        images = _images(_payload(request), content_type) if request else []
        predictions, version = (
            _answers(_payload(response), response.get("observedContentType", "")) if response else ([], None)
        )
        moment = datetime.fromisoformat(meta["inferenceTime"].replace("Z", "+00:00")).astimezone(UTC)
        return CapturedRequest(
            event_id=meta["eventId"],
            inference_id=meta.get("inferenceId"),
            time=moment,
            endpoint=endpoint,
            variant=variant,
            content_type=content_type,
            images=images,
            predictions=predictions,
            model_version=version,
        )
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise CaptureFormatError(f"not a SageMaker capture record: {exc!r}") from exc


def read_captures(s3, bucket: str, keys: list[str], start: datetime, end: datetime) -> Iterator[CapturedRequest]:
    """The captured requests in `keys` whose inferenceTime is in [start, end), file by file. A line
    that is not a capture record is logged with its file and line number and skipped: one torn line
    must not hide a day of requests from the monitor."""
    for key in keys:
        endpoint, variant = _key_names(key)
        text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                captured = parse_capture_line(line, endpoint, variant)
            except CaptureFormatError as exc:
                log.warning("s3://%s/%s line %d skipped: %s", bucket, key, number, exc)
                continue
            if start <= captured.time < end:
                yield captured


def parse_verdict_line(message: str, timestamp_ms: int) -> Verdict | None:
    """The API function's per-request line as a Verdict; None for any other log line."""
    try:
        line = json.loads(message)
    except ValueError:
        return None
    if not isinstance(line, dict) or line.get("event") != ANSWER_EVENT or not line.get("request_id"):
        return None
    # The line is logged as the request ends; its time is the request's arrival, as a capture's
    # inferenceTime is, so that both land in the same window.
    latency = line.get("latency_ms")
    latency_ms = float(latency) if isinstance(latency, int | float) else 0.0
    return Verdict(
        request_id=str(line["request_id"]),
        time=datetime.fromtimestamp((timestamp_ms - latency_ms) / 1000, UTC),
        model_version=line.get("model_version"),
        answers=list(line.get("answers") or []),
        status=line.get("status"),
    )


def log_group(function_name: str) -> str:
    """The CloudWatch Logs group Lambda writes a function's output to."""
    return f"/aws/lambda/{function_name}"


# CloudWatch Logs' JSON filter pattern (https://docs.aws.amazon.com/AmazonCloudWatch/latest/logs/FilterAndPatternSyntax.html):
# only the per-request lines leave AWS. The lines are checked again here (moto returns every event
# for a JSON pattern), so the pattern saves transfer, never decides.
VERDICT_FILTER = '{ $.event = "answer" }'


# A request that arrived before a window's end is logged when it ends, up to the function's timeout
# later (lambda/function.json: 28 s): the lines are read that much past the window.
LOG_LAG = timedelta(seconds=60)


def read_verdicts(logs, function_name: str, start: datetime, end: datetime) -> dict[str, Verdict]:
    """The API's per-request lines of the requests that arrived in [start, end), by request id
    (FilterLogEvents, all pages): a request at a window's edge counts in one window only."""
    start_ms, end_ms = int(start.timestamp() * 1000), int((end + LOG_LAG).timestamp() * 1000)
    verdicts: dict[str, Verdict] = {}
    paginator = logs.get_paginator("filter_log_events")
    pages = paginator.paginate(
        logGroupName=log_group(function_name), startTime=start_ms, endTime=end_ms, filterPattern=VERDICT_FILTER
    )
    try:
        for page in pages:
            for event in page.get("events", []):
                found = parse_verdict_line(event["message"], event["timestamp"])
                if found is not None and start <= found.time < end:
                    verdicts[found.request_id] = found
    except logs.exceptions.ResourceNotFoundException:
        # Lambda creates the group on the function's first logged request: no group, no requests yet.
        log.warning("log group %s does not exist yet: no requests logged", log_group(function_name))
    return verdicts
