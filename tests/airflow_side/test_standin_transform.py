"""Batch transform on the stand-in: the repository's published model answering S3 objects through the
endpoints' serving stack, spoken to over HTTP with boto3. One stand-in and two real jobs are shared by
the module (a model worker start costs seconds); the tests read what those jobs left."""

from __future__ import annotations

import datetime
import json

import boto3
import pytest
from botocore.exceptions import ClientError

from standin.aws_calls import read_calls
from standin.launch import start_standin
from standin.sagemaker import transform
from standin.sagemaker.models import arn
from tests.airflow_side.conftest import CONTAINER_PYTHON, WARM, deployed_model, sagemaker_client, wait_ended
from tests.conftest import REPO, make_bin_image, png_padded_to

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")

BUCKET = "transform-jobs"
MODEL = "bin-counter-published"
ROLE = "arn:aws:iam::000000000000:role/local"  # deployed_model's: a test role no policy check covers
GOOD = ("photos/a.jpg", "photos/b.jpg", "photos/c.jpg")
MANIFEST_KEYS = ("day1/x.jpg", "day2/y.jpg", "day2/late/z.jpg")
OVER_TORCHSERVE = 6_553_501  # one byte over TorchServe's default max_request_size, which the image keeps


def job_request(name: str, uri: str, output: str, data_type: str = "S3Prefix", **fields) -> dict:
    return {
        "TransformJobName": name,
        "ModelName": MODEL,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": data_type, "S3Uri": uri}},
            "ContentType": "image/jpeg",
        },
        "TransformOutput": {"S3OutputPath": output, "Accept": "application/json"},
        "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1},
        **fields,
    }


def wait_transform_job(sm, name: str, timeout: float = 180) -> dict:
    return wait_ended(lambda: sm.describe_transform_job(TransformJobName=name), "TransformJobStatus", timeout, 0.3)


def keys(s3, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, moto_endpoint, aws_call_log, container_python):
    """A stand-in with the published model registered, and four finished jobs: `mixed` (a prefix of
    good photos, a truncated JPEG, a text file and an object over MaxPayloadInMB), `manifest`
    (a manifest naming photos in sub-folders), and `payload-413` and `payload-ts` (a photo under
    MaxPayloadInMB 7 but over TorchServe's max_request_size, the second with TS_MAX_REQUEST_SIZE set)."""
    env = pytest.MonkeyPatch()  # the `s3` fixture's credentials, for the whole module
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    state = tmp_path_factory.mktemp("transform") / "state"
    calls_from = aws_call_log.stat().st_size if aws_call_log.exists() else 0
    proc, endpoint = start_standin(state, moto_endpoint, container_python, extra_args=WARM, call_log=aws_call_log)
    handle = {"proc": proc, "endpoint": endpoint, "state": state, "python": container_python}
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(
        Bucket=BUCKET, Key="models/published/model.tar.gz", Body=(REPO / "models" / "bin-counter.tar.gz").read_bytes()
    )
    sm = sagemaker_client(handle)
    deployed_model(sm, MODEL, artifact=f"s3://{BUCKET}/models/published/model.tar.gz")

    for seed, key in enumerate(GOOD):
        s3.put_object(Bucket=BUCKET, Key=f"batch/{key}", Body=make_bin_image(seed % 3, seed, (96, 72)))
    photo = make_bin_image(2, 99, (96, 72))
    s3.put_object(Bucket=BUCKET, Key="batch/photos/d-truncated.jpg", Body=photo[: len(photo) // 2])
    s3.put_object(Bucket=BUCKET, Key="batch/photos/notes.txt", Body=b"not a photo\n")
    s3.put_object(Bucket=BUCKET, Key="batch/photos/e-big.png", Body=png_padded_to(transform.MB + 1))
    for seed, key in enumerate(MANIFEST_KEYS):
        s3.put_object(Bucket=BUCKET, Key=f"sets/{key}", Body=make_bin_image(seed % 3, 50 + seed, (96, 72)))
    s3.put_object(
        Bucket=BUCKET,
        Key="manifests/today.json",
        Body=json.dumps([{"prefix": f"s3://{BUCKET}/sets/"}, *MANIFEST_KEYS]).encode(),
    )

    # "photos" without its slash: the S3Uri's folder is "batch/", so outputs keep the "photos/" part.
    sm.create_transform_job(
        **job_request("mixed", f"s3://{BUCKET}/batch/photos", f"s3://{BUCKET}/out/mixed", MaxPayloadInMB=1)
    )
    sm.create_transform_job(
        **job_request(
            "manifest",
            f"s3://{BUCKET}/manifests/today.json",
            f"s3://{BUCKET}/out/manifest/",
            "ManifestFile",
            Environment={"SAGEMAKER_MODEL_SERVER_TIMEOUT": "60"},
            TransformOutput={"S3OutputPath": f"s3://{BUCKET}/out/manifest/", "AssembleWith": "Line"},
        )
    )
    s3.put_object(Bucket=BUCKET, Key="large/over.png", Body=png_padded_to(OVER_TORCHSERVE))
    one_worker = {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}  # one model load per job is enough here
    sm.create_transform_job(
        **job_request(
            "payload-413",
            f"s3://{BUCKET}/large/",
            f"s3://{BUCKET}/out/payload-413/",
            MaxPayloadInMB=7,
            Environment=one_worker,
        )
    )
    # TorchServe reads TS_* variables (enable_envvars_config=true in the image): the job's Environment
    # raises the limit, and the model itself answers the photo (too big for it: its own refusal).
    environment = {**one_worker, "TS_MAX_REQUEST_SIZE": str(7 * transform.MB), "BIN_COUNTER_REFUSALS": "answer"}
    sm.create_transform_job(
        **job_request(
            "payload-ts",
            f"s3://{BUCKET}/large/",
            f"s3://{BUCKET}/out/payload-ts/",
            MaxPayloadInMB=7,
            Environment=environment,
        )
    )
    jobs = {name: wait_transform_job(sm, name) for name in ("mixed", "manifest", "payload-413", "payload-ts")}
    handle.update(sm=sm, s3=s3, jobs=jobs, calls=read_calls(aws_call_log, calls_from), moto=moto_endpoint)
    yield handle
    handle["proc"].terminate()
    handle["proc"].wait(timeout=10)
    env.undo()


def test_failed_objects_get_no_output_and_the_job_fails_naming_them(stack):
    job = stack["jobs"]["mixed"]
    assert job["TransformJobStatus"] == "Failed"
    assert job["TransformStartTime"] <= job["TransformEndTime"]
    assert job["MaxPayloadInMB"] == 1 and job["MaxConcurrentTransforms"] == 1  # the default, as described
    # Sorted keys: d-truncated.jpg is the first that failed.
    reason = job["FailureReason"]
    assert reason.startswith(
        f"ClientError: 3 of 6 input objects failed and have no .out; the first: "
        f"s3://{BUCKET}/batch/photos/d-truncated.jpg: Bad HTTP status received from algorithm: 4"
    )
    assert '{"error":' in reason  # the first line of the model's body: its JSON error
    s3 = stack["s3"]
    assert keys(s3, "out/mixed/") == {f"out/mixed/{key}.out" for key in GOOD}
    for key in GOOD:
        answer = json.loads(s3.get_object(Bucket=BUCKET, Key=f"out/mixed/{key}.out")["Body"].read())
        assert answer["count"] in range(6)  # AssembleWith None: the answer as the model sent it

    log = (stack["state"] / "transform-jobs" / "mixed" / "job.log").read_text()
    assert "MaxConcurrentTransforms=1, MaxPayloadInMB=1, BatchStrategy=SINGLERECORD" in log
    assert "instance type ml.m5.large not honoured" in log
    assert f"{BUCKET}/batch/photos/notes.txt: ClientError: Bad HTTP status received from algorithm: 4" in log
    # The object over MaxPayloadInMB is refused before any request: the model never sees it.
    assert (
        f"{BUCKET}/batch/photos/e-big.png: ClientError: the object is {transform.MB + 1} bytes, over "
        f"MaxPayloadInMB (1 MB = {transform.MB} bytes): not sent to the model"
    ) in log

    logs = boto3.client("logs", endpoint_url=stack["moto"], region_name="us-east-1")
    streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/TransformJobs", logStreamNamePrefix="mixed/i-")[
        "logStreams"
    ]
    assert len(streams) == 1
    events = logs.get_log_events(
        logGroupName="/aws/sagemaker/TransformJobs", logStreamName=streams[0]["logStreamName"]
    )["events"]
    assert any("MaxPayloadInMB=1" in e["message"] for e in events)


def test_a_manifest_with_sub_folders_completes_with_outputs_under_their_relative_paths(stack):
    job = stack["jobs"]["manifest"]
    assert job["TransformJobStatus"] == "Completed", job.get("FailureReason")
    assert "FailureReason" not in job
    s3 = stack["s3"]
    assert keys(s3, "out/manifest/") == {f"out/manifest/{key}.out" for key in MANIFEST_KEYS}
    body = s3.get_object(Bucket=BUCKET, Key="out/manifest/day2/late/z.jpg.out")["Body"].read()
    assert body.endswith(b"}\n")  # AssembleWith Line: a newline after each record
    assert json.loads(body)["count"] in range(6)


def test_a_photo_over_torchserves_request_limit_fails_the_job_with_its_413(stack):
    job = stack["jobs"]["payload-413"]
    assert job["TransformJobStatus"] == "Failed"
    assert job["FailureReason"] == (
        f"ClientError: 1 of 1 input objects failed and have no .out; the first: s3://{BUCKET}/large/over.png: "
        "Bad HTTP status received from algorithm: 413"
    )
    assert not keys(stack["s3"], "out/payload-413/")


def test_ts_max_request_size_in_the_jobs_environment_lets_the_photo_reach_the_model(stack):
    job = stack["jobs"]["payload-ts"]
    assert job["TransformJobStatus"] == "Completed", job.get("FailureReason")
    answer = json.loads(stack["s3"].get_object(Bucket=BUCKET, Key="out/payload-ts/over.png.out")["Body"].read())
    assert answer["error"] == "too_large"  # inference.py's own limit, answered with 200


def test_the_models_role_reads_and_writes_s3(stack):
    by_role = {(c["action"], c["resource"]) for c in stack["calls"] if c["caller"] == ROLE}
    assert ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/models/published/model.tar.gz") in by_role
    assert ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/manifests/today.json") in by_role
    assert ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/sets/day2/late/z.jpg") in by_role
    assert ("s3:PutObject", f"arn:aws:s3:::{BUCKET}/out/manifest/day2/late/z.jpg.out") in by_role
    callers = {c["caller"] for c in stack["calls"] if c["action"] == "sagemaker:CreateTransformJob"}
    assert ROLE not in callers  # the caller's request; the job's S3 calls are the role's


def test_requests_are_refused_as_aws_refuses_them(stack):
    sm = stack["sm"]
    uri, out = f"s3://{BUCKET}/batch/photos/", f"s3://{BUCKET}/out/refused/"

    def refusal(**request) -> dict:
        with pytest.raises(ClientError) as caught:
            sm.create_transform_job(**request)
        return caught.value.response["Error"]

    error = refusal(**job_request("no-model", uri, out, ModelName="nowhere"))
    assert error == {"Code": "ValidationException", "Message": f'Could not find model "{arn("model", "nowhere")}".'}
    assert refusal(**job_request("mixed", uri, out))["Code"] == "ResourceInUse"  # a name taken
    assert "less than or equal to 100" in refusal(**job_request("big", uri, out, MaxPayloadInMB=101))["Message"]
    assert (
        "at 'modelClientConfig.invocationsTimeoutInSeconds' failed to satisfy constraint: Member must have value "
        "less than or equal to 3600"
        in refusal(**job_request("slow", uri, out, ModelClientConfig={"InvocationsTimeoutInSeconds": 3601}))["Message"]
    )
    message = refusal(**job_request("many", uri, out, MaxConcurrentTransforms=20))["Message"]
    assert message == "MaxConcurrentTransforms (20) * MaxPayloadInMB (6) = 120 MB exceeds the limit of 100 MB"
    recordio = job_request("recordio", uri, out)
    recordio["TransformInput"]["SplitType"] = "RecordIO"
    assert "does not serve SplitType RecordIO" in refusal(**recordio)["Message"]
    assert (
        "does not serve DataProcessing"
        in refusal(**job_request("filtered", uri, out, DataProcessing={"InputFilter": "$[1:]"}))["Message"]
    )
    assert refusal(**job_request("empty", f"s3://{BUCKET}/nothing/", out))["Message"].startswith(
        f'No S3 objects found under S3 URL "s3://{BUCKET}/nothing/" given in input data source.'
    )
    with pytest.raises(ClientError) as caught:
        sm.describe_transform_job(TransformJobName="never")
    assert caught.value.response["Error"] == {
        "Code": "ValidationException",
        "Message": "Could not find requested job with name never",
    }
    assert not keys(stack["s3"], "out/refused/")


def test_stop_ends_the_job_stopped_and_stops_its_worker(stack):
    sm = stack["sm"]
    sm.create_transform_job(**job_request("stopped", f"s3://{BUCKET}/sets/", f"s3://{BUCKET}/out/stopped/"))
    sm.stop_transform_job(TransformJobName="stopped")  # while its model loads
    assert sm.describe_transform_job(TransformJobName="stopped")["TransformJobStatus"] in ("Stopping", "Stopped")
    job = wait_transform_job(sm, "stopped")
    assert job["TransformJobStatus"] == "Stopped" and "FailureReason" not in job and "TransformEndTime" in job
    assert not keys(stack["s3"], "out/stopped/")
    with pytest.raises(ClientError) as caught:
        sm.stop_transform_job(TransformJobName="stopped")
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def test_list_filters_sorts_and_pages(stack):
    sm = stack["sm"]
    summaries = sm.list_transform_jobs(SortBy="Name", SortOrder="Ascending")["TransformJobSummaries"]
    assert [s["TransformJobName"] for s in summaries][:2] == ["manifest", "mixed"]
    failed = sm.list_transform_jobs(StatusEquals="Failed")["TransformJobSummaries"]
    assert sorted(s["TransformJobName"] for s in failed) == ["mixed", "payload-413"]
    assert set(failed[0]) == {
        "TransformJobName",
        "TransformJobArn",
        "CreationTime",
        "TransformEndTime",
        "LastModifiedTime",
        "TransformJobStatus",
        "FailureReason",
    }
    assert [s["TransformJobName"] for s in sm.list_transform_jobs(NameContains="manif")["TransformJobSummaries"]] == [
        "manifest"
    ]
    first = sm.list_transform_jobs(SortBy="Name", SortOrder="Ascending", MaxResults=1)
    second = sm.list_transform_jobs(SortBy="Name", SortOrder="Ascending", MaxResults=1, NextToken=first["NextToken"])
    assert [
        first["TransformJobSummaries"][0]["TransformJobName"],
        second["TransformJobSummaries"][0]["TransformJobName"],
    ] == ["manifest", "mixed"]
    # boto3 sends a timestamp rounded to the millisecond, which may fall just below the stored time.
    created = stack["jobs"]["manifest"]["CreationTime"] + datetime.timedelta(milliseconds=1)
    later = sm.list_transform_jobs(CreationTimeAfter=created)["TransformJobSummaries"]
    assert "manifest" not in {s["TransformJobName"] for s in later}


def test_a_job_running_when_the_standin_stops_is_failed_at_the_next_start(stack):
    sm = stack["sm"]
    sm.create_transform_job(**job_request("cut-short", f"s3://{BUCKET}/sets/", f"s3://{BUCKET}/out/cut-short/"))
    stack["proc"].terminate()
    stack["proc"].wait(timeout=10)
    stack["proc"], stack["endpoint"] = start_standin(stack["state"], stack["moto"], stack["python"], extra_args=WARM)
    job = sagemaker_client(stack).describe_transform_job(TransformJobName="cut-short")
    assert job["TransformJobStatus"] == "Failed"
    assert job["FailureReason"] == "InternalServerError: the local stand-in restarted during the transform job"
    assert sagemaker_client(stack).describe_transform_job(TransformJobName="mixed")["TransformJobStatus"] == "Failed"


def test_lines_are_split_batched_and_assembled_as_batch_transform_does():
    # SplitType Line: one record per line, blank lines skipped; MultiRecord fills MaxPayloadInMB.
    body = b"a\nbb\n\nccc\r\n"
    assert transform.payloads(body, "Line", "SingleRecord", 100) == [b"a", b"bb", b"ccc"]
    assert transform.payloads(body, "Line", "MultiRecord", 5) == [b"a\nbb", b"ccc"]
    assert transform.payloads(body, "None", "MultiRecord", 100) == [body]
    with pytest.raises(transform.ObjectFailed, match="the record is 3 bytes"):
        transform.payloads(body, "Line", "MultiRecord", 2)
    assert transform.assemble([b"1", b"2"], "Line") == b"1\n2\n"
    assert transform.assemble([b"1", b"2"], "None") == b"12"
    assert transform.output_location("s3://b/out", "x/y.jpg") == ("b", "out/x/y.jpg.out")
    assert transform.output_location("s3://b", "y.jpg") == ("b", "y.jpg.out")
