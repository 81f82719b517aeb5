"""What the retraining DAG's own tasks do, as functions of boto3 clients, testable without Airflow.

Finding the dataset version to train on, packaging the training code, finding the model an endpoint
serves, and building and checking the smoke test sent through the Lambda function.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from botocore.exceptions import ClientError

from bin_counter import sagemaker_config

log = logging.getLogger(__name__)

DATASETS_PREFIX = "datasets"
DATASET_RECORD = "dataset.json"
CODE_DIR = Path(os.environ.get("BIN_COUNTER_CODE_DIR", Path(__file__).resolve().parents[2] / "sagemaker_code"))
LAMBDA_DIR = Path(os.environ.get("BIN_COUNTER_LAMBDA_DIR", Path(__file__).resolve().parents[2] / "lambda"))
SPLITS = ("train", "validation", "test")
# The repository's published model (`make model`): the champion before any model serves.
PUBLISHED_MODEL = Path(os.environ.get("BIN_COUNTER_PUBLISHED_MODEL",
                                      Path(__file__).resolve().parents[2] / "models" / "bin-counter.tar.gz"))
PUBLISHED_PREFIX = "models/published"


class DatasetNotFound(LookupError):
    pass


def _read_json(s3, bucket: str, key: str) -> dict:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            raise DatasetNotFound(f"s3://{bucket}/{key} does not exist: run bin_count_data_prep first, or "
                                  "check the dataset_version Param") from exc
        raise


def latest_version(s3, bucket: str) -> str:
    """The dataset whose record was written last."""
    newest = None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{DATASETS_PREFIX}/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(f"/{DATASET_RECORD}") and (newest is None or obj["LastModified"] > newest[1]):
                newest = (obj["Key"], obj["LastModified"])
    if newest is None:
        raise DatasetNotFound(f"no dataset under s3://{bucket}/{DATASETS_PREFIX}/: run bin_count_data_prep first")
    return newest[0].split("/")[-2]


def resolve_dataset(s3, bucket: str, requested: str | None, event_extra: Mapping | None) -> dict:
    """The dataset to train on: the Param when given, else the asset event that triggered the run,
    else the newest one in the bucket; with its channels' S3 prefixes."""
    if requested:
        version, how = requested, "the dataset_version Param"
    elif event_extra and event_extra.get("version"):
        version, how = event_extra["version"], "the bin_count_dataset asset event"
    else:
        version, how = latest_version(s3, bucket), f"the newest dataset in s3://{bucket}"
    prefix = f"{DATASETS_PREFIX}/{version}"
    record = _read_json(s3, bucket, f"{prefix}/{DATASET_RECORD}")
    images = record.get("images", {})  # split -> {count: images}
    missing = [s for s in SPLITS if not sum((images.get(s) or {}).values())]
    if missing:
        raise DatasetNotFound(f"dataset {version} has no {' or '.join(missing)} images ({json.dumps(images)})")
    log.info("training on dataset %s (chosen by %s): %s", version, how, json.dumps(images))
    return {"version": version, "chosen_by": how, "images": images, "prefix": prefix,
            "channels": {s: f"s3://{bucket}/{prefix}/{s}/" for s in SPLITS}}


def code_archive(code_dir: Path = CODE_DIR) -> bytes:
    """sourcedir.tar.gz of the training code, byte-identical for identical sources."""
    buf = io.BytesIO()
    # gzip stores a time; mtime=0 keeps the archive's bytes a function of the sources only.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in sorted(p for p in code_dir.iterdir() if p.suffix in (".py", ".txt", ".json") and p.is_file()):
            info = tar.gettarinfo(str(path), arcname=path.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buf.getvalue()


def upload_code(s3, bucket: str, code_dir: Path = CODE_DIR) -> str:
    """Upload sourcedir.tar.gz under its content hash (once) and return its S3 URI."""
    if not (code_dir / "train.py").is_file():
        raise FileNotFoundError(f"{code_dir} has no train.py: set BIN_COUNTER_CODE_DIR to the sagemaker_code folder")
    data = code_archive(code_dir)
    key = f"code/{hashlib.sha256(data).hexdigest()[:16]}/sourcedir.tar.gz"
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def serving_model(sm, endpoint_name: str) -> dict | None:
    """The model an endpoint serves now (name, artifact, configuration), or None without an endpoint."""
    try:
        endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ValidationException":
            return None
        raise
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model_name = config["ProductionVariants"][0]["ModelName"]
    model = sm.describe_model(ModelName=model_name)
    return {"endpoint": endpoint_name, "status": endpoint["EndpointStatus"],
            "endpoint_config": endpoint["EndpointConfigName"], "model": model_name,
            "model_data_url": model["PrimaryContainer"]["ModelDataUrl"]}


class DeploymentFailed(RuntimeError):
    pass


def confirm_deployment(sm, endpoint_name: str, config_name: str) -> dict:
    """Raise DeploymentFailed unless the endpoint is InService on `config_name`.

    SageMaker rolls a failed update back: the endpoint returns to InService on its old configuration
    with a FailureReason, which is all the provider's "endpoint in service" waiter looks at. Without
    this check such a run would go on as if the new model served."""
    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    status, serving = endpoint["EndpointStatus"], endpoint.get("EndpointConfigName")
    if status != "InService" or serving != config_name:
        reason = endpoint.get("FailureReason") or "no FailureReason given"
        keeps = f"it still serves {serving}" if status == "InService" else f"it is {status}"
        raise DeploymentFailed(f"endpoint {endpoint_name} did not switch to {config_name}: {keeps}. "
                               f"SageMaker says: {reason}")
    return {"endpoint": endpoint_name, "endpoint_config": serving, "status": status}


def model_version_of(archive: bytes) -> str:
    """The model_version in a model.tar.gz's model_card.json."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "model_card.json"), None)
        if member is None:
            raise ValueError("not a model.tar.gz written by train.py: it has no model_card.json")
        return json.loads(tar.extractfile(member).read())["model_version"]


def initial_champion(s3, bucket: str, spec: str) -> dict | None:
    """The champion before any model serves: the published model (`spec` "published"), a local
    model.tar.gz, or an s3:// URI; None for "" or "none". A local file is uploaded to
    s3://<bucket>/models/published/<content hash>/model.tar.gz once."""
    if spec in ("", "none"):
        return None
    if spec.startswith("s3://"):
        source_bucket, key = spec.removeprefix("s3://").split("/", 1)
        archive = s3.get_object(Bucket=source_bucket, Key=key)["Body"].read()
        uri = spec
    else:
        path = PUBLISHED_MODEL if spec == "published" else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"initial model {path} does not exist; run `make model`, or set the "
                                    "initial_model Param to none")
        archive = path.read_bytes()
        key = f"{PUBLISHED_PREFIX}/{hashlib.sha256(archive).hexdigest()[:12]}/model.tar.gz"
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except ClientError:
            s3.put_object(Bucket=bucket, Key=key, Body=archive)
        uri = f"s3://{bucket}/{key}"
    return {"endpoint": None, "status": "NotDeployed", "model": None, "model_data_url": uri,
            "model_version": model_version_of(archive), "published": True}


def function_zip(lambda_dir: Path = LAMBDA_DIR) -> bytes:
    """The Lambda function's deployment package: the handler and its siblings (boto3 is in the runtime)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in [*sorted(lambda_dir.glob("*.py")), CODE_DIR / "api_contract.json"]:  # the API's error table
            archive.writestr(zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0)), path.read_bytes())
    return buf.getvalue()


def smoke_images(s3, bucket: str, test_prefix: str, how_many: int) -> list[dict]:
    """Up to `how_many` test images, one per count first: [{"key", "count", "base64"}]."""
    by_count: dict[int, list[str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=test_prefix):
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(test_prefix):].strip("/").split("/")
            if len(parts) == 2 and parts[0].isdigit() and parts[1].endswith(".jpg"):
                by_count.setdefault(int(parts[0]), []).append(obj["Key"])
    if not by_count:
        raise DatasetNotFound(f"no test images under s3://{bucket}/{test_prefix}")
    chosen: list[tuple[int, str]] = []
    rounds = max(len(keys) for keys in by_count.values())
    for i in range(rounds):
        chosen += [(count, keys[i]) for count, keys in sorted(by_count.items()) if i < len(keys)]
    return [{"key": key, "count": count,
             "base64": base64.b64encode(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).decode()}
            for count, key in chosen[:how_many]]


def api_event(images: list[dict]) -> dict:
    """The event API Gateway (REST, proxy integration) sends for a JSON request with these images."""
    return {"resource": "/count", "path": "/count", "httpMethod": "POST",
            "headers": {"Content-Type": "application/json"}, "queryStringParameters": None,
            "requestContext": {"resourcePath": "/count", "httpMethod": "POST", "stage": "smoke-check"},
            "body": json.dumps({"images": [i["base64"] for i in images]}), "isBase64Encoded": False}


class SmokeCheckFailed(AssertionError):
    pass


def check_answers(payload: str | bytes | Mapping, images: list[dict], classes: int | None = None) -> dict:
    """The Lambda function's answer to the smoke event, checked: a 200 with one well-formed
    prediction per image. Returns a summary of counts next to the truth."""
    response = json.loads(payload) if isinstance(payload, (str, bytes)) else dict(payload)
    if "errorMessage" in response:
        raise SmokeCheckFailed(f"the function failed: {response.get('errorType')}: {response['errorMessage']}")
    status = response.get("statusCode")
    try:
        body = json.loads(response.get("body") or "{}")
    except json.JSONDecodeError as exc:
        raise SmokeCheckFailed(f"the function answered {status} with a body that is not JSON") from exc
    if status != 200:
        raise SmokeCheckFailed(f"the API answered {status}: {body.get('error')}: {body.get('message')}")
    predictions = body.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != len(images):
        raise SmokeCheckFailed(f"expected {len(images)} predictions, got {json.dumps(body)[:300]}")
    rows = []
    for image, prediction in zip(images, predictions, strict=True):
        probabilities = prediction.get("probabilities")
        count = prediction.get("count")
        if (not isinstance(count, int) or not isinstance(probabilities, list) or not probabilities
                or abs(sum(probabilities) - 1) > 1e-3 or not 0 <= count < len(probabilities)
                or (classes is not None and len(probabilities) != classes)):
            raise SmokeCheckFailed(f"malformed prediction for {image['key']}: {json.dumps(prediction)[:300]}")
        rows.append({"key": image["key"], "true": image["count"], "predicted": count,
                     "confidence": prediction.get("confidence")})
    return {"model_version": body.get("model_version"), "request_id": body.get("request_id"),
            "correct": sum(r["true"] == r["predicted"] for r in rows), "images": rows}


# -- requests the DAG sends, from its Params ------------------------------------------------------
def static_hyperparameters(params: Mapping) -> dict:
    return {"arch": params["arch"], "mode": params["mode"], "max-count": params["max_count"],
            **dict(params.get("extra_hyperparameters") or {})}


def tuning_request(params: Mapping, data: Mapping, account: Mapping, code_uri: str, dag_id: str,
                   run_id: str) -> dict:
    """CreateHyperParameterTuningJob for this run: trials train on train, are scored on validation."""
    names = sagemaker_config.run_job_names(dag_id, run_id)
    bucket = params["bucket"]
    trial = sagemaker_config.training_job_config(
        job_name=names["tuning_job"], image_uri=account["training_image"], role_arn=account["role_arn"],
        source_s3_uri=code_uri,
        channels={"train": data["channels"]["train"], "validation": data["channels"]["validation"]},
        output_s3_uri=f"s3://{bucket}/models/tuning/", hyperparameters=static_hyperparameters(params),
        region=account["region"], instance_type=params["training_instance_type"],
        tags=sagemaker_config.resource_tags({"bin-counter:dataset-version": data["version"],
                                             "bin-counter:dag-run": run_id}))
    ranges = sagemaker_config.search_ranges((params["epochs_min"], params["epochs_max"]), params["batch_sizes"],
                                            (params["lr_min"], params["lr_max"]))
    return sagemaker_config.tuning_job_config(
        names["tuning_job"], trial, ranges, params["objective"], params["max_jobs"],
        min(params["max_parallel_jobs"], params["max_jobs"]), strategy=params["strategy"])


def final_training_request(params: Mapping, data: Mapping, account: Mapping, code_uri: str, best: Mapping,
                           champion: Mapping | None, dag_id: str, run_id: str) -> dict:
    """CreateTrainingJob with the best trial's hyperparameters on train + validation, scoring the new
    model and the serving one (if any) on the test images."""
    names = sagemaker_config.run_job_names(dag_id, run_id)
    bucket = params["bucket"]
    channels = dict(data["channels"])
    if champion:
        channels["champion"] = champion["model_data_url"]
    hyperparameters = {**static_hyperparameters(params), **best["hyperparameters"], "train-on-validation": True}
    return sagemaker_config.training_job_config(
        job_name=names["training_job"], image_uri=account["training_image"], role_arn=account["role_arn"],
        source_s3_uri=code_uri, channels=channels, output_s3_uri=f"s3://{bucket}/models/",
        hyperparameters=hyperparameters, region=account["region"], instance_type=params["training_instance_type"],
        checkpoint_s3_uri=f"s3://{bucket}/checkpoints/{names['training_job']}/",
        tags=sagemaker_config.resource_tags({"bin-counter:dataset-version": data["version"],
                                             "bin-counter:dag-run": run_id,
                                             "bin-counter:best-trial": best["training_job"]}))


def deployment_requests(params: Mapping, job: Mapping, data: Mapping, account: Mapping,
                        decision: Mapping | None = None, champion: Mapping | None = None) -> dict:
    """CreateModel, CreateEndpointConfig and Create/UpdateEndpoint for the model the gate chose: the
    finished training job's, or (decision "published") the published champion scored in that job.
    Named after the job (`...-published` for the champion), tagged with where it came from."""
    name, artifact = job["TrainingJobName"], job["ModelArtifacts"]["S3ModelArtifacts"]
    metrics = sagemaker_config.final_metrics(job)
    labels = {"bin-counter:training-job": name, "bin-counter:dataset-version": data["version"]}
    if decision and decision.get("deploy") == "published":
        name, artifact = name.removesuffix("-final") + "-published", champion["model_data_url"]
        labels["bin-counter:published-model"] = champion["model_version"]
        metrics = {k.replace("champion:", "test:"): v for k, v in metrics.items() if k.startswith("champion:")}
    tags = sagemaker_config.resource_tags({
        **labels, **{f"bin-counter:{k.replace(':', '-')}": round(v, 4) for k, v in metrics.items()
                     if k.startswith(("test:", "champion:"))}})
    model = sagemaker_config.model_config(name, account["inference_image"], artifact, account["role_arn"], tags)
    config = sagemaker_config.endpoint_config(name, name, params["endpoint_instance_type"], tags=tags)
    return {"model": model, "endpoint_config": config,
            "endpoint": {"EndpointName": params["endpoint_name"], "EndpointConfigName": name}}


def function_settings(lambda_dir: Path = LAMBDA_DIR) -> dict:
    """lambda/function.json: the runtime, limits and settings the API function runs with on AWS."""
    return {k: v for k, v in json.loads((lambda_dir / "function.json").read_text()).items() if k != "//"}


def ensure_function(lambda_client, name: str, endpoint_name: str, role_arn: str) -> str:
    """Create the API's Lambda function, or update its code and point it at `endpoint_name`.
    Returns the function's ARN.

    A new function gets lambda/function.json's runtime, limits and settings, as lambda/template.yaml's
    does. An existing function (for example the template's) keeps its role, limits and other settings:
    only the code and ENDPOINT_NAME are the DAG's to change.
    """
    code = function_zip()
    settings = function_settings()
    try:
        existing = lambda_client.get_function(FunctionName=name)["Configuration"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        existing = None
    if existing is None:
        created = lambda_client.create_function(
            FunctionName=name, Runtime=settings["Runtime"], Role=role_arn, Handler=settings["Handler"],
            Code={"ZipFile": code}, Timeout=settings["Timeout"], MemorySize=settings["MemorySize"],
            Environment={"Variables": {**settings["Environment"], "ENDPOINT_NAME": endpoint_name}},
            Description="bin-counter public API: counts items in a bin photo")
        log.info("created Lambda function %s for endpoint %s", name, endpoint_name)
        arn = created["FunctionArn"]
    else:
        lambda_client.update_function_code(FunctionName=name, ZipFile=code)
        _wait_updated(lambda_client, name)
        variables = dict((existing.get("Environment") or {}).get("Variables") or {})
        if variables.get("ENDPOINT_NAME") != endpoint_name:
            variables["ENDPOINT_NAME"] = endpoint_name
            lambda_client.update_function_configuration(FunctionName=name, Environment={"Variables": variables})
        log.info("updated Lambda function %s for endpoint %s", name, endpoint_name)
        arn = existing["FunctionArn"]
    _wait_updated(lambda_client, name)
    return arn


def _wait_updated(lambda_client, name: str) -> None:
    # On AWS a function takes seconds to apply an update and refuses a second one meanwhile.
    lambda_client.get_waiter("function_updated_v2").wait(FunctionName=name,
                                                         WaiterConfig={"Delay": 2, "MaxAttempts": 60})
