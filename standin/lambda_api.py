"""The Lambda API of the stand-in (REST-JSON, `/2015-03-31/functions...`): create, get, update
code and configuration, delete, and invoke (request/response).

Each invocation runs the handler in a process of its own (`standin/lambda_runner.py`) with the
function's environment, its timeout and, where the OS allows, its memory size as an address-space
limit. A handler that raises, times out or runs out of memory answers 200 with
`X-Amz-Function-Error: Unhandled` and the error payload, as Lambda does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import botocore.session
from botocore.validate import ParamValidator

from standin.sagemaker_api import ACCOUNT, AwsError

RUNNER = Path(__file__).resolve().parent / "lambda_runner.py"
CONFIG_FIELDS = ("Role", "Handler", "Description", "Timeout", "MemorySize", "Environment", "Runtime")


class LambdaApi:
    def __init__(self, state_dir: Path, python: str = sys.executable, region: str = "us-east-1") -> None:
        self.model = botocore.session.get_session().get_service_model("lambda")
        self.root = Path(state_dir) / "lambda"
        self.root.mkdir(parents=True, exist_ok=True)
        self.python, self.region = python, region
        self.lock = threading.Lock()

    def _validate(self, operation: str, params: dict) -> None:
        report = ParamValidator().validate(params, self.model.operation_model(operation).input_shape)
        if report.has_errors():
            raise AwsError("InvalidParameterValueException", report.generate_report())

    def _folder(self, name: str) -> Path:
        return self.root / name

    def _config(self, name: str) -> dict:
        path = self._folder(name) / "function.json"
        if not path.is_file():
            arn = f"arn:aws:lambda:{self.region}:{ACCOUNT}:function:{name}"
            raise AwsError("ResourceNotFoundException", f"Function not found: {arn}", 404)
        return json.loads(path.read_text())

    def _install_code(self, name: str, zip_bytes: bytes) -> dict:
        code = self._folder(name) / "code"
        staging = self._folder(name) / "code.new"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
                archive.extractall(staging)
        except zipfile.BadZipFile as exc:
            raise AwsError("InvalidParameterValueException", f"Could not unzip uploaded file: {exc}") from exc
        shutil.rmtree(code, ignore_errors=True)
        staging.rename(code)
        return {"CodeSize": len(zip_bytes), "CodeSha256": base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode()}

    def _save(self, config: dict) -> dict:
        config["LastModified"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        config["RevisionId"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:36]
        (self._folder(config["FunctionName"]) / "function.json").write_text(json.dumps(config))
        return config

    def create_function(self, body: dict) -> dict:
        code = dict(body.get("Code", {}))
        if "ZipFile" in code:
            code["ZipFile"] = base64.b64decode(code["ZipFile"])
        self._validate("CreateFunction", {**body, "Code": code})
        name = body["FunctionName"]
        if "ZipFile" not in code:
            raise AwsError("InvalidParameterValueException", "the stand-in takes the code as Code.ZipFile only")
        with self.lock:
            if (self._folder(name) / "function.json").exists():
                raise AwsError("ResourceConflictException", f"Function already exist: {name}", 409)
            self._folder(name).mkdir(parents=True)
            sizes = self._install_code(name, code["ZipFile"])
            config = {"FunctionName": name, "FunctionArn": f"arn:aws:lambda:{self.region}:{ACCOUNT}:function:{name}",
                      "Runtime": body.get("Runtime", "python3.11"), "Timeout": body.get("Timeout", 3),
                      "MemorySize": body.get("MemorySize", 128), "Version": "$LATEST", "State": "Active",
                      "LastUpdateStatus": "Successful", "PackageType": "Zip",
                      **{k: body[k] for k in CONFIG_FIELDS if k in body}, **sizes}
            return self._save(config)

    def get_function(self, name: str) -> dict:
        config = self._config(name)
        return {"Configuration": config, "Code": {"RepositoryType": "S3", "Location": f"file://{self._folder(name)}"}}

    def update_code(self, name: str, body: dict) -> dict:
        if "ZipFile" not in body:
            raise AwsError("InvalidParameterValueException", "the stand-in takes the code as ZipFile only")
        with self.lock:
            config = self._config(name)
            config.update(self._install_code(name, base64.b64decode(body["ZipFile"])))
            return self._save(config)

    def update_configuration(self, name: str, body: dict) -> dict:
        self._validate("UpdateFunctionConfiguration", {**body, "FunctionName": name})
        with self.lock:
            config = self._config(name)
            config.update({k: body[k] for k in CONFIG_FIELDS if k in body})
            return self._save(config)

    def delete_function(self, name: str) -> None:
        with self.lock:
            self._config(name)
            shutil.rmtree(self._folder(name))

    def invoke(self, name: str, payload: bytes, invocation_type: str) -> tuple[int, bytes, dict]:
        """(status, payload, headers) of one RequestResponse invocation."""
        if invocation_type not in ("RequestResponse", "DryRun", ""):
            raise AwsError("InvalidParameterValueException",
                           f"the stand-in runs RequestResponse only, not {invocation_type}")
        config = self._config(name)
        if invocation_type == "DryRun":
            return 204, b"", {}
        try:
            json.loads(payload or b"{}")
        except json.JSONDecodeError as exc:
            raise AwsError("InvalidRequestContentException", f"Could not parse request body into json: {exc}") from exc
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_LAMBDA", "_HANDLER"))}
        env.update(config.get("Environment", {}).get("Variables", {}))
        env.update({"AWS_LAMBDA_FUNCTION_NAME": name, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config["MemorySize"]),
                    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST", "AWS_REGION": self.region,
                    "AWS_DEFAULT_REGION": self.region,
                    "STANDIN_LAMBDA_TIMEOUT": str(config["Timeout"])})
        command = [self.python, str(RUNNER), "--code", str(self._folder(name) / "code"), "--handler", config["Handler"],
                   "--memory-mb", str(config["MemorySize"])]
        started = time.time()
        try:
            proc = subprocess.run(command, input=payload or b"{}", capture_output=True, env=env,
                                  timeout=config["Timeout"], check=False)
        except subprocess.TimeoutExpired:
            seconds = time.time() - started
            error = {"errorMessage": f"Task timed out after {seconds:.2f} seconds", "errorType": "Sandbox.Timedout"}
            return 200, json.dumps(error).encode(), {"X-Amz-Function-Error": "Unhandled"}
        # The function's log (what it printed), as CloudWatch Logs would keep it.
        with open(self._folder(name) / "function.log", "ab") as log_file:
            log_file.write(proc.stderr)
        if proc.returncode == 0:
            return 200, proc.stdout, {"X-Amz-Executed-Version": "$LATEST"}
        # The runner prints the error as Lambda formats it; a process killed by its memory limit prints nothing.
        error = proc.stdout or json.dumps({"errorType": "Runtime.ExitError", "errorMessage": (
            f"RequestId: local Error: Runtime exited with error: exit status {proc.returncode}. "
            + proc.stderr.decode(errors="replace")[-500:])}).encode()
        return 200, error, {"X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "$LATEST"}
