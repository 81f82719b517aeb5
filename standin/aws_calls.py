"""Who asked for which IAM action on which resource: one log that both local servers write.

On AWS every request is authorised by IAM against the policies of the principal that signed it. Locally
nothing refuses anything, so the moto server (`standin.moto_server`) and the stand-in write each request
here as IAM would see it (caller, action, resources), and the tests hold every line against the policies
in `infra/pipeline.yaml` (`standin.iam`). The caller is read from the request's signature, as AWS reads
it: the access key in `Authorization`, or, for a role's temporary credentials, the session.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from standin.core import Headers

# The access key the Airflow workers sign with in the local stack (their AWS connection's login).
WORKER_ACCESS_KEY_ID = "AKIALOCALAIRFLOWWORKER"
# The temporary credentials the stand-in uses when it acts as a role, as SageMaker and Lambda do after
# sts:AssumeRole; the session token names the role so that a log line can say whose request it was.
ASSUMED_ROLE_KEY_ID = "ASIALOCALASSUMEDROLE"
ROLE_TOKEN_PREFIX = "assumed-role="  # noqa: S105 - a marker, not a secret
# AWS's own work in the account, which no principal of the account asks for and IAM does not authorise:
# SageMaker publishing its endpoints' metrics, CloudWatch evaluating alarms. The stand-in signs those
# requests to moto with this key, and the call log leaves them out (standin.moto_server).
SERVICE_ACCESS_KEY_ID = "AKIALOCALAWSSERVICE"
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


def role_credentials(role_arn: str) -> dict[str, str]:
    """boto3 client keyword arguments for acting as `role_arn`."""
    return {
        "aws_access_key_id": ASSUMED_ROLE_KEY_ID,
        "aws_secret_access_key": "local",
        "aws_session_token": ROLE_TOKEN_PREFIX + role_arn,
    }


def service_credentials() -> dict[str, str]:
    """boto3 client keyword arguments for AWS's own work (SERVICE_ACCESS_KEY_ID)."""
    return {"aws_access_key_id": SERVICE_ACCESS_KEY_ID, "aws_secret_access_key": "local"}


def role_environment(role_arn: str) -> dict[str, str]:
    """The same credentials as the environment variables Lambda gives a function."""
    credentials = role_credentials(role_arn)
    return {
        "AWS_ACCESS_KEY_ID": credentials["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": credentials["aws_secret_access_key"],
        "AWS_SESSION_TOKEN": credentials["aws_session_token"],
    }


def caller(headers: Headers) -> str:
    """The role ARN of an assumed-role request, else the signing access key id ("anonymous" unsigned)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    token = lowered.get("x-amz-security-token", "")
    if token.startswith(ROLE_TOKEN_PREFIX):
        return token.removeprefix(ROLE_TOKEN_PREFIX)
    found = _CREDENTIAL.search(lowered.get("authorization", ""))
    return found.group(1) if found else "anonymous"


class CallLog:
    """Appends one JSON line per authorised action; a no-op without a path."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self.lock = threading.Lock()

    def record(self, who: str, actions: Iterable[tuple] | Callable[[], Iterable[tuple]], server: str) -> None:
        """`actions`: (action, resource) or (action, resource, condition context) tuples, or a function
        that returns them: it is called only when there is a log (what IAM authorises is read from AWS's
        Service Authorization Reference, `standin.sar`, a test-and-lint dependency the stand-in's image
        does not hold)."""
        if self.path is None:
            return
        if callable(actions):
            actions = actions()
        lines = "".join(
            json.dumps(
                {
                    "time": time.time(),
                    "caller": who,
                    "action": entry[0],
                    "resource": entry[1],
                    "context": entry[2] if len(entry) > 2 else {},
                    "server": server,
                }
            )
            + "\n"
            for entry in actions
        )
        with self.lock, self.path.open("a") as log:
            log.write(lines)


def read_calls(path: Path, offset: int = 0) -> list[dict]:
    """The log's lines from byte `offset` on (a test notes the size when it starts)."""
    if not path.is_file():
        return []
    with path.open() as log:
        log.seek(offset)
        return [json.loads(line) for line in log if line.strip()]
