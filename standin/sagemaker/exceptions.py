"""SageMaker's errors as AWS sends them: each code with its HTTP status, and the body that carries it
in each protocol (AWS JSON 1.1 for the SageMaker API, REST-JSON for SageMaker Runtime). The two
services name a bad request differently: the API's ValidationException, Runtime's ValidationError
(InvokeEndpoint on a missing endpoint: "Endpoint <name> of account <id> not found.")."""

from __future__ import annotations

from standin.core import AwsError

# SageMaker Runtime InvokeEndpoint's largest request body for a real-time endpoint: 6 MB, which is
# 6 MiB: botocore's sagemaker-runtime service model (which the API reference is generated from) gives
# InvokeEndpoint's Body (BodyBlob) "max": 6291456, and AWS's support answers cite the 6 MB limit
# (re:Post, "...received client error 413 from primary..."); serverless endpoints take 4 MB
# (docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints-invoke.html). boto3 does not check it
# (botocore validates only minimums), so the service refuses the body: 400 ValidationError, "Request
# <request id> has oversize body." (aws/sagemaker-python-sdk#4271, a serverless endpoint over its 4 MB). In front of
# real-time endpoints in 2018, at the old 5 MB limit, an HTTP 413 without an error code was reported
# ("HTTP content length exceeded 5246976 bytes.", aws/sagemaker-python-sdk#171); the stand-in answers
# SageMaker Runtime's own, modelled error at the documented limit, which is at least as strict.
MAX_INVOKE_BODY_BYTES = 6 * 1024 * 1024


class ValidationException(AwsError):
    """A bad request, and also a model, endpoint configuration, endpoint, training or transform job that
    does not exist: SageMaker answers this there, not the ResourceNotFound its service model lists for
    DescribeTrainingJob and DescribeTransformJob, and the Amazon provider relies on it (moto answers the same)."""

    code = "ValidationException"


class ResourceNotFound(AwsError):
    """A tuning job that does not exist: there SageMaker does answer its service model's ResourceNotFound,
    400 ("An error occurred (ResourceNotFound) when calling the DescribeHyperParameterTuningJob operation:
    Amazon SageMaker can't find a tuning job called DEMO-hpo-mxnet. Type another name.",
    aws/amazon-sagemaker-examples#1540; moto answers the same code)."""

    code = "ResourceNotFound"


class ResourceInUse(AwsError):
    """A training or tuning job name that exists already (a model's, configuration's or endpoint's
    gets ValidationException)."""

    code = "ResourceInUse"


class RuntimeValidationError(AwsError):
    """SageMaker Runtime's bad request: its service model names it ValidationError (the SageMaker API's
    is ValidationException)."""

    code = "ValidationError"

    @classmethod
    def oversize_body(cls, request_id: str) -> RuntimeValidationError:
        """An InvokeEndpoint body above MAX_INVOKE_BODY_BYTES."""
        return cls(f"Request {request_id} has oversize body.")


class UnknownOperationException(AwsError):
    code = "UnknownOperationException"


class SerializationException(AwsError):
    code = "SerializationException"


class InternalFailure(AwsError):
    code = "InternalFailure"
    status = 500


class ThrottlingException(AwsError):
    """InvokeEndpoint past the account's rate."""

    code = "ThrottlingException"


class ServiceUnavailable(AwsError):
    code = "ServiceUnavailable"
    status = 503


class ModelNotReadyException(AwsError):
    code = "ModelNotReadyException"
    status = 424


class ModelError(AwsError):
    """The model server answered an error: its status and body come back as OriginalStatusCode and
    OriginalMessage, which the API function reads."""

    code = "ModelError"
    status = 424

    def __init__(self, original_status: int, original_message: str) -> None:
        side = "client" if original_status < 500 else "server"
        super().__init__(
            f'Received {side} error ({original_status}) from primary with message "{original_message}".',
            extra={"OriginalStatusCode": original_status, "OriginalMessage": original_message},
        )


def json_body(error: AwsError) -> dict:
    """The SageMaker API's error body (AWS JSON 1.1): the code as `__type`."""
    return {"__type": error.code, "message": error.message, **error.extra}


def runtime_body(error: AwsError) -> dict:
    """SageMaker Runtime's error body (REST-JSON): the code travels in `x-amzn-ErrorType` instead."""
    return {"message": error.message, **error.extra}
