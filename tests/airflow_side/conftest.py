"""Fixtures for the Airflow-side suite: a moto S3 server on loopback, spoken to over real HTTP,
and an Airflow home of its own (SQLite) for DAG runs."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest

from bin_counter.sagemaker_config import training_job_config
from standin import iam
from standin.aws_calls import WORKER_ACCESS_KEY_ID, read_calls
from standin.forkserver import ForkServer
from standin.launch import airflow_connection, local_stack, start_moto, start_standin
from tests.conftest import REPO, make_bin_image, write_split_dir

# Before anything imports Airflow: its configuration is read once, at import.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="bin-counter-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
CONTAINER_PYTHON = REPO / ".venv-container" / "bin" / "python"
API_KEY = "local-test-key"  # what the stand-in's local API gateway requires in x-api-key


@pytest.fixture(scope="session")
def aws_call_log(tmp_path_factory) -> Path:
    """Where the moto server and every stand-in write each request's IAM actions (standin.aws_calls)."""
    return tmp_path_factory.mktemp("aws-calls") / "calls.jsonl"


@pytest.fixture(scope="session")
def pipeline_stack() -> iam.Stack:
    """infra/pipeline.yaml as CloudFormation would create it in the local stack's account and region,
    with the local stack's names."""
    return local_stack()


# Roles of the tests' own, which SageMaker and Lambda may assume and which grant nothing: their calls
# are nobody's in the policy check. Everything that stands for the pipeline uses the stack's roles.
TEST_ROLES = {
    "local": ("sagemaker.amazonaws.com", "lambda.amazonaws.com"),
    "test-functions-for-other-endpoints": ("lambda.amazonaws.com",),
}


@pytest.fixture(scope="session")
def moto_endpoint(aws_call_log, pipeline_stack):
    """A moto server with the pipeline stack's roles (and the tests' own) in its IAM, as on an account
    where infra/pipeline.yaml is deployed: the stand-in refuses roles IAM does not let it assume."""
    process, endpoint = start_moto(call_log=aws_call_log)
    admin = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iam.create_roles(admin, pipeline_stack)
    for name, services in TEST_ROLES.items():
        iam.service_role(admin, name, *services)
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def permitted_calls_only(aws_call_log, pipeline_stack, request):
    """After the test: every AWS call the pipeline made in it is one the ledger names and the stack's
    policies allow, for the principal that made it (the Airflow worker, SageMaker's role, the API
    function's role), as AWS would authorise it."""
    # The test's own bucket stands for the stack's (asked for here, so that it outlives this check).
    alias = (
        {request.getfixturevalue("bucket"): pipeline_stack.outputs["BucketName"]}
        if "bucket" in request.fixturenames
        else {}
    )
    start = aws_call_log.stat().st_size if aws_call_log.exists() else 0
    yield
    refused = iam.refused_calls(
        read_calls(aws_call_log, start), pipeline_stack, WORKER_ACCESS_KEY_ID, iam.load_ledger(), alias
    )
    assert not refused, "\n".join(refused)


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3, request):
    name = "abid-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated SQLite metadata database in this suite's own AIRFLOW_HOME."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=dict(os.environ)
    )
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture
def worker_client(permitted_calls_only):
    """Makes boto3 clients signed as the Airflow worker, for tests that call our task functions
    directly: their calls are then held against the worker's policy, as a DAG run's are."""

    def make(service: str, endpoint_url: str):
        return boto3.client(
            service,
            endpoint_url=endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=WORKER_ACCESS_KEY_ID,
            aws_secret_access_key="local",
        )

    return make


@pytest.fixture
def aws_connection(moto_endpoint, monkeypatch, permitted_calls_only):
    """The Airflow AWS connection pointed at the moto server: the only thing that differs from AWS."""
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(airflow_connection(moto_endpoint)))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return "aws_default"


def list_objects(s3, bucket: str, prefix: str = "") -> dict[str, tuple[str, object]]:
    """key -> (ETag, LastModified) under a prefix."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return found


@pytest.fixture(scope="session")
def container_python(tmp_path_factory) -> Path:
    """The container side's Python for the suite's stand-ins: the launcher of one fork server
    (standin/forkserver.py) that imported torch once, so that no job or model server of the suite
    imports it afresh. A stand-in given it runs with WARM (no fork server of its own: it is one)."""
    if not CONTAINER_PYTHON.exists():
        pytest.skip("needs .venv-container (make envs)")
    if os.environ.get("BIN_COUNTER_FORK_SERVER") == "0":  # the plain interpreter, to measure what it saves
        yield CONTAINER_PYTHON
        return
    server = ForkServer(str(CONTAINER_PYTHON), tmp_path_factory.mktemp("forkserver"))
    yield Path(server.python)
    server.stop()


WARM = ("--no-fork-server",)  # the stand-in flag for a container_python that is already a fork server's


@pytest.fixture
def standin(tmp_path, moto_endpoint, aws_connection, aws_call_log, container_python, request):
    """The SageMaker and Lambda stand-in on loopback, running jobs in the container-side env; a test
    marked `standin_args(...)` starts it with those extra flags. `restart(handle)` stops and starts it
    on the same state, as after a crash or a deploy of the stand-in."""
    state = tmp_path / "state"
    marker = request.node.get_closest_marker("standin_args")
    extra = (*WARM, *(marker.args if marker else ()))
    proc, endpoint = start_standin(
        state, moto_endpoint, container_python, api_key=API_KEY, extra_args=extra, call_log=aws_call_log
    )
    handle = {"proc": proc, "endpoint": endpoint, "state": state, "python": container_python}
    yield handle
    handle["proc"].terminate()
    handle["proc"].wait(timeout=10)


def restart(handle: dict, moto_endpoint: str) -> None:
    """Stop the `standin` fixture's stand-in and start it again on its state (same port not kept)."""
    handle["proc"].terminate()
    handle["proc"].wait(timeout=10)
    handle["proc"], handle["endpoint"] = start_standin(
        handle["state"], moto_endpoint, handle["python"], extra_args=WARM
    )


@pytest.fixture
def local_stack_connection(standin, moto_endpoint, monkeypatch):
    """The Airflow AWS connection of the local stack (standin.launch.airflow_connection)."""
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(airflow_connection(moto_endpoint, standin["endpoint"])))
    return standin


@pytest.fixture
def job_inputs(s3, bucket, tmp_path):
    """sourcedir.tar.gz of sagemaker_code/ and two channels of generated images, in S3."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in [*(REPO / "sagemaker_code").glob("*.py"), REPO / "sagemaker_code" / "api_contract.json"]:
            tar.add(path, arcname=path.name)
    s3.put_object(Bucket=bucket, Key="code/sourcedir.tar.gz", Body=buf.getvalue())
    for name, seed in (("train", 0), ("validation", 1)):
        folder = write_split_dir(tmp_path / name, {0: 4, 1: 4, 2: 4}, seed)
        for image in folder.rglob("*.jpg"):
            s3.put_object(Bucket=bucket, Key=f"{JOB_DATA}/{name}/{image.relative_to(folder)}", Body=image.read_bytes())
    return bucket


# Where job_inputs puts its channels and which role its jobs run as: the pipeline's own layout and role,
# so that what these jobs do (and an operator that starts them) is held against the stack's policies.
JOB_DATA = "datasets/job-inputs"
LOCAL_STACK = local_stack()
SAGEMAKER_ROLE = LOCAL_STACK.roles["SageMakerExecutionRole"]["arn"]
# The API function's role as infra/pipeline.yaml creates it, so that its calls are held against its policy.
API_FUNCTION_ROLE = LOCAL_STACK.roles["ApiFunctionRole"]["arn"]
# The stack's endpoint and API function, which its policies name: what the DAGs find in the stack's
# Variable, and what a test that stands for the pipeline serves and calls.
ENDPOINT = LOCAL_STACK.outputs["EndpointName"]
FUNCTION = LOCAL_STACK.outputs["FunctionName"]


def job_config(bucket: str, name: str, channels: dict[str, str] | None = None, **hyperparameters) -> dict:
    """A quick training job's request: the `job_inputs` channels unless `channels` are given."""
    hps = {
        "arch": "mobilenet_v2",
        "weights": "none",
        "image-size": 32,
        "epochs": 1,
        "batch-size": 8,
        "workers": 1,
        "max-count": 2,
        **hyperparameters,
    }
    return training_job_config(
        job_name=name,
        image_uri="local/pytorch-training:cpu",
        role_arn=SAGEMAKER_ROLE,
        source_s3_uri=f"s3://{bucket}/code/sourcedir.tar.gz",
        channels=channels
        or {"train": f"s3://{bucket}/{JOB_DATA}/train/", "validation": f"s3://{bucket}/{JOB_DATA}/validation/"},
        output_s3_uri=f"s3://{bucket}/models/",
        hyperparameters=hps,
        region="us-east-1",
    )


def deployed_model(
    sm,
    name: str,
    training_job: str | None = None,
    artifact: str | None = None,
    environment: dict[str, str] | None = None,
) -> str:
    """A model (with the container `environment`) and an endpoint config for a model.tar.gz (by default
    a finished training job's)."""
    if artifact is None:
        artifact = sm.describe_training_job(TrainingJobName=training_job)["ModelArtifacts"]["S3ModelArtifacts"]
    sm.create_model(
        ModelName=name,
        ExecutionRoleArn="arn:aws:iam::000000000000:role/local",
        PrimaryContainer={
            "Image": "local/pytorch-inference:cpu",
            "ModelDataUrl": artifact,
            "Environment": environment or {},
        },
    )
    sm.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": name, "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}
        ],
    )
    return name


def wait_endpoint(sm, name: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while True:
        endpoint = sm.describe_endpoint(EndpointName=name)
        if endpoint["EndpointStatus"] in ("InService", "Failed") or time.time() > deadline:
            return endpoint
        time.sleep(0.3)


def dag_without_retries(dag_id: str):
    """A DAG as the DAG processor parses it from dags/, every task's retries off: a failure in a test
    is the test's failure, not something to wait out. Set environment the DAG file reads first."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(REPO / "dags")).get_dag(dag_id)
    for task in dag.tasks:
        task.retries = 0
    return dag


def sagemaker_client(stack: dict):
    """A SageMaker client for a stand-in (the `standin` fixture, `local_stack_connection`)."""
    return boto3.client("sagemaker", endpoint_url=stack["endpoint"], region_name="us-east-1")


def published_count_request(s3, sm, bucket: str, job: str, model: str, photos: int) -> dict:
    """A CreateTransformJob request counting `photos` generated photos (counts 0 to 2) with the
    published model, registered as `model`; the photos and the archive put in `bucket` first."""
    archive = "models/published/model.tar.gz"
    s3.put_object(Bucket=bucket, Key=archive, Body=(REPO / "models" / "bin-counter.tar.gz").read_bytes())
    deployed_model(sm, model, artifact=f"s3://{bucket}/{archive}")
    for n in range(photos):
        s3.put_object(Bucket=bucket, Key=f"batch-counts/in/{n}.jpg", Body=make_bin_image(n % 3, n, (96, 72)))
    return {
        "TransformJobName": job,
        "ModelName": model,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{bucket}/batch-counts/in/"}},
            "ContentType": "image/jpeg",
        },
        "TransformOutput": {"S3OutputPath": f"s3://{bucket}/batch-counts/out/", "Accept": "application/json"},
        "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1},
    }


def wait_ended(describe, status_field: str, timeout: float, poll: float = 0.5) -> dict:
    """`describe()` once the job it describes has ended (Completed, Failed or Stopped) or after `timeout`."""
    deadline = time.time() + timeout
    while True:
        job = describe()
        if job[status_field] in ("Completed", "Failed", "Stopped") or time.time() > deadline:
            return job
        time.sleep(poll)


def wait_training_job(sm, name: str, timeout: float = 240) -> dict:
    """A training job's description once it has finished (or after `timeout`)."""
    return wait_ended(lambda: sm.describe_training_job(TrainingJobName=name), "TrainingJobStatus", timeout)


def serving_endpoint(sm, bucket: str, job: str, endpoint: str, environment: dict[str, str] | None = None) -> None:
    """Train `job`, register its model (with the container `environment`) and config under the job's
    name, serve it at `endpoint`."""
    sm.create_training_job(**job_config(bucket, job))
    assert wait_training_job(sm, job)["TrainingJobStatus"] == "Completed"
    deployed_model(sm, job, job, environment=environment)
    sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=job)
    assert wait_endpoint(sm, endpoint)["EndpointStatus"] == "InService"


# A champion record of the published model (the serving_model task's answer before any model serves).
PUBLISHED = {
    "endpoint": None,
    "model_data_url": "s3://b/models/published/x/model.tar.gz",
    "model_version": "published-v1",
    "published": True,
}


# Small and quick: 64-pixel images, counts 0 to 2, two tuning trials at most.
BASE_CONF = {
    "arch": "mobilenet_v2",
    "mode": "finetune",
    "max_count": 2,
    "batch_sizes": [8],
    "epochs_min": 2,
    "epochs_max": 3,
    "lr_min": 0.001,
    "lr_max": 0.003,
    "max_jobs": 2,
    "max_parallel_jobs": 2,
    "strategy": "Random",
    "initial_model": "none",
    "extra_hyperparameters": {"image-size": 64, "workers": 1, "seed": 0, "warmup-epochs": 0},
}
# bin_count_deploy, quick: one instance with one model worker (half the torch start-ups of the default),
# a bake of a few seconds, the old fleet retired at once.
QUICK_DEPLOY = {
    "instance_count": 1,
    "serving_workers": 1,
    "bake_minutes": 0.1,
    "termination_wait_minutes": 0,
    "smoke_images": 3,
    # One instance takes no canary (a canary turns on whole instances, at most half the fleet): the
    # canary drills deploy two.
    "rollout": "all_at_once",
}


def upload_dataset(s3, bucket: str, version: str, per_split: dict[str, int], corrupt_test: bool = False) -> None:
    """A dataset as bin_count_data_prep leaves it, made by its own split writer: the photos and their
    metadata under abid/raw/ (ABID's layout), `<split>.manifest`, `manifest.csv` and `dataset.json`.
    `per_split`: photos per count (0, 1, 2) in each split."""
    from bin_counter import dataset, split
    from bin_counter.abid import Record, S3Store

    raw = S3Store(bucket, "abid/raw", s3)
    records, assignment, images = [], {}, {}
    n = 0
    for name, per_count in per_split.items():
        for count in range(3):
            for _ in range(per_count):
                n += 1
                key = f"{version}-{n:05d}"  # the datasets of one bucket share abid/raw/
                body = make_bin_image(count, 7000 + n)
                if corrupt_test and name == "test":
                    body = body[: len(body) // 3]  # cut short between the stages
                raw.write(f"bin-images/{key}.jpg", body)
                raw.write(f"metadata/{key}.json", json.dumps({"EXPECTED_QUANTITY": count}).encode())
                records.append(Record(key, count))
                assignment[key] = name
                images.setdefault(name, {}).setdefault(count, 0)
                images[name][count] += 1
    out = S3Store(bucket, dataset.prefix_of(version), s3)
    split.write_manifests(records, assignment, raw, out, version)
    dataset.write_record(
        out,
        {
            "version": version,
            "bucket": bucket,
            "prefix": dataset.prefix_of(version),
            "images": images,
            "layout": dataset.LAYOUT,
            "image_prefix": "abid/raw",
        },
    )


# What makes a test slow here: a stand-in (and the container side's processes behind it), an Airflow
# metadata database for DAG runs, the live Airflow with a browser. `make check` leaves these out.
SLOW_FIXTURES = frozenset({"container_python", "standin", "local_stack_connection", "airflow_db", "live"})


# The order of the files: the longest first. `make test`'s two workers (pytest-xdist, --dist loadfile)
# reorder them by their number of tests; keeping this order (--no-loadscope-reorder) started the two
# heaviest files at once and starved the two-process training test past its wait (BENCHMARKS.md,
# "Test suite"). Seconds per file with both workers busy on the 2-core machine.
FILE_SECONDS = {
    "test_live_airflow": 295,
    "test_standin": 225,
    "test_retrain_dag": 205,
    "test_deploy_dag": 190,
    "test_live_deferral": 185,
    "test_resumable_operators": 160,
    "test_mwaa_bundle": 60,
    "test_data_prep_dag": 55,
    "test_data_capture": 45,
    "test_teardown": 40,
    "test_api_handler": 35,
    "test_deferred_waits": 35,
    "test_live_source": 35,
    "test_monitor_dag": 35,
    "test_api_load": 25,
    "test_batch_dag": 25,
    "test_data_prep_operators": 25,
    "test_standin_rollout": 20,
    "test_standin_oracle": 17,
    "test_standin_sizing": 16,
    "test_job_kill": 13,
    "test_standin_transform": 12,
    "test_failed_endpoint": 3,
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("real_data"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -FILE_SECONDS.get(item.module.__name__.rsplit(".", 1)[-1], 0))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`item.report_call`), for fixtures that keep evidence of a
    failure (the browser test's screenshot)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def lambda_handler():
    """lambda/handler.py as a module, importing its siblings from its folder as Lambda's runtime does
    (api_contract, which its zip carries beside it, comes from sagemaker_code/ on the tests' path)."""
    sys.path.insert(0, str(REPO / "lambda"))
    try:
        import handler
    finally:
        sys.path.remove(str(REPO / "lambda"))
    return handler


@pytest.fixture
def alerts(local_stack_connection, moto_endpoint, pipeline_stack, monkeypatch):
    """An SNS topic on moto with a queue subscribed to it; the DAGs publish to the topic. The queue is
    the test's own: what earlier tests sent to the topic (a live scheduler's run, an alarm's state
    change) is not in it."""
    sns = boto3.client("sns", endpoint_url=moto_endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    # The stack's topic: the templates' alarms notify it by its ARN.
    topic = sns.create_topic(Name=pipeline_stack.outputs["AlertsTopicArn"].rsplit(":", 1)[-1])["TopicArn"]
    queue = sqs.create_queue(QueueName=f"on-call-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    subscription = sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)["SubscriptionArn"]
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_ALERTS_TOPIC", topic)

    def received() -> list[dict]:
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        for message in messages:  # read once: SQS shows an undeleted message again later
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        return [json.loads(m["Body"]) for m in messages]

    yield received
    sns.unsubscribe(SubscriptionArn=subscription)
    sqs.delete_queue(QueueUrl=queue)


@pytest.fixture
def deploy_dag(airflow_db, monkeypatch, pipeline_stack):
    """bin_count_deploy on the local stack's Variable, polling SageMaker every second."""
    monkeypatch.setenv("AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER", pipeline_stack.outputs["SageMakerVariable"])
    monkeypatch.setenv("BIN_COUNTER_SAGEMAKER_POLL_S", "1")  # read when the DAG file is parsed
    return dag_without_retries("bin_count_deploy")


@pytest.fixture
def separate_machines(tmp_path, monkeypatch):
    """Each task try of the test's dag.test() runs on a machine of its own (tests/airflow_side/machines.py):
    its own working and temporary directories, gone when it ends, and a record of the files it opened."""
    from tests.airflow_side.machines import SeparateMachines

    machines = SeparateMachines(tmp_path / "machines").install(monkeypatch)
    yield machines
    machines.uninstall()
