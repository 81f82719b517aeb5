"""What bin_count_deploy and the registration build, validated against botocore's own service models
(SageMaker and CloudWatch): the registry version, the model and configuration made from it, the
blue/green DeploymentConfig and the alarms; and the comparison a reviewer reads."""

from __future__ import annotations

import botocore.session
import pytest
from botocore.validate import ParamValidator

from bin_counter import registry, rollout
from tests.airflow_side.test_sagemaker_config import validate

VERSION = {
    "arn": "arn:aws:sagemaker:us-east-1:123456789012:model-package/bc-endpoint-models/3",
    "group": "bc-endpoint-models",
    "version": 3,
    "image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5-cpu-py311",
    "model_data_url": "s3://bucket/models/bin-counter-0123456789ab-final/output/model.tar.gz",
    "environment": {"SAGEMAKER_PROGRAM": "inference.py"},
    "model_version": "mv-1",
    "dataset_version": "v-1",
    "training_job": "bin-counter-0123456789ab-final",
}
PARAMS = {
    "endpoint_name": "bc-endpoint",
    "endpoint_instance_type": "ml.m5.large",
    "instance_count": 2,
    "serving_workers": None,
    "rollout": "canary",
    "canary_percent": 50,
    "linear_step_percent": 25,
    "bake_minutes": 10,
    "termination_wait_minutes": 5,
    "max_5xx_per_minute": 1,
    "max_model_latency_ms": 2000,
}
ROLE = "arn:aws:iam::123456789012:role/bin-counter-sagemaker"
CARD_METRICS = {
    "test": {
        "n": 6,
        "accuracy": 0.5,
        "rmse": 1.0,
        "mae": 0.7,
        "within_1": 0.83,
        "per_class_accuracy": {"0": 1.0, "1": 0.5},
        "confusion_matrix": [[2, 0], [1, 1]],
        "model_version": "mv-new",
    },
    "champion": {
        "n": 6,
        "accuracy": 0.33,
        "rmse": 1.2,
        "mae": 0.9,
        "within_1": 0.66,
        "per_class_accuracy": {"0": 0.5, "1": 0.5},
        "confusion_matrix": [[1, 1], [1, 1]],
        "model_version": "mv-old",
    },
}


def validate_cloudwatch(operation: str, params: dict) -> None:
    shape = botocore.session.get_session().get_service_model("cloudwatch").operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()


@pytest.mark.parametrize("rollout_kind", ["canary", "linear", "all_at_once"])
def test_an_update_is_blue_green_with_the_rollouts_traffic_shifting_and_the_alarms(rollout_kind):
    # A linear step of 25% is one whole instance of four (of two it would be none: refused).
    count = 4 if rollout_kind == "linear" else 2
    built = rollout.deployment_requests(
        VERSION,
        {**PARAMS, "rollout": rollout_kind, "instance_count": count},
        ROLE,
        "0123456789abcdef",
        endpoint_exists=True,
        reason="why",
    )
    validate("CreateModel", built["model"])
    validate("CreateEndpointConfig", built["endpoint_config"])
    validate("UpdateEndpoint", built["endpoint"])
    assert built["operation"] == "update"
    policy = built["endpoint"]["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    routing = policy["TrafficRoutingConfiguration"]
    assert routing["Type"] == rollout_kind.upper() and routing["WaitIntervalInSeconds"] == 600
    assert policy["TerminationWaitInSeconds"] == 300
    if rollout_kind == "canary":
        assert routing["CanarySize"] == {"Type": "CAPACITY_PERCENT", "Value": 50}
    if rollout_kind == "linear":
        assert routing["LinearStepSize"] == {"Type": "CAPACITY_PERCENT", "Value": 25}
    # The rollout's budget covers its bakes: four linear steps of ten minutes need more than the minimum.
    steps = {"canary": 2, "linear": 4, "all_at_once": 1}[rollout_kind]
    assert policy["MaximumExecutionTimeoutInSeconds"] >= steps * 600 + 300
    watched = [a["AlarmName"] for a in built["endpoint"]["DeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"]]
    assert watched == [a["AlarmName"] for a in built["alarms"]] == list(rollout.alarm_names("bc-endpoint").values())
    for alarm in built["alarms"]:
        validate_cloudwatch("PutMetricAlarm", alarm)
        assert alarm["Period"] == 60 and alarm["Namespace"] == "AWS/SageMaker"
    assert built["endpoint_config"]["ProductionVariants"][0]["InitialInstanceCount"] == count


def test_a_first_deployment_creates_the_endpoint_and_names_follow_the_version_and_the_run():
    built = rollout.deployment_requests(VERSION, PARAMS, ROLE, "0123456789abcdef", endpoint_exists=False)
    validate("CreateEndpoint", built["endpoint"])
    assert built["operation"] == "create" and "DeploymentConfig" not in built["endpoint"]
    assert built["model"]["ModelName"] == "bin-counter-bc-endpoint-v3"  # one model per version: a rollback reuses it
    assert built["endpoint_config"]["EndpointConfigName"] == "bin-counter-bc-endpoint-v3-0123456789ab"
    tags = {t["Key"]: t["Value"] for t in built["model"]["Tags"]}
    assert tags["bin-counter:model-package"] == VERSION["arn"] and tags["bin-counter:model-version"] == "mv-1"
    one = rollout.deployment_requests(VERSION, {**PARAMS, "serving_workers": 1}, ROLE, "x" * 16, False)["model"]
    assert one["PrimaryContainer"]["Environment"] == {
        "SAGEMAKER_PROGRAM": "inference.py",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
    }


def test_the_alarms_watch_what_sagemaker_publishes_in_its_units():
    errors, latency = rollout.endpoint_alarms("bc-endpoint", 3, 250)
    assert errors["MetricName"] == "Invocation5XXErrors" and errors["Statistic"] == "Sum" and errors["Threshold"] == 3
    assert latency["MetricName"] == "ModelLatency" and latency["Threshold"] == 250_000  # microseconds
    for alarm in (errors, latency):
        assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {
            "EndpointName": "bc-endpoint",
            "VariantName": "AllTraffic",
        }
        assert alarm["TreatMissingData"] == "notBreaching"


def test_a_version_request_is_valid_and_carries_the_report_and_where_the_model_came_from():
    request = registry.version_request(
        "bc-endpoint-models",
        VERSION["image"],
        VERSION["model_data_url"],
        "s3://bucket/models/evaluations/job/new/evaluation.json",
        {"model-version": "mv-new", "training-job": "job", "dataset-version": "v-1", "gate": "new", "empty": ""},
        "mv-new: better",
    )
    validate("CreateModelPackage", request)
    assert request["ModelApprovalStatus"] == "PendingManualApproval"
    assert request["CustomerMetadataProperties"] == {
        "model-version": "mv-new",
        "training-job": "job",
        "dataset-version": "v-1",
        "gate": "new",
    }
    spec = request["InferenceSpecification"]
    # What the model's inference.py accepts, read from the contract it checks requests against.
    assert {"image/jpeg", "application/x-image", "application/json"} <= set(spec["SupportedContentTypes"])
    assert request["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"].endswith("evaluation.json")


def test_the_review_page_compares_both_models_and_says_what_the_gate_thinks():
    decision = {"deploy": "new", "reason": "the new model is not worse than the serving one"}
    report = registry.evaluation_report(CARD_METRICS, decision, "job", "v-1")
    assert report["multiclass_classification_metrics"]["confusion_matrix"] == {
        "0": {"0": 2, "1": 0},
        "1": {"0": 1, "1": 1},
    }
    page = registry.review_markdown(report)
    assert "| accuracy (exact count) | 0.500 | 0.330 | candidate |" in page
    assert "| RMSE (items) | 1.000 | 1.200 | candidate |" in page
    assert "| 0 | 1.000 | 0.500 |" in page  # per count
    assert "**The gate says:** the new model is not worse" in page
    # Registering the published model (it scored better before anything served): it is the candidate.
    published = registry.evaluation_report(CARD_METRICS, {"deploy": "published", "reason": "r"}, "job", "v-1")
    assert published["comparison"]["candidate"]["model_version"] == "mv-old"
    first = registry.evaluation_report({"test": CARD_METRICS["test"]}, decision, "job", "v-1")
    assert "Nothing serves yet" in registry.review_markdown(first)


def test_a_version_is_named_by_number_or_arn_and_anything_else_is_refused_clearly():
    assert registry.version_arn(None, "g", VERSION["arn"]) == VERSION["arn"]
    with pytest.raises(registry.RegistryError, match="neither a version number"):
        registry.version_arn(None, "g", "latest")


def test_capture_percent_puts_data_capture_in_our_bucket_on_the_config_and_zero_leaves_it_off():
    built = rollout.deployment_requests(
        VERSION, {**PARAMS, "bucket": "bc-data", "capture_percent": 20}, ROLE, "0123456789abcdef", True
    )
    validate("CreateEndpointConfig", built["endpoint_config"])
    capture = built["endpoint_config"]["DataCaptureConfig"]
    assert capture["DestinationS3Uri"] == "s3://bc-data/captures" and capture["InitialSamplingPercentage"] == 20
    assert capture["EnableCapture"] is True
    off = rollout.deployment_requests(
        VERSION, {**PARAMS, "bucket": "bc-data", "capture_percent": 0}, ROLE, "x" * 16, True
    )
    assert "DataCaptureConfig" not in off["endpoint_config"]
