"""SageMaker's errors as AWS sends them: each code with its HTTP status, and the body that carries it
in each protocol (AWS JSON 1.1 for the SageMaker API, REST-JSON for SageMaker Runtime). The same
error can travel either way: InvokeEndpoint on a name that does not exist answers the API's
ValidationException in Runtime's shape."""

from __future__ import annotations

from standin.core import AwsError


class ValidationException(AwsError):
    """A bad request, and also a name that does not exist: SageMaker answers this there, not the
    ResourceNotFound its service model lists for some operations, and the Amazon provider relies on it."""

    code = "ValidationException"


class ResourceInUse(AwsError):
    """A training or tuning job name that exists already (a model's, configuration's or endpoint's
    gets ValidationException)."""

    code = "ResourceInUse"


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
        super().__init__(f"Received {side} error ({original_status}) from primary with message "
                         f"\"{original_message}\".",
                         extra={"OriginalStatusCode": original_status, "OriginalMessage": original_message})


def json_body(error: AwsError) -> dict:
    """The SageMaker API's error body (AWS JSON 1.1): the code as `__type`."""
    return {"__type": error.code, "message": error.message, **error.extra}


def runtime_body(error: AwsError) -> dict:
    """SageMaker Runtime's error body (REST-JSON): the code travels in `x-amzn-ErrorType` instead."""
    return {"message": error.message, **error.extra}
