"""The SageMaker stand-in, spoken to over HTTP with boto3, running the real train.py."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from bin_counter import weights
from bin_counter.sagemaker_config import training_job_config
from standin.awslambda.exceptions import MAX_REQUEST_PAYLOAD_BYTES, MAX_RESPONSE_PAYLOAD_BYTES
from standin.gateway import INTEGRATION_TIMEOUT_S, MAX_PAYLOAD, Gateway
from standin.launch import airflow_connection
from standin.sagemaker.endpoints import model_server_processes
from standin.sagemaker.exceptions import MAX_INVOKE_BODY_BYTES
from tests.airflow_side.conftest import (
    API_KEY,
    CONTAINER_PYTHON,
    FUNCTION,
    SAGEMAKER_ROLE,
    deployed_model,
    job_config,
    restart,
    sagemaker_client,
    serving_endpoint,
    wait_endpoint,
    wait_training_job,
)
from tests.conftest import REPO, write_split_dir

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")


def test_training_job_runs_train_py_and_leaves_a_loadable_model(standin, job_inputs, s3, aws_connection):
    sm = sagemaker_client(standin)
    arn = sm.create_training_job(**job_config(job_inputs, "job-ok"))["TrainingJobArn"]
    assert arn.endswith("training-job/job-ok")
    job = wait_training_job(sm, "job-ok")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    statuses = [t["Status"] for t in job["SecondaryStatusTransitions"]]
    assert statuses == ["Starting", "Downloading", "Training", "Uploading", "Completed"]
    assert "not honoured" in job["SecondaryStatusTransitions"][0]["StatusMessage"]  # the instance type
    metrics = {m["MetricName"] for m in job["FinalMetricDataList"]}
    assert {"train:loss", "validation:accuracy", "validation:rmse"} <= metrics
    artifact = job["ModelArtifacts"]["S3ModelArtifacts"]
    assert artifact == f"s3://{job_inputs}/models/job-ok/output/model.tar.gz"
    body = s3.get_object(Bucket=job_inputs, Key="models/job-ok/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = set(tar.getnames())
        card = json.loads(tar.extractfile("model_card.json").read())
    assert {"model.pth", "model_card.json", "code/inference.py"} <= names
    assert card["model_version"] == "job-ok"  # TRAINING_JOB_NAME, as on SageMaker

    listed = sm.list_training_jobs(NameContains="job-")["TrainingJobSummaries"]
    assert [j["TrainingJobName"] for j in listed] == ["job-ok"]


def test_bad_hyperparameter_fails_the_job_with_its_reason(standin, job_inputs, aws_connection):
    sm = sagemaker_client(standin)
    sm.create_training_job(**job_config(job_inputs, "job-bad", epochs=0))
    job = wait_training_job(sm, "job-bad")
    assert job["TrainingJobStatus"] == "Failed"
    assert "--epochs must be at least 1" in job["FailureReason"]
    assert job["FailureReason"].startswith("AlgorithmError")


PROBE_SCRIPT = """
import json, os, sys
from pathlib import Path
# What the training toolkit handed over: the arguments, the SM_* variables, the base folder.
Path(os.environ["SM_MODEL_DIR"], "seen.json").write_text(json.dumps({
    "argv": sys.argv[1:], "model_dir": os.environ["SM_MODEL_DIR"], "channels": json.loads(os.environ["SM_CHANNELS"]),
    "base_dir": os.environ["SAGEMAKER_BASE_DIR"], "job": os.environ["TRAINING_JOB_NAME"],
    "torch": os.environ.get("SM_DLC_TORCH_VERSION"),
    "pythonpath_has_repo": "standin" in os.environ.get("PYTHONPATH", "")}))
if "--fail" in sys.argv:
    raise RuntimeError("the probe was asked to fail")
if "--sleep" in sys.argv:
    import time
    time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]))
"""


def probe_source(s3, bucket: str, key: str, requirements: str | None) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        files = {"train.py": PROBE_SCRIPT, **({"requirements.txt": requirements} if requirements is not None else {})}
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
    return f"s3://{bucket}/{key}"


def test_jobs_run_through_sagemakers_training_toolkit(standin, job_inputs, s3, aws_connection):
    """The entry point is the PyTorch training image's: the toolkit fetches the source from S3 (with
    the job's role: the call log check after this test holds it to the role's policy), pip-installs
    its requirements.txt, passes hyperparameters and SM_* variables, and writes the failure file."""
    sm = sagemaker_client(standin)

    def run(name: str, requirements: str | None, **hps) -> dict:
        config = job_config(job_inputs, name, **hps)
        config["HyperParameters"]["sagemaker_submit_directory"] = json.dumps(
            probe_source(s3, job_inputs, f"code/{name}/sourcedir.tar.gz", requirements)
        )
        sm.create_training_job(**config)
        return wait_training_job(sm, name)

    job = run("job-probe", "pillow\n", flag=True)
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    log = (standin["state"] / "training-jobs" / "job-probe" / "opt-ml" / "job.log").read_text()
    assert "Installing dependencies from requirements.txt" in log
    assert "Requirement already satisfied: pillow" in log  # what the image has is not installed again
    artifact = s3.get_object(Bucket=job_inputs, Key="models/job-probe/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(artifact)) as tar:
        seen = json.loads(tar.extractfile("seen.json").read())
    # The toolkit's command line: keys sorted, values str()-ed (a boolean arrives as True), its own
    # sagemaker_* hyperparameters left out.
    assert seen["argv"][:4] == ["--arch", "mobilenet_v2", "--batch-size", "8"]
    assert seen["argv"][seen["argv"].index("--flag") + 1] == "True"
    assert not any(arg.startswith("--sagemaker_") for arg in seen["argv"])
    assert seen["channels"] == ["train", "validation"] and seen["job"] == "job-probe"
    assert seen["base_dir"] == str(standin["state"] / "training-jobs" / "job-probe" / "opt-ml")
    assert seen["model_dir"] == seen["base_dir"] + "/model"
    # The toolkit's own reading of the image's torch (PyPI's build is +cu124, AWS's +cpu or +cu126).
    framework = json.loads((REPO / "sagemaker_code" / "framework.json").read_text())["framework_version"]
    assert seen["torch"].split("+")[0] == framework
    assert not seen["pythonpath_has_repo"]  # the stand-in's own import path is not the job's

    # The entry point's exception: the toolkit's failure file, AWS's AlgorithmError.
    job = run("job-probe-fails", None, fail=True)
    assert job["TrainingJobStatus"] == "Failed"
    assert job["FailureReason"].startswith("AlgorithmError: ExecuteUserScriptError:\nExitCode 1")
    # The toolkit reads the script's stderr in 64 KB chunks and splits them into lines, so a line can
    # arrive cut in two (as on AWS): the message is looked for with the white space taken out.
    assert "theprobewasaskedtofail" in re.sub(r"\s", "", job["FailureReason"]), job["FailureReason"]
    # A requirement that cannot be installed fails the job before the entry point runs.
    job = run("job-probe-requirements", "./no-such-wheel-1.0-py3-none-any.whl\n")
    assert job["TrainingJobStatus"] == "Failed"
    assert "InstallRequirementsError" in job["FailureReason"], job["FailureReason"]
    # A source tarball that is not there: the toolkit's download fails with a traceback, which AWS's
    # 1,024 characters of FailureReason cut before the reason; the log has it whole.
    config = job_config(job_inputs, "job-no-source")
    config["HyperParameters"]["sagemaker_submit_directory"] = json.dumps(f"s3://{job_inputs}/code/missing.tar.gz")
    sm.create_training_job(**config)
    job = wait_training_job(sm, "job-no-source")
    assert job["TrainingJobStatus"] == "Failed"
    assert job["FailureReason"].startswith("AlgorithmError: Framework Error") and len(job["FailureReason"]) <= 1024
    assert "s3_download" in job["FailureReason"]
    log = (standin["state"] / "training-jobs" / "job-no-source" / "opt-ml" / "job.log").read_text()
    assert "Not Found" in log


def test_errors_come_back_as_aws_sends_them(standin, job_inputs, aws_connection):
    sm = sagemaker_client(standin)
    sm.create_training_job(**job_config(job_inputs, "job-dup"))
    with pytest.raises(ClientError) as caught:
        sm.create_training_job(**job_config(job_inputs, "job-dup"))
    assert caught.value.response["Error"]["Code"] == "ResourceInUse"
    # What botocore does not check on the client and AWS refuses on the server: the name's pattern.
    with pytest.raises(ClientError) as caught:
        sm.create_training_job(**job_config(job_inputs, "job_underscored"))
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert caught.value.response["Error"]["Message"] == (
        "1 validation error detected: Value 'job_underscored' at 'trainingJobName' failed to satisfy constraint: "
        "Member must satisfy regular expression pattern: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"
    )
    with pytest.raises(ClientError) as caught:
        sm.describe_training_job(TrainingJobName="no-such-job")
    assert caught.value.response["Error"]["Code"] == "ValidationException"  # as SageMaker answers
    assert "Requested resource not found" in caught.value.response["Error"]["Message"]
    # A request boto3 would refuse is refused here too, checked against the same service model.
    body = json.dumps({"TrainingJobName": "x"}).encode()
    headers = {"X-Amz-Target": "SageMaker.CreateTrainingJob"}
    request = urllib.request.Request(standin["endpoint"], data=body, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request, timeout=10)
    payload = json.loads(http_error.value.read())
    assert http_error.value.code == 400 and payload["__type"] == "ValidationException"
    assert "AlgorithmSpecification" in payload["message"] or "RoleArn" in payload["message"]
    wait_training_job(sm, "job-dup")


def processes_in(folder: Path) -> list[str]:
    """The command lines of the processes working in `folder` or below it (a job's container)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # ended meanwhile
            continue
    return found


def test_the_service_models_constraints_are_checked_as_aws_checks_them():
    """Lengths, patterns, enums, entry counts and maximums, read from botocore's own service models."""
    import botocore.session

    from standin.constraints import report

    shape = (
        botocore.session.get_session().get_service_model("sagemaker").operation_model("CreateTrainingJob").input_shape
    )
    valid = {
        "TrainingJobName": "bin-counter-1",
        "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "Tags": [{"Key": "dag_run", "Value": "manual__2026-12-02"}],
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "HyperParameters": {"epochs": "4"},
    }
    assert report(valid, shape) is None
    refused = report(
        {
            **valid,
            "TrainingJobName": "x" * 64,
            "ResourceConfig": {**valid["ResourceConfig"], "InstanceType": "ml.m5.huge"},
            "HyperParameters": {f"k{i}": "v" for i in range(101)},
        },
        shape,
    )
    assert refused.startswith("4 validation errors detected: ")  # the name: too long, and off the pattern
    assert (
        f"Value '{'x' * 64}' at 'trainingJobName' failed to satisfy constraint: Member must have length less "
        "than or equal to 63" in refused
    )
    assert (
        "at 'resourceConfig.instanceType' failed to satisfy constraint: Member must satisfy enum value set" in refused
    )
    assert (
        "at 'hyperParameters' failed to satisfy constraint: Map value must have length less than or equal to 100"
        in refused
    )
    assert "at 'tags.1.member.value'" in report({**valid, "Tags": [{"Key": "k", "Value": "tab\x00"}]}, shape)
    lambda_shape = (
        botocore.session.get_session().get_service_model("lambda").operation_model("CreateFunction").input_shape
    )
    assert "at 'functionName' failed to satisfy constraint: Member must satisfy regular expression pattern" in report(
        {"FunctionName": "bin counter", "Role": "arn:aws:iam::000000000000:role/r", "Code": {}}, lambda_shape
    )


def test_stop_and_restart_keep_the_state(standin, job_inputs, s3, moto_endpoint, aws_connection):
    sm = sagemaker_client(standin)
    # An entry point that sleeps without a word: only a signal ends it, not a closed output pipe.
    config = job_config(job_inputs, "job-long", sleep=600)
    config["HyperParameters"]["sagemaker_submit_directory"] = json.dumps(
        probe_source(s3, job_inputs, "code/job-long/sourcedir.tar.gz", None)
    )
    sm.create_training_job(**config)
    job_folder = standin["state"] / "training-jobs" / "job-long"
    deadline = time.time() + 120
    while not any(" train.py " in command for command in processes_in(job_folder)):  # the toolkit started it
        assert time.time() < deadline
        time.sleep(0.2)
    sm.stop_training_job(TrainingJobName="job-long")
    assert wait_training_job(sm, "job-long")["TrainingJobStatus"] == "Stopped"
    # Stopping it again is refused with AWS's own answer (quoted in standin/sagemaker/models.py).
    with pytest.raises(ClientError) as again:
        sm.stop_training_job(TrainingJobName="job-long")
    assert again.value.response["Error"] == {
        "Code": "ValidationException",
        "Message": "The request was rejected because the training job is in status Stopped.",
    }
    # The stop reached the container's every process: the toolkit and the train.py it started.
    deadline = time.time() + 10
    while processes_in(job_folder):
        assert time.time() < deadline, processes_in(job_folder)
        time.sleep(0.2)

    restart(standin, moto_endpoint)
    again = sagemaker_client(standin).describe_training_job(TrainingJobName="job-long")
    assert again["TrainingJobStatus"] == "Stopped"


def test_a_job_past_its_max_runtime_is_stopped_as_sagemaker_stops_it(standin, job_inputs, s3, aws_connection):
    sm = sagemaker_client(standin)
    config = job_config(job_inputs, "job-overtime", sleep=600)
    config["HyperParameters"]["sagemaker_submit_directory"] = json.dumps(
        probe_source(s3, job_inputs, "code/job-overtime/sourcedir.tar.gz", None)
    )
    config["StoppingCondition"] = {"MaxRuntimeInSeconds": 6}
    sm.create_training_job(**config)
    job = wait_training_job(sm, "job-overtime")
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded")
    assert "MaxRuntimeInSeconds" in job["SecondaryStatusTransitions"][-1]["StatusMessage"]
    assert not processes_in(standin["state"] / "training-jobs" / "job-overtime")


def learnable_channels(s3, bucket: str, tmp_path: Path) -> dict[str, str]:
    """Generated bins with 0 to 5 boxes, which a head on ImageNet features learns to count part way in
    a few epochs (about two in three right): room to see a run that learns less."""
    channels = {}
    for name, per_count, seed in (("train", 24, 0), ("validation", 10, 1)):
        folder = write_split_dir(tmp_path / "learnable" / name, dict.fromkeys(range(6), per_count), seed)
        for image in folder.rglob("*.jpg"):
            s3.put_object(
                Bucket=bucket, Key=f"datasets/learnable/{name}/{image.relative_to(folder)}", Body=image.read_bytes()
            )
        channels[name] = f"s3://{bucket}/datasets/learnable/{name}/"
    site_packages = next((REPO / ".venv-container" / "lib").glob("python3*/site-packages"))
    channels[weights.CHANNEL] = weights.upload_weights(
        s3, bucket, "mobilenet_v2", weights.package_folders([site_packages])
    )
    return channels


def test_two_processes_under_torchrun_train_as_well_as_one(standin, job_inputs, s3, tmp_path, aws_connection):
    """SageMaker's torch_distributed: the training toolkit starts train.py under torchrun, here two
    processes on one host (gloo on CPU). The same global batch (2 x 4 against 1 x 8) must give the same
    model quality within noise, each process reading its share, metrics logged once, one model."""
    sm = sagemaker_client(standin)
    channels = learnable_channels(s3, job_inputs, tmp_path)
    recipe = {
        "arch": "mobilenet_v2",
        "weights": "imagenet",
        "mode": "head",
        "image-size": 64,
        "epochs": 4,
        "lr": 0.01,
        "workers": 1,
        "max-count": 5,
    }

    def start(name: str, processes: int) -> str:
        config = training_job_config(
            job_name=name,
            image_uri="local/pytorch-training:cpu",
            role_arn=SAGEMAKER_ROLE,
            source_s3_uri=f"s3://{job_inputs}/code/sourcedir.tar.gz",
            channels=channels,
            output_s3_uri=f"s3://{job_inputs}/models/",
            region="us-east-1",
            hyperparameters={**recipe, "batch-size": 8 // processes},
            distributed=processes > 1,
            processes_per_host=processes if processes > 1 else None,
        )
        sm.create_training_job(**config)
        return name

    def finished(name: str) -> dict:
        job = wait_training_job(sm, name, timeout=600)
        assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
        return job

    # Side by side, as two jobs on two instances would run.
    names = start("job-one-process", 1), start("job-two-processes", 2)
    one, two = (finished(name) for name in names)
    log = (standin["state"] / "training-jobs" / "job-two-processes" / "opt-ml" / "job.log").read_text()
    assert "Invoking TorchDistributed" in log and "torchrun --nnodes 1 --nproc_per_node 2 train.py" in log
    assert "processes=2 images_per_process=72" in log  # each process decodes and trains on its half
    assert len(re.findall(r"^epoch=\d+ ", log, re.MULTILINE)) == recipe["epochs"]  # logged once, not per process
    artifact = s3.get_object(Bucket=job_inputs, Key="models/job-two-processes/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(artifact)) as tar:
        card = json.loads(tar.extractfile("model_card.json").read())
    assert card["training"]["processes"] == 2 and card["data"]["images"]["train"] == 144

    def accuracy(job: dict) -> float:
        return next(m["Value"] for m in job["FinalMetricDataList"] if m["MetricName"] == "validation:accuracy")

    # Both learn (chance is 1/6), and they differ by less than two standard errors of the difference
    # of two accuracies on these 60 validation photos.
    first, second = accuracy(one), accuracy(two)
    assert min(first, second) > 0.4, (first, second)
    noise = 2 * (2 * 0.25 / 60) ** 0.5
    assert abs(first - second) < noise, (first, second, noise)


def test_the_providers_training_operator_runs_against_the_standin(
    standin, job_inputs, moto_endpoint, monkeypatch, capfd
):
    # The DAG's training operator: the provider's SageMakerTrainingOperator, whose execute and log
    # following run unchanged; its hook only looks at the job on every poll instead of every 30 s
    # (bin_counter.sagemaker_operators), which spares this test the provider's fixed 30 s wait.
    from bin_counter.sagemaker_operators import ResumableTrainingOperator

    # The only local part: the connection's endpoints (moto for S3 and logs, the stand-in for SageMaker).
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(airflow_connection(moto_endpoint, standin["endpoint"], login=None, services=("sagemaker",))),
    )
    operator = ResumableTrainingOperator(
        task_id="train", config=job_config(job_inputs, "job-operator"), print_log=True, check_interval=1
    )
    result = operator.execute(context={})
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    # The script's metric lines reached the task log (Airflow's structured log) through CloudWatch Logs.
    out, err = capfd.readouterr()
    assert "epoch=1 train_loss=" in out + err
    assert "SageMakerHook" in next(line for line in (out + err).splitlines() if "epoch=1 train_loss=" in line)


def test_models_and_endpoint_configs(standin, aws_connection):
    sm = sagemaker_client(standin)
    model = {
        "ModelName": "bin-count-1",
        "ExecutionRoleArn": "arn:aws:iam::000000000000:role/local",
        "PrimaryContainer": {"Image": "local/pytorch-inference:cpu", "ModelDataUrl": "s3://b/m/model.tar.gz"},
    }
    assert sm.create_model(**model)["ModelArn"].endswith(":model/bin-count-1")
    assert sm.describe_model(ModelName="bin-count-1")["PrimaryContainer"]["ModelDataUrl"] == "s3://b/m/model.tar.gz"
    with pytest.raises(ClientError, match="Cannot create already existing model"):
        sm.create_model(**model)
    variant = {
        "VariantName": "AllTraffic",
        "ModelName": "bin-count-1",
        "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1,
    }
    sm.create_endpoint_config(EndpointConfigName="bin-count-1", ProductionVariants=[variant])
    assert (
        sm.describe_endpoint_config(EndpointConfigName="bin-count-1")["ProductionVariants"][0]["ModelName"]
        == "bin-count-1"
    )
    with pytest.raises(ClientError, match="Could not find model"):
        sm.create_endpoint_config(EndpointConfigName="other", ProductionVariants=[{**variant, "ModelName": "nope"}])
    sm.delete_endpoint_config(EndpointConfigName="bin-count-1")
    sm.delete_model(ModelName="bin-count-1")
    with pytest.raises(ClientError) as caught:
        sm.describe_model(ModelName="bin-count-1")
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ClientError) as caught:
        sm.create_endpoint(EndpointName="e", EndpointConfigName="bin-count-1")  # deleted above
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def test_endpoint_serves_updates_and_survives_a_broken_model(standin, job_inputs, s3, tmp_path, aws_connection):
    sm = sagemaker_client(standin)
    serving_endpoint(sm, job_inputs, "job-serve", "bin-count", {"SAGEMAKER_MODEL_SERVER_WORKERS": "2"})

    runtime = boto3.client("sagemaker-runtime", endpoint_url=standin["endpoint"], region_name="us-east-1")
    image = next((tmp_path / "train").rglob("*.jpg")).read_bytes()
    answer = runtime.invoke_endpoint(EndpointName="bin-count", ContentType="image/jpeg", Body=image)
    assert answer["ContentType"] == "application/json"
    prediction = json.loads(answer["Body"].read())
    assert prediction["model_version"] == "job-serve" and prediction["count"] in (0, 1, 2)

    with pytest.raises(ClientError) as caught:  # the handler's 415 comes back as a ModelError
        runtime.invoke_endpoint(EndpointName="bin-count", ContentType="text/csv", Body=b"1,2")
    assert caught.value.response["Error"]["Code"] == "ModelError"
    assert caught.value.response["OriginalStatusCode"] == 415
    # answered by the image's own inference toolkit in the worker: its Transformer is in the traceback
    assert 'sagemaker_inference/transformer.py", line' in caught.value.response["OriginalMessage"]

    # The model server runs the workers its model asks for; one that dies is replaced, and only the
    # request it was answering fails (as TorchServe's failed prediction).
    backends = model_server_processes(standin["state"], (b"model_backend.py",))
    assert len(backends) == 2
    os.kill(backends[0], signal.SIGKILL)
    statuses = []
    for _ in range(3):  # idle workers take requests in turn: the dead one is asked within two
        try:
            runtime.invoke_endpoint(EndpointName="bin-count", ContentType="image/jpeg", Body=image)
            statuses.append(200)
        except ClientError as exc:
            statuses.append(exc.response["OriginalStatusCode"])
    assert sorted(statuses) == [200, 200, 503], statuses
    deadline = time.time() + 120
    while (
        len(replaced := model_server_processes(standin["state"], (b"model_backend.py",))) < 2 and time.time() < deadline
    ):
        time.sleep(0.5)
    assert len(replaced) == 2 and backends[0] not in replaced

    # An update to a model that cannot load: the endpoint keeps serving the old one and says why.
    s3.put_object(Bucket=job_inputs, Key="broken/model.tar.gz", Body=b"not a tarball")
    deployed_model(sm, "broken", artifact=f"s3://{job_inputs}/broken/model.tar.gz")
    sm.update_endpoint(EndpointName="bin-count", EndpointConfigName="broken")
    time.sleep(0.5)
    endpoint = wait_endpoint(sm, "bin-count")
    assert endpoint["EndpointStatus"] == "InService" and endpoint["EndpointConfigName"] == "job-serve"
    assert "not a model.tar.gz" in endpoint["FailureReason"]
    assert (
        json.loads(
            runtime.invoke_endpoint(EndpointName="bin-count", ContentType="image/jpeg", Body=image)["Body"].read()
        )["model_version"]
        == "job-serve"
    )
    sm.delete_endpoint(EndpointName="bin-count")
    with pytest.raises(ClientError):
        runtime.invoke_endpoint(EndpointName="bin-count", ContentType="image/jpeg", Body=image)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc to find the worker processes")
def test_stopping_right_after_an_update_leaves_no_model_frontend(standin, job_inputs, aws_connection):
    sm = sagemaker_client(standin)
    serving_endpoint(sm, job_inputs, "job-first", "bin-count")
    deployed_model(sm, "job-again", "job-first")
    sm.update_endpoint(EndpointName="bin-count", EndpointConfigName="job-again")
    time.sleep(0.5)
    assert wait_endpoint(sm, "bin-count")["EndpointConfigName"] == "job-again"
    # The old server finishes its requests for a few seconds.
    assert len(model_server_processes(standin["state"], (b"model_frontend.py",))) == 2
    standin["proc"].terminate()  # within those seconds
    standin["proc"].wait(timeout=20)
    deadline = time.time() + 10
    while model_server_processes(standin["state"]) and time.time() < deadline:
        time.sleep(0.2)
    assert model_server_processes(standin["state"]) == []


def test_tuning_job_searches_and_reports_the_best_trial(standin, job_inputs, aws_connection):
    sm = sagemaker_client(standin)
    definition = job_config(job_inputs, "unused")
    static = {k: v for k, v in definition["HyperParameters"].items() if k not in ("lr", "max-count")}
    sm.create_hyper_parameter_tuning_job(
        HyperParameterTuningJobName="tune-1",
        HyperParameterTuningJobConfig={
            "Strategy": "Random",
            "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "validation:accuracy"},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2},
            "ParameterRanges": {
                "ContinuousParameterRanges": [
                    {"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.01", "ScalingType": "Logarithmic"}
                ],
                # max-count 0 is refused by train.py: such a trial fails, the tuning job goes on.
                "CategoricalParameterRanges": [{"Name": "max-count", "Values": ["0", "2"]}],
            },
            "TrainingJobEarlyStoppingType": "Auto",
        },
        TrainingJobDefinition={
            "StaticHyperParameters": static,
            "AlgorithmSpecification": {
                k: definition["AlgorithmSpecification"][k]
                for k in ("TrainingImage", "TrainingInputMode", "MetricDefinitions")
            },
            "RoleArn": definition["RoleArn"],
            "InputDataConfig": definition["InputDataConfig"],
            "OutputDataConfig": definition["OutputDataConfig"],
            "ResourceConfig": definition["ResourceConfig"],
            "StoppingCondition": definition["StoppingCondition"],
        },
    )
    deadline = time.time() + 400
    while (job := sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="tune-1"))[
        "HyperParameterTuningJobStatus"
    ] == "InProgress":
        assert time.time() < deadline
        time.sleep(1)
    assert job["HyperParameterTuningJobStatus"] == "Completed"
    counters = job["TrainingJobStatusCounters"]
    # Early stopping may stop a trial that trails the completed ones.
    assert counters["Completed"] + counters["NonRetryableError"] + counters["Stopped"] == 4
    trials = sm.list_training_jobs_for_hyper_parameter_tuning_job(HyperParameterTuningJobName="tune-1")[
        "TrainingJobSummaries"
    ]
    assert len(trials) == 4
    failed = [t for t in trials if t["TrainingJobStatus"] == "Failed"]
    assert failed, "this seed drew no failing trial"
    assert all(t["TunedHyperParameters"]["max-count"] == "0" for t in failed)
    assert counters["NonRetryableError"] == len(failed)
    scored = [t for t in trials if "FinalHyperParameterTuningJobObjectiveMetric" in t]
    best = max(scored, key=lambda t: t["FinalHyperParameterTuningJobObjectiveMetric"]["Value"])
    assert (
        job["BestTrainingJob"]["FinalHyperParameterTuningJobObjectiveMetric"]["Value"]
        == best["FinalHyperParameterTuningJobObjectiveMetric"]["Value"]
    )
    described = sm.describe_training_job(TrainingJobName=job["BestTrainingJob"]["TrainingJobName"])
    assert described["TuningJobArn"] == job["HyperParameterTuningJobArn"]
    listed = sm.list_hyper_parameter_tuning_jobs(NameContains="tune-")["HyperParameterTuningJobSummaries"]
    assert [(j["HyperParameterTuningJobName"], j["HyperParameterTuningJobStatus"]) for j in listed] == [
        ("tune-1", "Completed")
    ]


def zipped(source: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("handler.py", source)
    return buf.getvalue()


HANDLER = """
import os

CALLS = []  # module state lives as long as the execution environment

def handle(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    if event.get("sleep"):
        import time
        time.sleep(event["sleep"])
    if event.get("warm"):
        CALLS.append(1)
        return {"calls": len(CALLS), "pid": os.getpid()}
    print("a line for the log")
    return {"greeting": os.environ["GREETING"], "n": event["n"] + 1, "memory": context.memory_limit_in_mb}
"""


def test_lambda_functions_are_created_invoked_and_updated(standin, aws_connection):
    aws_lambda = boto3.client("lambda", endpoint_url=standin["endpoint"], region_name="us-east-1")
    created = aws_lambda.create_function(
        FunctionName="counter-api",
        Runtime="python3.11",
        Handler="handler.handle",
        Role="arn:aws:iam::000000000000:role/local",
        Code={"ZipFile": zipped(HANDLER)},
        Timeout=2,
        MemorySize=256,
        Environment={"Variables": {"GREETING": "hi"}},
    )
    assert created["FunctionArn"].endswith(":function:counter-api") and created["State"] == "Active"
    answer = aws_lambda.invoke(FunctionName="counter-api", Payload=json.dumps({"n": 1}))
    assert answer["StatusCode"] == 200 and "FunctionError" not in answer
    assert json.loads(answer["Payload"].read()) == {"greeting": "hi", "n": 2, "memory": 256}
    assert "a line for the log" in (standin["state"] / "lambda" / "counter-api" / "function.log").read_text()

    # Warm environments: the second invocation finds the first one's module state.
    def warm():
        return json.loads(aws_lambda.invoke(FunctionName="counter-api", Payload=b'{"warm": true}')["Payload"].read())

    first, second = warm(), warm()
    assert second == {"calls": first["calls"] + 1, "pid": first["pid"]}

    failed = aws_lambda.invoke(FunctionName="counter-api", Payload=json.dumps({"fail": True}))
    assert failed["FunctionError"] == "Unhandled"
    assert json.loads(failed["Payload"].read())["errorMessage"] == "asked to fail"
    timed_out = aws_lambda.invoke(FunctionName="counter-api", Payload=json.dumps({"n": 1, "sleep": 5}))
    assert timed_out["FunctionError"] == "Unhandled"
    assert "timed out" in json.loads(timed_out["Payload"].read())["errorMessage"]
    assert warm()["calls"] == 1  # failures and timeouts threw their environments away

    aws_lambda.update_function_code(
        FunctionName="counter-api", ZipFile=zipped(HANDLER.replace('event["n"] + 1', 'event["n"] + 10'))
    )
    aws_lambda.update_function_configuration(FunctionName="counter-api", Environment={"Variables": {"GREETING": "yo"}})
    again = json.loads(aws_lambda.invoke(FunctionName="counter-api", Payload=json.dumps({"n": 1}))["Payload"].read())
    assert again == {"greeting": "yo", "n": 11, "memory": 256}
    assert warm()["pid"] != first["pid"]  # a new revision runs in new environments
    assert aws_lambda.get_function(FunctionName="counter-api")["Configuration"]["Timeout"] == 2

    with pytest.raises(ClientError) as caught:
        aws_lambda.create_function(
            FunctionName="counter-api",
            Runtime="python3.11",
            Handler="handler.handle",
            Role="arn:aws:iam::000000000000:role/local",
            Code={"ZipFile": zipped(HANDLER)},
        )
    assert caught.value.response["Error"]["Code"] == "ResourceConflictException"
    aws_lambda.delete_function(FunctionName="counter-api")
    with pytest.raises(ClientError) as caught:
        aws_lambda.invoke(FunctionName="counter-api", Payload=b"{}")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"


ECHO_HANDLER = """
import json

def handle(event, context):
    if "huge" in event:  # invoked directly: an answer of that many characters, quotes included
        return "x" * (event["huge"] - 2)
    if "pad" in event:
        return len(event["pad"])
    query = event.get("queryStringParameters") or {}
    body = "x" * int(query["huge"]) if "huge" in query else json.dumps({"event_body": len(event["body"] or "")})
    return {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": body}
"""


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_payloads_over_aws_limits_are_refused_as_aws_refuses_them(standin, aws_connection):
    """The stand-in keeps SageMaker Runtime's, Lambda's and API Gateway's payload limits, with their
    answers (standin/README.md, "Limits")."""
    # InvokeEndpoint: a body over 6 MiB is a ValidationError before any endpoint is looked up; one of
    # exactly 6 MiB reaches the lookup (there is no such endpoint).
    runtime = boto3.client("sagemaker-runtime", endpoint_url=standin["endpoint"], region_name="us-east-1")
    with pytest.raises(ClientError) as caught:
        runtime.invoke_endpoint(EndpointName="nowhere", Body=bytes(MAX_INVOKE_BODY_BYTES + 1), ContentType="image/png")
    error = caught.value.response
    assert (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (400, "ValidationError")
    assert re.fullmatch(r"Request [0-9a-f-]{36} has oversize body\.", error["Error"]["Message"])
    with pytest.raises(ClientError) as caught:
        runtime.invoke_endpoint(EndpointName="nowhere", Body=bytes(MAX_INVOKE_BODY_BYTES), ContentType="image/png")
    # ... where a missing endpoint is Runtime's ValidationError too, with AWS's message.
    assert caught.value.response["Error"] == {
        "Code": "ValidationError",
        "Message": "Endpoint nowhere of account 000000000000 not found.",
    }

    # Lambda: a request payload of 6 MiB is refused before the function runs, one byte less runs; a
    # response over 6 MiB + 100 bytes is the function's error.
    aws_lambda = boto3.client("lambda", endpoint_url=standin["endpoint"], region_name="us-east-1")
    aws_lambda.create_function(
        FunctionName=FUNCTION,
        Runtime="python3.12",
        Handler="handler.handle",
        Role="arn:aws:iam::000000000000:role/local",
        Code={"ZipFile": zipped(ECHO_HANDLER)},
        MemorySize=256,
        Timeout=20,
    )

    def padded(size: int) -> bytes:
        return b'{"pad": "' + b"x" * (size - 11) + b'"}'

    with pytest.raises(ClientError) as caught:
        aws_lambda.invoke(FunctionName=FUNCTION, Payload=padded(MAX_REQUEST_PAYLOAD_BYTES))
    error = caught.value.response
    assert (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (
        413,
        "RequestEntityTooLargeException",
    )
    assert error["Error"]["Message"] == "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
    answer = aws_lambda.invoke(FunctionName=FUNCTION, Payload=padded(MAX_REQUEST_PAYLOAD_BYTES - 1))
    assert "FunctionError" not in answer and json.loads(answer["Payload"].read()) == MAX_REQUEST_PAYLOAD_BYTES - 12
    largest = aws_lambda.invoke(FunctionName=FUNCTION, Payload=json.dumps({"huge": MAX_RESPONSE_PAYLOAD_BYTES}))
    assert "FunctionError" not in largest and len(largest["Payload"].read()) == MAX_RESPONSE_PAYLOAD_BYTES == 6291556
    too_large = aws_lambda.invoke(FunctionName=FUNCTION, Payload=json.dumps({"huge": MAX_RESPONSE_PAYLOAD_BYTES + 1}))
    assert too_large["StatusCode"] == 200 and too_large["FunctionError"] == "Unhandled"
    assert json.loads(too_large["Payload"].read()) == {
        "errorMessage": "Response payload size exceeded maximum allowed payload size (6291556 bytes).",
        "errorType": "Function.ResponseSizeTooLarge",
    }

    # The local API Gateway: over 10 MiB refused at the door (before the key is looked at); an event
    # over Lambda's limit (a 4.8 MB image is 6.4 MB of base64) is API Gateway's 413, one that fits
    # reaches the function; a response over Lambda's limit is a 502.
    url = f"{standin['endpoint']}/count"
    status, headers, body = post(url, bytes(MAX_PAYLOAD + 1), {"Content-Type": "image/png"})
    assert (status, body) == (413, b"HTTP content length exceeded 10485760 bytes.")
    assert headers["Content-Type"].startswith("text")
    keyed = {"Content-Type": "image/png", "x-api-key": API_KEY}
    status, headers, body = post(url, bytes(4_800_000), keyed)
    assert (status, json.loads(body)) == (413, {"message": "Request Too Long"})
    status, _, body = post(url, bytes(4_700_000), keyed)
    assert (status, json.loads(body)) == (200, {"event_body": 4 * -(-4_700_000 // 3)})
    status, _, body = post(f"{url}?huge={MAX_RESPONSE_PAYLOAD_BYTES}", b"\x89PNG", keyed)
    assert (status, json.loads(body)) == (502, {"message": "Internal server error"})


def test_the_gateway_answers_504_after_the_integration_timeout():
    class SlowFunction:
        def invoke(self, name: str, payload: bytes, invocation_type: str) -> tuple[int, bytes, dict]:
            time.sleep(1)
            return 200, json.dumps({"statusCode": 200, "body": "late"}).encode(), {}

    gateway = Gateway(SlowFunction(), "slow-api", integration_timeout_s=0.2)
    status, _, body = gateway.handle("POST", "/count", {"Content-Type": "image/png"}, b"\x89PNG")
    assert (status, json.loads(body)) == (504, {"message": "Endpoint request timed out"})
    assert INTEGRATION_TIMEOUT_S == 29


def test_two_jobs_at_once(standin, job_inputs, aws_connection):
    sm = sagemaker_client(standin)
    sm.create_training_job(**job_config(job_inputs, "job-a"))
    sm.create_training_job(**job_config(job_inputs, "job-b", lr=0.01))
    assert sm.describe_training_job(TrainingJobName="job-b")["TrainingJobStatus"] == "InProgress"
    assert wait_training_job(sm, "job-a")["TrainingJobStatus"] == "Completed"
    assert wait_training_job(sm, "job-b")["TrainingJobStatus"] == "Completed"
    assert wait_training_job(sm, "job-a")["ModelArtifacts"] != wait_training_job(sm, "job-b")["ModelArtifacts"]


def test_update_under_a_stream_of_requests_drops_none(standin, job_inputs, s3, tmp_path, aws_connection):
    import threading

    sm = sagemaker_client(standin)
    sm.create_training_job(**job_config(job_inputs, "job-v1"))
    sm.create_training_job(**job_config(job_inputs, "job-v2", lr=0.01))
    assert wait_training_job(sm, "job-v1")["TrainingJobStatus"] == "Completed"
    assert wait_training_job(sm, "job-v2")["TrainingJobStatus"] == "Completed"
    deployed_model(sm, "v1", "job-v1")
    deployed_model(sm, "v2", "job-v2")
    sm.create_endpoint(EndpointName="live", EndpointConfigName="v1")
    assert wait_endpoint(sm, "live")["EndpointStatus"] == "InService"

    runtime = boto3.client("sagemaker-runtime", endpoint_url=standin["endpoint"], region_name="us-east-1")
    image = next((tmp_path / "train").rglob("*.jpg")).read_bytes()
    errors, done = [], threading.Event()
    # One list per client: requests of different clients overlap, so an answer from the old model to
    # a request sent before the switch may arrive after another client's first answer from the new one.
    seen: list[list[str]] = [[], []]

    def stream(versions: list[str]):
        deadline = time.time() + 120  # bounded: a loop on loopback that always ends
        while not done.is_set() and time.time() < deadline:
            try:
                answer = runtime.invoke_endpoint(EndpointName="live", ContentType="image/jpeg", Body=image)
                versions.append(json.loads(answer["Body"].read())["model_version"])
            except Exception as exc:  # any failed request fails the test below
                errors.append(exc)

    clients = [threading.Thread(target=stream, args=(versions,)) for versions in seen]
    for c in clients:
        c.start()
    time.sleep(1)
    sm.update_endpoint(EndpointName="live", EndpointConfigName="v2")
    time.sleep(0.5)
    assert wait_endpoint(sm, "live")["EndpointConfigName"] == "v2"
    time.sleep(1)
    done.set()
    for c in clients:
        c.join()
    assert errors == []
    for versions in seen:
        assert versions[0] == "job-v1" and versions[-1] == "job-v2"
        # Each client, once it has an answer from the new model, never gets one from the old again.
        switched = versions.index("job-v2")
        assert versions[switched:] == ["job-v2"] * (len(versions) - switched)


def test_restart_brings_endpoints_back(standin, job_inputs, moto_endpoint, tmp_path, aws_connection):
    sm = sagemaker_client(standin)
    serving_endpoint(sm, job_inputs, "job-r", "again")
    restart(standin, moto_endpoint)
    sm = sagemaker_client(standin)
    assert wait_endpoint(sm, "again")["EndpointStatus"] == "InService"
    assert sm.describe_training_job(TrainingJobName="job-r")["TrainingJobStatus"] == "Completed"
    runtime = boto3.client("sagemaker-runtime", endpoint_url=standin["endpoint"], region_name="us-east-1")
    image = next((tmp_path / "train").rglob("*.jpg")).read_bytes()
    answer = runtime.invoke_endpoint(EndpointName="again", ContentType="image/jpeg", Body=image)
    assert json.loads(answer["Body"].read())["model_version"] == "job-r"


def test_median_stopping_rule():
    from standin.sagemaker.tuning import stop_early

    completed = [[0.5, 0.6, 0.7], [0.4, 0.5, 0.6], [0.3, 0.4, 0.5]]
    assert stop_early([0.2, 0.3], completed, maximize=True)  # below the median (0.5) after two reports
    assert not stop_early([0.6], completed, maximize=True)
    assert not stop_early([0.1], completed[:1], maximize=True)  # too few completed trials to judge
    assert stop_early([2.0], [[1.0], [1.2]], maximize=False)  # a loss above the median


def test_the_providers_tuning_model_and_endpoint_operators(standin, job_inputs, moto_endpoint, monkeypatch):
    from airflow.providers.amazon.aws.operators.lambda_function import (
        LambdaCreateFunctionOperator,
        LambdaInvokeFunctionOperator,
    )
    from airflow.providers.amazon.aws.operators.sagemaker import (
        SageMakerEndpointOperator,
        SageMakerTuningOperator,
    )

    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT", json.dumps(airflow_connection(moto_endpoint, standin["endpoint"], login=None))
    )
    definition = job_config(job_inputs, "unused")
    tuning_config = {
        "HyperParameterTuningJobName": "tune-op",
        "HyperParameterTuningJobConfig": {
            "Strategy": "Bayesian",
            "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "validation:accuracy"},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": 2, "MaxParallelTrainingJobs": 2},
            "ParameterRanges": {
                "ContinuousParameterRanges": [
                    {"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.01", "ScalingType": "Logarithmic"}
                ]
            },
        },
        "TrainingJobDefinition": {
            "StaticHyperParameters": {k: v for k, v in definition["HyperParameters"].items() if k != "lr"},
            "AlgorithmSpecification": {
                k: definition["AlgorithmSpecification"][k]
                for k in ("TrainingImage", "TrainingInputMode", "MetricDefinitions")
            },
            **{
                k: definition[k]
                for k in ("RoleArn", "InputDataConfig", "OutputDataConfig", "ResourceConfig", "StoppingCondition")
            },
        },
    }
    tuned = SageMakerTuningOperator(task_id="tune", config=tuning_config, check_interval=1).execute(context={})
    best = tuned["Tuning"]["BestTrainingJob"]["TrainingJobName"]
    described = sagemaker_client(standin).describe_training_job(TrainingJobName=best)
    artifact = described["ModelArtifacts"]["S3ModelArtifacts"]

    endpoint_config = {
        "Model": {
            "ModelName": "op-model",
            "ExecutionRoleArn": "arn:aws:iam::000000000000:role/local",
            "PrimaryContainer": {"Image": "local", "ModelDataUrl": artifact},
        },
        "EndpointConfig": {
            "EndpointConfigName": "op-config",
            "ProductionVariants": [
                {
                    "VariantName": "AllTraffic",
                    "ModelName": "op-model",
                    "InstanceType": "ml.m5.large",
                    "InitialInstanceCount": 1,
                }
            ],
        },
        "Endpoint": {"EndpointName": "op-endpoint", "EndpointConfigName": "op-config"},
    }
    SageMakerEndpointOperator(task_id="deploy", config=endpoint_config, check_interval=1).execute(context={})
    assert sagemaker_client(standin).describe_endpoint(EndpointName="op-endpoint")["EndpointStatus"] == "InService"

    LambdaCreateFunctionOperator(
        task_id="create_fn",
        function_name="op-fn",
        runtime="python3.11",
        role="arn:aws:iam::000000000000:role/local",
        handler="handler.handle",
        code={"ZipFile": zipped(HANDLER)},
        config={"environment": {"Variables": {"GREETING": "op"}}},
    ).execute(context={})
    answer = LambdaInvokeFunctionOperator(
        task_id="invoke", function_name="op-fn", payload=json.dumps({"n": 41})
    ).execute(context={})
    assert json.loads(answer)["n"] == 42


def test_checkpoint_sync_restores_uploads_complete_files_and_keeps_deleted_ones(s3, bucket, tmp_path):
    from standin.sagemaker.training import CheckpointSync

    s3.put_object(Bucket=bucket, Key="checkpoints/job/checkpoint.pth", Body=b"epoch 1")
    s3.put_object(Bucket=bucket, Key="checkpoints/job-other/checkpoint.pth", Body=b"not this job's")
    folder = tmp_path / "checkpoints"
    sync = CheckpointSync(s3, f"s3://{bucket}/checkpoints/job", folder, quiet=0.2, log=lambda line: None)
    assert sync.restore() == 1  # the S3Uri is a folder: checkpoints/job-other is not under it
    assert (folder / "checkpoint.pth").read_bytes() == b"epoch 1"
    assert sync.sync(final=True) == 0  # what was restored is not sent back

    (folder / "checkpoint.pth.tmp").write_bytes(b"half-writ")  # an atomic write under way
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("just written")
    assert sync.sync() == 0  # written this instant: not complete yet
    time.sleep(0.3)
    assert sync.sync() == 2  # sub/notes.txt and the .tmp: SageMaker uploads whatever is in the folder
    (folder / "checkpoint.pth.tmp").write_bytes(b"epoch 2")
    (folder / "checkpoint.pth.tmp").replace(folder / "checkpoint.pth")
    (folder / "sub" / "notes.txt").unlink()
    assert sync.sync(final=True) == 1
    keys = {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket, Prefix="checkpoints/job/")["Contents"]}
    assert set(keys) == {  # deletions stay
        "checkpoints/job/checkpoint.pth",
        "checkpoints/job/checkpoint.pth.tmp",
        "checkpoints/job/sub/notes.txt",
    }
    assert s3.get_object(Bucket=bucket, Key="checkpoints/job/checkpoint.pth")["Body"].read() == b"epoch 2"


def test_channels_are_downloaded_as_sagemaker_downloads_prefixes_and_manifests(s3, bucket, tmp_path):
    from standin.sagemaker.training import JobError, download_channel

    for key in ("00001", "00002", "00003"):
        s3.put_object(Bucket=bucket, Key=f"abid/raw/bin-images/{key}.jpg", Body=key.encode())
        s3.put_object(Bucket=bucket, Key=f"abid/raw/metadata/{key}.json", Body=b"{}")
    listed = [
        {"prefix": f"s3://{bucket}/abid/raw/"},
        "bin-images/00001.jpg",
        "metadata/00001.json",
        "bin-images/00003.jpg",
        "metadata/00003.json",
    ]
    s3.put_object(Bucket=bucket, Key="datasets/v/train.manifest", Body=json.dumps(listed).encode())

    def channel(data_type: str, uri: str) -> dict:
        return {"ChannelName": "train", "DataSource": {"S3DataSource": {"S3DataType": data_type, "S3Uri": uri}}}

    # ManifestFile: exactly the objects listed, at their paths relative to the manifest's prefix.
    target = tmp_path / "manifest"
    assert download_channel(s3, channel("ManifestFile", f"s3://{bucket}/datasets/v/train.manifest"), target) == 4
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "bin-images/00001.jpg",
        "bin-images/00003.jpg",
        "metadata/00001.json",
        "metadata/00003.json",
    ]
    assert (target / "bin-images" / "00003.jpg").read_bytes() == b"00003"
    # S3Prefix: everything under the prefix.
    target = tmp_path / "prefix"
    assert download_channel(s3, channel("S3Prefix", f"s3://{bucket}/abid/raw/bin-images/"), target) == 3

    # A listed object that is gone fails the job naming it; so does a manifest that is not one.
    s3.delete_object(Bucket=bucket, Key="abid/raw/bin-images/00003.jpg")
    with pytest.raises(JobError, match=r"Data download failed: .*abid/raw/bin-images/00003\.jpg \(NoSuchKey\)"):
        download_channel(s3, channel("ManifestFile", f"s3://{bucket}/datasets/v/train.manifest"), tmp_path / "gone")
    s3.put_object(Bucket=bucket, Key="datasets/v/bad.manifest", Body=b'{"prefix": "s3://x/"}')
    with pytest.raises(JobError, match=r"is not \[\{\"prefix\""):
        download_channel(s3, channel("ManifestFile", f"s3://{bucket}/datasets/v/bad.manifest"), tmp_path / "bad")
    with pytest.raises(JobError, match="could not read the manifest file"):
        download_channel(s3, channel("ManifestFile", f"s3://{bucket}/datasets/v/none.manifest"), tmp_path / "none")
