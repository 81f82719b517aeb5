"""SageMaker's data capture for real-time endpoints: the sampled share of a configuration's requests,
with the model's answers, written to the configuration's DestinationS3Uri as SageMaker writes them
(https://docs.aws.amazon.com/sagemaker/latest/dg/model-monitor-data-capture-endpoint.html).

- Key: `<destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/<file>.jsonl`, the hour of the invocation in
  UTC ("organized based on the hour when the invocation occurred"). The file name is
  `<mm>-<ss>-<mmm>-<uuid>.jsonl` (minute, second and millisecond of its first record), as SageMaker's
  own files are named (`.../AllTraffic/2020/03/11/12/32-18-648-cee08c3a-....jsonl` in an S3
  notification that SageMaker's role caused, aws-samples' traffic-shadowing tests); the guide names it
  only `filename.jsonl`, and readers must not rely on more.
- Line: `{"captureData": {"endpointInput": {"observedContentType", "mode": "INPUT", "data",
  "encoding"}, "endpointOutput": {... "mode": "OUTPUT"}}, "eventMetadata": {"eventId",
  "inferenceId", "inferenceTime"}, "eventVersion": "0"}`; `inferenceId` only when InvokeEndpoint had
  an InferenceId ("If you provide a value, it is added to the captured data", the InvokeEndpoint API
  reference), as in the capture line aws/sagemaker-python-sdk#2629 quotes.
- Encoding: JSON for the content types in CaptureContentTypeHeader.JsonContentTypes, CSV for
  CsvContentTypes, BASE64 for the rest ("If no headers are specified SageMaker AI will by default
  base64 encode", API_DataCaptureConfig). A content type is matched on its media type, without
  parameters such as `; charset=utf-8` (the guide does not say; the stand-in's choice).
- Which requests: `InitialSamplingPercentage` of them, drawn per request; none when EnableCapture is
  false. Only requests the model answered: the guide describes capturing "the inputs to your endpoint
  and the inference outputs from your deployed model", and a ModelError is no inference output (the
  API function's own log line records refusals).
- Delivery: files are written by a background thread a few seconds after the requests ("The delivery
  of capture data to Amazon S3 can require a couple of minutes"), signed as the model's execution role,
  which therefore needs s3:PutObject on the destination. Serving never waits for S3 or fails for it.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from standin.batcher import BackgroundBatcher
from standin.sagemaker.exceptions import ValidationException

log = logging.getLogger("standin")


def check_config(config: dict | None) -> None:
    """Refuse what the stand-in cannot do as SageMaker would (botocore's model and the service's
    constraints have checked the rest): encryption with a KMS key."""
    if config and config.get("KmsKeyId"):
        raise ValidationException("DataCaptureConfig.KmsKeyId is valid SageMaker but not served by the local stand-in")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def encode(body: bytes, content_type: str | None, header: dict | None) -> tuple[str, str]:
    """(encoding, data) of a body as SageMaker captures it under CaptureContentTypeHeader `header`."""
    media = _media_type(content_type)
    header = header or {}
    for encoding, listed in (("JSON", "JsonContentTypes"), ("CSV", "CsvContentTypes")):
        if media and media in {_media_type(t) for t in header.get(listed, [])}:
            try:
                return encoding, body.decode("utf-8")
            except UnicodeDecodeError:
                break  # not text after all: kept exactly, as BASE64
    return "BASE64", base64.b64encode(body).decode()


def capture_line(
    config: dict,
    request: tuple[bytes, str | None],
    response: tuple[bytes, str | None],
    inference_id: str | None,
    when: datetime,
) -> str:
    """One request and its answer as a line of a capture file; `request`/`response` are (body, content type)."""
    modes = {o["CaptureMode"] for o in config.get("CaptureOptions", [])}
    header = config.get("CaptureContentTypeHeader")
    captured: dict[str, Any] = {}
    for part, mode, (body, content_type) in (
        ("endpointInput", "INPUT", request),
        ("endpointOutput", "OUTPUT", response),
    ):
        if modes & {"Input" if mode == "INPUT" else "Output", "InputAndOutput"}:
            encoding, data = encode(body, content_type, header)
            captured[part] = {
                "observedContentType": content_type or "",
                "mode": mode,
                "data": data,
                "encoding": encoding,
            }
    metadata = {"eventId": str(uuid.uuid4())}
    if inference_id:
        metadata["inferenceId"] = inference_id
    metadata["inferenceTime"] = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return json.dumps({"captureData": captured, "eventMetadata": metadata, "eventVersion": "0"}, separators=(",", ":"))


def capture_key(destination: str, endpoint: str, variant: str, first: datetime) -> tuple[str, str]:
    """(bucket, key) of a new capture file whose first record was invoked at `first`."""
    bucket, _, prefix = destination.removeprefix("s3://").removeprefix("https://").partition("/")
    first = first.astimezone(UTC)
    name = f"{first:%M-%S}-{first.microsecond // 1000:03d}-{uuid.uuid4()}.jsonl"
    parts = [p for p in (prefix.strip("/"), endpoint, variant, f"{first:%Y/%m/%d/%H}", name) if p]
    return bucket, "/".join(parts)


class CaptureWriter:
    """Capture files of every endpoint, written to S3 in the background by `client_factory(role_arn)`
    (an S3 client acting as that role)."""

    def __init__(
        self,
        client_factory: Callable[[str], Any],
        interval: float = 2.0,
        max_records: int = 500,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.client_factory, self.draw = client_factory, draw
        self.clients: dict[str, Any] = {}
        self.batches = BackgroundBatcher("sagemaker-data-capture", self._send, interval, max_records)

    def sampled(self, config: dict | None) -> bool:
        """Whether this request is one the configuration captures."""
        if not config or not config.get("EnableCapture", True):
            return False
        return self.draw() * 100 < config.get("InitialSamplingPercentage", 0)

    def record(
        self,
        config: dict | None,
        role_arn: str,
        where: tuple[str, str],
        request: tuple[bytes, str | None],
        response: tuple[bytes, str | None],
        inference_id: str | None = None,
        when: datetime | None = None,
    ) -> None:
        """Capture one answered request of endpoint and variant `where`, if it is sampled."""
        if config is None or not self.sampled(config):
            return
        when = when or datetime.now(UTC)
        line = capture_line(config, request, response, inference_id, when)
        hour = when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        self.batches.add((config["DestinationS3Uri"], role_arn, *where, hour), (when, line))

    def _send(self, key: tuple, records: list) -> None:
        destination, role_arn, endpoint, variant, _ = key
        bucket, object_key = capture_key(destination, endpoint, variant, records[0][0])
        client = self.clients.get(role_arn)
        if client is None:
            client = self.clients[role_arn] = self.client_factory(role_arn)
        body = "".join(line + "\n" for _, line in records).encode()
        try:
            client.put_object(Bucket=bucket, Key=object_key, Body=body)
        except Exception:
            self.clients.pop(role_arn, None)  # a new client (and connection) for the next try
            raise

    def flush(self) -> None:
        self.batches.flush()

    def stop(self) -> None:
        self.batches.stop()
