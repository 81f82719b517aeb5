"""Starting the local stack's servers on loopback: a moto server and the stand-in.

Used by the tests and the benchmarks (and by whatever starts the whole stack), so there is one way
to pick a port, start a server, wait until it answers, and point Airflow's AWS connection at it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from standin.aws_calls import WORKER_ACCESS_KEY_ID

ROOT = Path(__file__).resolve().parents[1]
STANDIN_SERVICES = ("sagemaker", "sagemaker-runtime", "lambda")  # the services the stand-in answers
# infra/pipeline.yaml's parameters as the local stack deploys it. Neither equals the template's default,
# so a name that reaches AWS only through a default (a DAG Param, a script's literal) fails here as it
# would in an account where the stack was deployed with other names; the bucket is the template's own
# bin-counter-<account>-<region>, which no DAG and no script names.
# No CloudFormation runs here, so no API stack either: the retraining DAG creates the API function.
LOCAL_STACK_PARAMETERS = {
    "EndpointName": "bc-local-endpoint",
    "FunctionName": "bc-local-api",
    "ApiFunctionOwner": "dags",
    # Not the template's default (bin-counter-alerts): code that named the default would pass here.
    "AlertsTopicName": "bc-local-alerts",
}


def local_stack():
    """infra/pipeline.yaml as CloudFormation would create it for the local stack (a standin.iam.Stack)."""
    from standin.iam import load_template, render  # cfn-lint's loader: only where a template is read

    return render(load_template(), LOCAL_STACK_PARAMETERS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def airflow_connection(
    moto: str,
    standin: str | None = None,
    *,
    login: str | None = WORKER_ACCESS_KEY_ID,
    services: tuple[str, ...] = STANDIN_SERVICES,
) -> dict:
    """The Airflow AWS connection of the local stack: S3, logs and SNS on the moto server at `moto`,
    `services` (SageMaker, SageMaker Runtime and Lambda) on the stand-in at `standin`, signing as
    `login` (the Airflow worker's key; None: the environment's credentials). On AWS the same DAGs run
    with a connection without these endpoint URLs (and with the worker's own credentials)."""
    extra: dict = {"endpoint_url": moto, "region_name": "us-east-1"}
    if standin:
        extra["service_config"] = {service: {"endpoint_url": standin} for service in services}
    credentials = {"login": login, "password": "local"} if login else {}
    return {"conn_type": "aws", **credentials, "extra": extra}


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll `url` until it answers; fail early if `process` exits, and after `timeout`."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - our own loopback servers
            return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"{url} did not come up (exit code {process.poll()})") from None
            time.sleep(0.1)


def start_moto(port: int | None = None, call_log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A moto server (S3, CloudWatch Logs, ...) on loopback; returns the process and its endpoint.
    With `call_log`, every request's IAM actions are written there (standin.aws_calls)."""
    port = port or free_port()
    log = ["--call-log", str(call_log)] if call_log else []
    process = subprocess.Popen(
        [sys.executable, "-m", "standin.moto_server", "-H", "127.0.0.1", "-p", str(port), *log],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_until_up(f"{endpoint}/moto-api/", process)
    return process, endpoint


def start_standin(
    state_dir: Path,
    aws_endpoint: str,
    container_python: Path,
    port: int | None = None,
    api_key: str | None = None,
    extra_args: tuple[str, ...] = (),
    call_log: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """The SageMaker and Lambda stand-in (and the local API gateway, requiring `api_key` when given)
    on loopback; returns the process and its endpoint. `extra_args` are more `standin.server` flags;
    with `call_log`, every request's IAM actions are written there (standin.aws_calls)."""
    port = port or free_port()
    key = ["--api-key", api_key, *extra_args] if api_key else list(extra_args)
    if call_log:
        key += ["--call-log", str(call_log)]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "standin.server",
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--aws-endpoint",
            aws_endpoint,
            "--container-python",
            str(container_python),
            *key,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_until_up(f"{endpoint}/health", process)
    return process, endpoint
