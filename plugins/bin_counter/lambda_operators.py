"""The provider's Lambda invoke operator, logging a digest of its payload instead of the payload.

The provider's LambdaInvokeFunctionOperator.execute logs one line with the whole payload: the smoke
event carries up to 8 photos in base64 (about 1 MB), which would go to the task log (CloudWatch Logs on
MWAA) on every run. Only that line is changed; the provider's execute runs as it is. Kept apart from
api_function.py so that the DAG file imports it without the dataset code.
"""

from __future__ import annotations

import hashlib

from airflow.providers.amazon.aws.operators.lambda_function import LambdaInvokeFunctionOperator

# The provider's LambdaInvokeFunctionOperator.execute logs this line with the whole payload: the
# smoke event carries up to 8 photos in base64 (about 1 MB), which would go to the task log (CloudWatch
# Logs on MWAA) on every run. Only that line is changed; the provider's execute runs as it is.
PROVIDER_PAYLOAD_LINE = "Invoking AWS Lambda function: %s with payload: %s"


def payload_digest(payload: str | bytes | None) -> str:
    """A payload's size and hash, enough to tell two payloads apart in a log without their content."""
    data = payload.encode() if isinstance(payload, str) else (payload or b"")
    return f"<{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}>"


class _PayloadDigestLog:
    """A logger passing everything on, but with the payload in the provider's invoking line replaced
    by its digest."""

    def __init__(self, log):
        self._log = log

    def info(self, event, *args, **kwargs):
        if event == PROVIDER_PAYLOAD_LINE and len(args) == 2:
            args = (args[0], payload_digest(args[1]))
        return self._log.info(event, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._log, name)


class DigestLambdaInvokeFunctionOperator(LambdaInvokeFunctionOperator):
    """The provider's LambdaInvokeFunctionOperator, logging the payload's size and hash, not the payload."""

    @property
    def log(self):
        return _PayloadDigestLog(super().log)
