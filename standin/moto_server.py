"""moto's server (S3, CloudWatch Logs, SNS, ...) with every request written to the AWS call log.

  .venv/bin/python -m standin.moto_server -H 127.0.0.1 -p 5050 [--call-log build/aws-calls.jsonl]

moto itself serves the requests, unchanged; a WSGI layer in front reads each one as IAM would
authorise it (which action, on which resource ARN) and writes it to `standin.aws_calls.CallLog`.
moto's own IAM simulation cannot do this job: it checks resources for S3 only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from urllib.parse import parse_qs, unquote, urlsplit

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

from standin import sar
from standin.aws_calls import SERVICE_ACCESS_KEY_ID, CallLog, caller
from standin.core import ACCOUNT
from standin.sagemaker.forward import FORWARDED_HEADER

REGION_ACCOUNT = "us-east-1", ACCOUNT
_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/")
# Signing names that are not the service's IAM prefix: CloudWatch signs as "monitoring".
IAM_PREFIX = {"monitoring": "cloudwatch"}
# Smithy RPC v2 CBOR (botocore's protocol for CloudWatch since 1.37): the operation is the path's last part.
_RPC_V2_PATH = re.compile(r"^/service/[^/]+/operation/([A-Za-z0-9]+)$")


def s3_actions(
    method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
) -> list[tuple[str, str]]:
    """The IAM actions one S3 REST request needs (the Service Authorization Reference's names, which
    differ from the API's: HeadObject is s3:GetObject, ListObjectsV2 is s3:ListBucket, ...)."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    bucket_arn = f"arn:aws:s3:::{bucket}"
    if not bucket:
        return [("s3:ListAllMyBuckets", "*")]
    if not key:
        if method == "POST" and "delete" in query:  # DeleteObjects: s3:DeleteObject on each key
            keys = re.findall(rb"<Key>(.*?)</Key>", body)
            return [("s3:DeleteObject", f"{bucket_arn}/{k.decode()}") for k in keys]
        by_query = {
            "location": "s3:GetBucketLocation",
            "versions": "s3:ListBucketVersions",
            "uploads": "s3:ListBucketMultipartUploads",
            "policy": f"s3:{method.title()}BucketPolicy",
            "tagging": f"s3:{method.title()}BucketTagging",
            "notification": "s3:PutBucketNotification",
        }
        for name, action in by_query.items():
            if name in query:
                return [(action, bucket_arn)]
        plain = {"GET": "s3:ListBucket", "HEAD": "s3:ListBucket", "PUT": "s3:CreateBucket", "DELETE": "s3:DeleteBucket"}
        return [(plain.get(method, f"s3:UNMAPPED:{method}"), bucket_arn)]
    object_arn = f"{bucket_arn}/{key}"
    if "tagging" in query:
        return [(f"s3:{'Get' if method == 'GET' else 'Put'}ObjectTagging", object_arn)]
    if method == "DELETE":
        return [("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject", object_arn)]
    if method in ("GET", "HEAD"):
        return [("s3:ListMultipartUploadParts" if "uploadId" in query else "s3:GetObject", object_arn)]
    actions = [("s3:PutObject", object_arn)]  # PUT, and the multipart POSTs
    source = headers.get("x-amz-copy-source")
    if source:  # CopyObject reads its source with the caller's rights too
        actions.append(("s3:GetObject", f"arn:aws:s3:::{unquote(source).lstrip('/').split('?')[0]}"))
    return actions


def logs_resource(params: dict) -> str:
    """A CloudWatch Logs request's resource: its log stream, or its log group as IAM writes it (`:*`)."""
    region, account = REGION_ACCOUNT
    group = params.get("logGroupName") or "*"
    stream = params.get("logStreamName")
    base = f"arn:aws:logs:{region}:{account}:log-group:{group}"
    return f"{base}:log-stream:{stream}" if stream else f"{base}:*"


def json_actions(service: str, operation: str, params: dict) -> list[tuple]:
    """A JSON-protocol request's actions: CloudWatch Logs' as IAM writes log groups; a request that
    names its resource by ARN on that ARN; any other on each resource AWS's Service Authorization
    Reference marks required, built from the request's fields (Service Quotas' GetServiceQuota: the
    quota, `<ServiceCode>/<QuotaCode>`), or the one it names, else "*". Application Auto Scaling's
    carry the condition keys the reference lists for them (service namespace, scalable dimension)."""
    action = f"{service}:{operation}"
    if service == "logs":
        return [(action, logs_resource(params))]
    named = _named_resource(params)
    if named != "*":
        return [(action, named)]
    region, account = REGION_ACCOUNT
    # A scalable target's calls carry the condition keys AWS's reference lists for them, from the request.
    fields = {
        "application-autoscaling:service-namespace": params.get("ServiceNamespace"),
        "application-autoscaling:scalable-dimension": params.get("ScalableDimension"),
    }
    keys = sar.condition_keys(action) if service == "application-autoscaling" else set()
    context = {key: value for key, value in fields.items() if key in keys and value}
    found = sar.request_arns(action, params, region, account)
    return [(action, resource, context) if context else (action, resource) for _, resource in found]


def _named_resource(params: dict) -> str:
    # SNS names its topic TopicArn or TargetArn (Publish), SQS its queue QueueUrl.
    for name in ("TopicArn", "TargetArn", "QueueUrl"):
        if params.get(name):
            value = params[name]
            return value[0] if isinstance(value, list) else value
    return "*"


def query_actions(service: str, form: dict[str, list[str]]) -> list[tuple]:
    operation = form.get("Action", ["UNMAPPED"])[0]
    if service == "cloudwatch":
        return cloudwatch_actions(operation, query_params(form))
    return [(f"{service}:{operation}", _named_resource(form))]


def query_params(form: dict[str, list[str]]) -> dict:
    """A Query-protocol form as the JSON protocols send it, as far as a resource depends on it: plain
    members, and lists (`AlarmNames.member.1`, ...) in their order."""
    params: dict = {}
    members: dict[str, list[tuple[int, str]]] = {}
    for key, values in form.items():
        name, _, index = key.partition(".member.")
        if index.isdigit():
            members.setdefault(name, []).append((int(index), values[0]))
        else:
            params[key] = values[0]
    return params | {name: [value for _, value in sorted(items)] for name, items in members.items()}


def cloudwatch_actions(operation: str, params: dict) -> list[tuple]:
    """A CloudWatch request's actions, whatever protocol brought it: an alarm call on each alarm it
    names, as AWS's Service Authorization Reference builds the ARN (`alarm:<name>`, case kept: CloudWatch
    does not lowercase alarm names); "*" where it names none, which `standin.iam` reports for an action
    the reference requires an alarm for. PutMetricData carries its namespace as `cloudwatch:namespace`."""
    action = f"cloudwatch:{operation}"
    region, account = REGION_ACCOUNT
    names = params.get("AlarmNames") or ([params["AlarmName"]] if params.get("AlarmName") else [])
    if sar.privilege(action) and "alarm" in sar.resource_types(action) and names:
        return [(action, sar.build_arn(action, "alarm", {"AlarmName": name}, region, account)) for name in names]
    if operation == "PutMetricData" and params.get("Namespace"):
        return [(action, "*", {"cloudwatch:namespace": params["Namespace"]})]
    return [(action, "*")]


def decode_cbor(body: bytes) -> dict:
    """An RPC v2 CBOR request body, read with botocore's own CBOR reader."""
    from botocore.parsers import RpcV2CBORParser

    if not body:
        return {}
    parser = RpcV2CBORParser()
    decoded = parser.parse_data_item(parser.get_peekable_stream_from_bytes(body))
    return decoded if isinstance(decoded, dict) else {}


class RecordingMiddleware:
    """Reads each request once, writes its IAM actions to the call log, hands it to moto intact."""

    def __init__(self, app, log: CallLog) -> None:
        self.app, self.log = app, log

    def __call__(self, environ, start_response):
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        if "CONTENT_TYPE" in environ:
            headers["content-type"] = environ["CONTENT_TYPE"]
        scope = _SCOPE.search(headers.get("authorization", ""))
        # A request the stand-in forwarded (the Model Registry) is in the log already, as its caller's;
        # AWS's own work (SageMaker's metrics, CloudWatch's alarm evaluation) is no call of the account's.
        own_work = caller(headers) == SERVICE_ACCESS_KEY_ID
        if scope and self.log.path is not None and not headers.get(FORWARDED_HEADER) and not own_work:
            body = self._body(environ, headers)
            self.log.record(caller(headers), self._actions(environ, scope.group(2), headers, body), "moto")
        return self.app(environ, start_response)

    @staticmethod
    def _body(environ, headers: dict[str, str]) -> bytes:
        # Only what an action's resource depends on is read: JSON and form bodies, DeleteObjects' list.
        content_type = headers.get("content-type", "")
        wanted = (
            "json" in content_type
            or "x-www-form-urlencoded" in content_type
            or "cbor" in content_type
            or "delete" in environ.get("QUERY_STRING", "")
        )
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if not wanted or not length:
            return b""
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)
        return body

    @staticmethod
    def _actions(environ, service: str, headers: dict[str, str], body: bytes) -> list[tuple]:
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        service = IAM_PREFIX.get(service, service)
        rpc_v2 = _RPC_V2_PATH.match(environ.get("PATH_INFO", ""))
        if rpc_v2 and "cbor" in headers.get("content-type", ""):
            try:
                params = decode_cbor(body)
            except Exception:  # a body botocore cannot read names no resource; the call is still logged
                params = {}
            if service == "cloudwatch":
                return cloudwatch_actions(rpc_v2.group(1), params)
            return json_actions(service, rpc_v2.group(1), params)
        if service == "s3":
            path = urlsplit(environ.get("RAW_URI") or environ.get("PATH_INFO", "")).path
            return s3_actions(environ["REQUEST_METHOD"], path, query, headers, body)
        target = headers.get("x-amz-target")
        if target:
            try:
                params = json.loads(body or b"{}")
            except json.JSONDecodeError:
                params = {}
            if service == "cloudwatch":
                return cloudwatch_actions(target.rpartition(".")[2], params)
            return json_actions(service, target.rpartition(".")[2], params)
        return query_actions(service, {**query, **parse_qs(body.decode(errors="replace"))})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("-p", "--port", type=int, default=int(os.environ.get("MOTO_PORT", 5000)), help="port")
    parser.add_argument(
        "--call-log",
        default=os.environ.get("BIN_COUNTER_AWS_CALL_LOG"),
        help="append each request's IAM actions here as JSON lines (default: $BIN_COUNTER_AWS_CALL_LOG; none: no log)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds some URLs (SQS queues) from it
    # One account for the whole local stack: moto's ARNs (topics, queues) name the stand-in's account.
    os.environ.setdefault("MOTO_ACCOUNT_ID", ACCOUNT)
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        args.host, args.port, RecordingMiddleware(app, CallLog(args.call_log)), threaded=True, use_reloader=False
    )


if __name__ == "__main__":
    main()
