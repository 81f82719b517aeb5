"""Lambda's errors as AWS sends them (REST-JSON): the code in `x-amzn-ErrorType`, the HTTP status, and
a body naming whose fault it is and why."""

from __future__ import annotations

from standin.core import AwsError


class LambdaError(AwsError):
    """A request Lambda refuses."""

    def body(self) -> dict:
        return {"Type": "User", "message": self.message}


class InvalidParameterValueException(LambdaError):
    code = "InvalidParameterValueException"


class InvalidRequestContentException(LambdaError):
    """An invocation payload that is not JSON."""

    code = "InvalidRequestContentException"


class ResourceNotFoundException(LambdaError):
    code = "ResourceNotFoundException"
    status = 404


class ResourceConflictException(LambdaError):
    code = "ResourceConflictException"
    status = 409


class UnknownOperationException(LambdaError):
    """A method and path of the Lambda API that the stand-in does not serve."""

    code = "UnknownOperationException"
    status = 404


class ServiceException(LambdaError):
    """The stand-in failed, not the request."""

    code = "ServiceException"
    status = 500

    def body(self) -> dict:
        return {"message": self.message}
