"""The Lambda backend: functions (configuration and code under `<state>/lambda/<name>/`) and the
execution environments they run in. Requests arrive here already parsed and checked against
botocore's service model (`responses`).

Invocations run in execution environments (`runner.py` processes) with the function's environment
variables, its timeout and, where the OS allows, its memory size as an address-space limit. As on
Lambda, an environment imports the function once and stays warm for the next invocation; concurrent
invocations get environments of their own; a new code or configuration revision gets new ones; an
environment that failed, timed out or ran out of memory is thrown away. A handler that raises, times
out or runs out of memory answers 200 with `X-Amz-Function-Error: Unhandled` and the error payload,
as Lambda does. Payloads keep Lambda's limits (`exceptions`): a request above them is refused before
the function runs, a response above them is the function's error.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from standin.aws_calls import role_environment
from standin.awslambda.exceptions import (
    MAX_REQUEST_PAYLOAD_BYTES,
    MAX_RESPONSE_PAYLOAD_BYTES,
    RESPONSE_TOO_LARGE,
    InvalidParameterValueException,
    InvalidRequestContentException,
    RequestEntityTooLargeException,
    ResourceConflictException,
    ResourceNotFoundException,
)
from standin.awslambda.logs import FunctionLogs, stream_name
from standin.cloudwatch.metrics import LAMBDA_NAMESPACE, MetricPublisher, lambda_values
from standin.core import ACCOUNT
from standin.roles import RoleCheck

RUNNER = Path(__file__).resolve().parent / "runner.py"
CONFIG_FIELDS = ("Role", "Handler", "Description", "Timeout", "MemorySize", "Environment", "Runtime")


class Timedout(Exception):
    pass


class ExecutionEnvironment:
    """One warm runner process of one function revision."""

    def __init__(
        self, command: list[str], env: dict, log_path: Path, revision: str, shipped: tuple | None = None
    ) -> None:
        """`shipped`: (FunctionLogs, role, function) to send the output to CloudWatch Logs as well."""
        self.revision = revision
        self.log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        output = subprocess.PIPE if shipped else self.log
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=output, env=env)
        self.following = shipped is not None
        if shipped is not None:
            logs, role, function = shipped
            # One stream per execution environment; the follower closes the log file when the process ends.
            logs.follow(self.process.stderr, self.log, role, function, stream_name())

    def invoke(self, payload: bytes, timeout_s: float) -> dict:
        """The runner's answer ({"result": ...} or {"error": ...}); Timedout, or EOFError when it died."""
        # One event per line: JSON's own text has no line breaks but between tokens.
        line = payload if payload and b"\n" not in payload else json.dumps(json.loads(payload or b"{}")).encode()
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None  # both PIPE
        stdin.write(line + b"\n")
        stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                raise Timedout
        line = stdout.readline()
        if not line:
            raise EOFError(self.process.wait())
        return json.loads(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self.following:
            self.log.close()


class LambdaBackend:
    """Functions: their records and code, and a pool of warm environments per function."""

    def __init__(
        self,
        state_dir: Path,
        python: str = sys.executable,
        region: str = "us-east-1",
        roles: RoleCheck | None = None,
        metrics: MetricPublisher | None = None,
        logs: FunctionLogs | None = None,
    ) -> None:
        self.roles = roles or RoleCheck(None)
        # The functions' output in CloudWatch Logs (standin.awslambda.logs); None: function.log only.
        self.logs = logs
        # Lambda's own metrics (AWS/Lambda, standin.cloudwatch.metrics); None: none published.
        self.metrics = metrics
        self.running: dict[str, int] = {}  # function -> invocations running now (ConcurrentExecutions)
        self.root = Path(state_dir) / "lambda"
        self.root.mkdir(parents=True, exist_ok=True)
        self.python, self.region = python, region
        self.lock = threading.Lock()
        self.warm: dict[str, list[ExecutionEnvironment]] = {}  # function -> idle environments
        # function -> its function.json as written: every change goes through _save, and an invocation
        # should not read the disk twice (the API's every request invokes the function).
        self.saved: dict[str, str] = {}
        self.saved_lock = threading.Lock()

    def _assume(self, role: str | None) -> None:
        # Lambda assumes the role at the request: one that does not trust Lambda is refused there.
        if role and self.roles.refusal(role, "lambda.amazonaws.com"):
            raise InvalidParameterValueException("The role defined for the function cannot be assumed by Lambda.")

    def arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{ACCOUNT}:function:{name}"

    def _folder(self, name: str) -> Path:
        return self.root / name

    def _config(self, name: str) -> dict:
        with self.saved_lock:  # one reader or writer at a time: a deletion cannot be read back into it
            text = self.saved.get(name)
            if text is None:
                path = self._folder(name) / "function.json"
                if not path.is_file():
                    raise ResourceNotFoundException(f"Function not found: {self.arn(name)}")
                text = self.saved[name] = path.read_text()
        return json.loads(text)

    def _install_code(self, name: str, zip_bytes: bytes) -> dict:
        code = self._folder(name) / "code"
        staging = self._folder(name) / "code.new"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
                archive.extractall(staging)
        except zipfile.BadZipFile as exc:
            raise InvalidParameterValueException(f"Could not unzip uploaded file: {exc}") from exc
        shutil.rmtree(code, ignore_errors=True)
        staging.rename(code)
        return {"CodeSize": len(zip_bytes), "CodeSha256": base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode()}

    def _save(self, config: dict) -> dict:
        config["LastModified"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        config["RevisionId"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:36]
        text = json.dumps(config)
        with self.saved_lock:
            (self._folder(config["FunctionName"]) / "function.json").write_text(text)
            self.saved[config["FunctionName"]] = text
        return config

    def create_function(self, params: dict) -> dict:
        """CreateFunction, its code (`Code.ZipFile`) as bytes."""
        self._assume(params.get("Role"))
        code = params.get("Code", {})
        name = params["FunctionName"]
        if "ZipFile" not in code:
            raise InvalidParameterValueException("the stand-in takes the code as Code.ZipFile only")
        with self.lock:
            if (self._folder(name) / "function.json").exists():
                raise ResourceConflictException(f"Function already exist: {name}")
            self._folder(name).mkdir(parents=True)
            sizes = self._install_code(name, code["ZipFile"])
            config = {
                "FunctionName": name,
                "FunctionArn": self.arn(name),
                "Runtime": params.get("Runtime", "python3.11"),
                "Timeout": params.get("Timeout", 3),
                "MemorySize": params.get("MemorySize", 128),
                "Version": "$LATEST",
                "State": "Active",
                "LastUpdateStatus": "Successful",
                "PackageType": "Zip",
                **{k: params[k] for k in CONFIG_FIELDS if k in params},
                **sizes,
            }
            return self._save(config)

    def get_function(self, name: str) -> dict:
        config = self._config(name)
        return {"Configuration": config, "Code": {"RepositoryType": "S3", "Location": f"file://{self._folder(name)}"}}

    def update_code(self, name: str, zip_file: bytes | None) -> dict:
        if zip_file is None:
            raise InvalidParameterValueException("the stand-in takes the code as ZipFile only")
        with self.lock:
            config = self._config(name)
            config.update(self._install_code(name, zip_file))
            return self._save(config)

    def update_configuration(self, name: str, params: dict) -> dict:
        self._assume(params.get("Role"))
        with self.lock:
            config = self._config(name)
            config.update({k: params[k] for k in CONFIG_FIELDS if k in params})
            return self._save(config)

    def delete_function(self, name: str) -> None:
        with self.lock:
            self._config(name)
            for environment in self.warm.pop(name, []):
                environment.stop()
            with self.saved_lock:
                shutil.rmtree(self._folder(name))
                self.saved.pop(name, None)

    def invoke(self, name: str, payload: bytes, invocation_type: str) -> tuple[int, bytes, dict]:
        """(status, payload, headers) of one RequestResponse invocation, counted in Lambda's metrics when
        the function's code ran (not a refused request, not a DryRun)."""
        with self.lock:
            self.running[name] = concurrent = self.running.get(name, 0) + 1
        started = time.perf_counter()
        ran = False
        try:
            answer = self._run_invocation(name, payload, invocation_type)
            ran = invocation_type != "DryRun"
            return answer
        finally:
            with self.lock:
                self.running[name] -= 1
            if ran and self.metrics is not None:
                failed = "X-Amz-Function-Error" in answer[2]
                values = lambda_values(failed, time.perf_counter() - started, concurrent)
                self.metrics.add(LAMBDA_NAMESPACE, (("FunctionName", name),), values)

    def _run_invocation(self, name: str, payload: bytes, invocation_type: str) -> tuple[int, bytes, dict]:
        if invocation_type not in ("RequestResponse", "DryRun", ""):
            raise InvalidParameterValueException(f"the stand-in runs RequestResponse only, not {invocation_type}")
        config = self._config(name)
        if invocation_type == "DryRun":
            return 204, b"", {}
        if len(payload) >= MAX_REQUEST_PAYLOAD_BYTES:  # before the function runs: it never sees the event
            raise RequestEntityTooLargeException.for_invoke()
        try:
            json.loads(payload or b"{}")
        except json.JSONDecodeError as exc:
            raise InvalidRequestContentException(f"Could not parse request body into json: {exc}") from exc
        environment = self._environment(name, config)
        started = time.time()
        try:
            answer = environment.invoke(payload, config["Timeout"])
        except Timedout:
            environment.stop()  # Lambda resets a timed-out environment
            seconds = time.time() - started
            error = {"errorMessage": f"Task timed out after {seconds:.2f} seconds", "errorType": "Sandbox.Timedout"}
            return 200, json.dumps(error).encode(), {"X-Amz-Function-Error": "Unhandled"}
        except (EOFError, OSError) as exc:  # the process died: out of memory, or killed
            environment.stop()
            code = exc.args[0] if isinstance(exc, EOFError) and exc.args else "unknown"
            tail = (self._folder(name) / "function.log").read_bytes()[-500:].decode(errors="replace")
            error = {
                "errorType": "Runtime.ExitError",
                "errorMessage": (f"RequestId: local Error: Runtime exited with error: exit status {code}. {tail}"),
            }
            return 200, json.dumps(error).encode(), {"X-Amz-Function-Error": "Unhandled"}
        if "error" in answer:
            environment.stop()
            return (
                200,
                json.dumps(answer["error"]).encode(),
                {"X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "$LATEST"},
            )
        result = json.dumps(answer["result"]).encode()
        if len(result) > MAX_RESPONSE_PAYLOAD_BYTES:  # the runtime cannot hand it over, and exits
            environment.stop()
            return (
                200,
                json.dumps(RESPONSE_TOO_LARGE).encode(),
                {"X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "$LATEST"},
            )
        self._release(name, environment)
        return 200, result, {"X-Amz-Executed-Version": "$LATEST"}

    def _environment(self, name: str, config: dict) -> ExecutionEnvironment:
        """A warm environment of the function's current revision, or a new one (a cold start)."""
        with self.lock:
            idle = self.warm.get(name, [])
            while idle:
                environment = idle.pop()
                if environment.revision == config["RevisionId"] and environment.process.poll() is None:
                    return environment
                environment.stop()
        # The function runs with its role's credentials, as Lambda gives them, never the stand-in's own.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_LAMBDA", "_HANDLER", "AWS_ACCESS_KEY", "AWS_SECRET", "AWS_SESSION"))
        }
        env.update(role_environment(config["Role"]))
        env.update(config.get("Environment", {}).get("Variables", {}))
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": name,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config["MemorySize"]),
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region,
                "STANDIN_LAMBDA_TIMEOUT": str(config["Timeout"]),
            }
        )
        command = [
            self.python,
            str(RUNNER),
            "--code",
            str(self._folder(name) / "code"),
            "--handler",
            config["Handler"],
            "--memory-mb",
            str(config["MemorySize"]),
        ]
        # The function's log (what it prints), in function.log and, as Lambda sends it, CloudWatch Logs.
        shipped = (self.logs, config["Role"], name) if self.logs is not None else None
        return ExecutionEnvironment(command, env, self._folder(name) / "function.log", config["RevisionId"], shipped)

    def _release(self, name: str, environment: ExecutionEnvironment) -> None:
        with self.lock:
            with self.saved_lock:
                current = self.saved.get(name)
            if current is not None and json.loads(current)["RevisionId"] == environment.revision:
                self.warm.setdefault(name, []).append(environment)
                return
        environment.stop()

    def stop_all(self) -> None:
        with self.lock:
            environments = [e for idle in self.warm.values() for e in idle]
            self.warm.clear()
        for environment in environments:
            environment.stop()
        if self.logs is not None:
            self.logs.stop()
