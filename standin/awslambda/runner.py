"""One Lambda execution environment: imports the handler once, then answers invocations, one
JSON event per line on stdin, one JSON answer per line on stdout, until stdin closes.

  python standin/awslambda/runner.py --code <unzipped function> --handler module.function --memory-mb 128

Each answer is {"result": <the handler's return value>} or {"error": <Lambda's error payload:
errorMessage, errorType, stackTrace>}. What the function prints goes to stderr (its log), never into
an answer, between the START, END and REPORT lines Lambda's runtime writes around each invocation
(https://docs.aws.amazon.com/lambda/latest/dg/python-logging.html). The memory size becomes an
address-space limit (RLIMIT_AS) where the OS allows it, as generous as Python needs to start. As on
Lambda, the module's globals (clients, models) live as long as the environment: the stand-in reuses a
warm environment for the next invocation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback
import uuid


class Context:
    """The parts of Lambda's context object handlers use."""

    def __init__(self, memory_mb: int, timeout_s: float) -> None:
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "local")
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = f"arn:aws:lambda:local:000000000000:function:{self.function_name}"
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = "local"
        self._deadline = time.time() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.time()) * 1000))


def limit_memory(memory_mb: int) -> None:
    try:
        import resource

        # Python itself needs some room; the function's size is on top of a base allowance.
        limit = (memory_mb + 512) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # not every OS lets a process cap itself


def max_memory_mb() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: kilobytes
    except ImportError:
        return 0


def report_line(request_id: str, seconds: float, memory_mb: int) -> str:
    """Lambda's REPORT line; billed duration is the duration rounded up to the millisecond."""
    ms = seconds * 1000
    return (
        f"REPORT RequestId: {request_id}\tDuration: {ms:.2f} ms\tBilled Duration: {math.ceil(ms)} ms\t"
        f"Memory Size: {memory_mb} MB\tMax Memory Used: {max_memory_mb()} MB"
    )


def error_payload(exc: BaseException) -> dict:
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "stackTrace": traceback.format_tb(exc.__traceback__),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", required=True, help="the unzipped function")
    parser.add_argument("--handler", required=True, help="module.function")
    parser.add_argument("--memory-mb", type=int, default=128, help="the function's memory size")
    args = parser.parse_args()
    # As on Lambda, what the function prints is its log (here stderr), never part of its answer.
    answers, sys.stdout = sys.stdout, sys.stderr
    sys.path.insert(0, args.code)
    module_name, _, function_name = args.handler.rpartition(".")
    timeout_s = float(os.environ.get("STANDIN_LAMBDA_TIMEOUT", 3))
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
        limit_memory(args.memory_mb)
        init_error = None
    except Exception as exc:  # Lambda reports a broken import on every invocation (Runtime.ImportModuleError)
        handler, init_error = None, {**error_payload(exc), "errorType": "Runtime.ImportModuleError"}
    for line in sys.stdin.buffer:
        if init_error is not None:
            answer = {"error": init_error}
        else:
            context = Context(args.memory_mb, timeout_s)
            print(f"START RequestId: {context.aws_request_id} Version: {context.function_version}", flush=True)
            started = time.perf_counter()
            try:
                answer = {"result": handler(json.loads(line), context)}
                text = json.dumps(answer)
            except Exception as exc:  # the handler's error, or a result JSON cannot carry
                answer = {"error": error_payload(exc)}
            print(f"END RequestId: {context.aws_request_id}", flush=True)
            print(report_line(context.aws_request_id, time.perf_counter() - started, args.memory_mb), flush=True)
        text = json.dumps(answer) if "error" in answer else text
        answers.write(text + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
