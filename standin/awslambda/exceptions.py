"""Lambda's errors as AWS sends them (REST-JSON): the code in `x-amzn-ErrorType`, the HTTP status, and
a body naming whose fault it is and why."""

from __future__ import annotations

from standin.core import AwsError

# Lambda's payload limits for a synchronous (RequestResponse) invocation: "6 MB each for request and
# response" (Lambda quotas, https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html;
# the Invoke reference: "For synchronous invocations, the maximum payload size is 6 MB"). In bytes
# they differ by 100, as Lambda's own answers say:
# - a request: "Request must be smaller than 6291456 bytes for the InvokeFunction operation", 413
#   RequestEntityTooLargeException (awslabs/aws-athena-query-federation#793, pelmers/streetwarp-web#14;
#   botocore's model calls the shape RequestTooLargeException, but the wire's code is this one). Taken
#   at its word: a payload of 6291456 bytes is refused too.
# - a response: "Response payload size exceeded maximum allowed payload size (6291556 bytes).", as the
#   function's error (Function.ResponseSizeTooLarge) in a 200 answer with X-Amz-Function-Error (Zac
#   Charles, "Deep Dive: Lambda's Response Payload Size Limit", 2022; DataBiosphere/azul#7466, where
#   API Gateway turns it into a 502). A payload of exactly 6291556 bytes is taken.
MAX_REQUEST_PAYLOAD_BYTES = 6 * 1024 * 1024
MAX_RESPONSE_PAYLOAD_BYTES = 6 * 1024 * 1024 + 100
RESPONSE_TOO_LARGE = {
    "errorMessage": "Response payload size exceeded maximum allowed payload size "
    f"({MAX_RESPONSE_PAYLOAD_BYTES} bytes).",
    "errorType": "Function.ResponseSizeTooLarge",
}


class LambdaError(AwsError):
    """A request Lambda refuses."""

    def body(self) -> dict:
        return {"Type": "User", "message": self.message}


class InvalidParameterValueException(LambdaError):
    code = "InvalidParameterValueException"


class ValidationException(LambdaError):
    """A value outside the service model's constraints (length, pattern, range, enum)."""

    code = "ValidationException"


class InvalidRequestContentException(LambdaError):
    """An invocation payload that is not JSON."""

    code = "InvalidRequestContentException"


class RequestEntityTooLargeException(LambdaError):
    """An invocation payload above MAX_REQUEST_PAYLOAD_BYTES."""

    code = "RequestEntityTooLargeException"
    status = 413

    @classmethod
    def for_invoke(cls) -> RequestEntityTooLargeException:
        return cls(f"Request must be smaller than {MAX_REQUEST_PAYLOAD_BYTES} bytes for the InvokeFunction operation")


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
