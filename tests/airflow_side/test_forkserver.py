"""The stand-in's fork server: a program started through its launcher behaves as `python ARGS` would
(argv, environment, working folder, descriptors, exit status, signals), only without importing torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from standin.forkserver import ForkServer, Unsupported, parse_argv
from tests.airflow_side.conftest import CONTAINER_PYTHON

needs_container = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CONTAINER_PYTHON.exists():
        pytest.skip("needs .venv-container (make envs)")
    fork_server = ForkServer(str(CONTAINER_PYTHON), tmp_path_factory.mktemp("fork"))
    yield fork_server
    fork_server.stop()


def run(server: ForkServer, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([server.python, *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_the_command_line_is_read_as_pythons():
    assert parse_argv(["-m", "sagemaker_training.cli.train"])[1:] == ("module", "sagemaker_training.cli.train", [])
    assert parse_argv(["--", "train.py", "--epochs", "2"])[1:] == ("script", "train.py", ["--epochs", "2"])
    options, kind, target, args = parse_argv(["-uP", "worker.py", "-m", "x"])
    assert (
        options["unbuffered"] and options["safe_path"] and (kind, target, args) == ("script", "worker.py", ["-m", "x"])
    )
    assert parse_argv(["-c", "print(1)", "a"])[1:] == ("code", "print(1)", ["a"])
    for unknown in (["-X", "utf8", "-c", "1"], ["-I", "x.py"], ["-W", "error", "x.py"]):
        with pytest.raises(Unsupported):
            parse_argv(unknown)


@needs_container
def test_a_program_gets_its_argv_environment_folder_and_exit_status(server, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ours.py").write_text("VALUE = 'from PYTHONPATH'\n")
    script = tmp_path / "prog.py"
    script.write_text(
        "import os, sys, ours, torch\n"
        "print(sys.argv, os.getcwd(), os.environ['ONLY_HERE'], ours.VALUE, sys.path[0] == os.path.dirname(__file__))\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(7)\n"
    )
    env = {"PATH": os.environ["PATH"], "ONLY_HERE": "yes", "PYTHONPATH": str(tmp_path / "lib")}
    started = time.perf_counter()
    done = run(server, str(script), "--flag", "value", cwd=tmp_path, env=env)
    assert done.returncode == 7, done.stderr
    assert done.stdout.strip() == f"{[str(script), '--flag', 'value']} {tmp_path} yes from PYTHONPATH True"
    assert done.stderr.strip() == "to stderr"
    assert time.perf_counter() - started < 60
    module = run(server, "-m", "json.tool", "--compact", input='{"a": [1, 2]}', env=env)
    assert (module.returncode, module.stdout.strip()) == (0, '{"a":[1,2]}')


@needs_container
def test_an_uncaught_exception_exits_1_with_its_traceback(server):
    done = run(server, "-c", "raise ValueError('boom')")
    assert done.returncode == 1 and "ValueError: boom" in done.stderr


@needs_container
def test_what_a_program_starts_with_sys_executable_is_forked_too(server):
    code = (
        "import subprocess, sys\n"
        "child = subprocess.run([sys.executable, '-c', 'import sys; print(sys.executable); sys.exit(3)'],"
        " capture_output=True, text=True)\n"
        "print(child.returncode, child.stdout.strip())\n"
    )
    done = run(server, "-c", code)
    assert done.stdout.split() == ["3", server.python], done.stderr


@needs_container
def test_descriptors_beyond_the_standard_streams_are_passed(server):
    read, write = os.pipe()
    process = subprocess.Popen(
        [server.python, "-c", f"import os; os.write({write}, b'through fd {write}')"], pass_fds=[write]
    )
    os.close(write)
    assert process.wait(timeout=60) == 0
    assert os.read(read, 100) == f"through fd {write}".encode()
    os.close(read)


@needs_container
def test_a_signal_to_the_launchers_group_reaches_the_program_and_its_status_says_so(server, tmp_path):
    marker = tmp_path / "got-term"
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), sys.exit(143)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([server.python, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout.readline() == b"ready\n"
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 143 and marker.exists()
    process.stdout.close()
    unhandled = subprocess.Popen(
        [server.python, "-c", "print('ready', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert unhandled.stdout.readline() == b"ready\n"
    os.killpg(unhandled.pid, signal.SIGTERM)
    assert unhandled.wait(timeout=30) == -signal.SIGTERM
    unhandled.stdout.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@needs_container
def test_a_killed_launcher_takes_its_program_and_the_programs_children_with_it(server):
    code = (
        "import subprocess, sys, time\n"
        "sleeper = 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'\n"
        "child = subprocess.Popen([sys.executable, '-c', sleeper])\n"
        "import os; print(os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([server.python, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = [int(process.stdout.readline()), int(process.stdout.readline())]
    assert all(_alive(pid) for pid in pids)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    deadline = time.time() + 10
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
    process.stdout.close()


@needs_container
def test_a_launcher_killed_while_its_program_starts_takes_the_program_with_it(server, tmp_path):
    """The launcher's request arrives and the launcher is gone before the server can answer (the stand-in
    stopped a job just as the toolkit started train.py): the program must not live on, orphaned."""
    import json
    import socket as sockets

    read_end, write_end = os.pipe()
    request = {
        "argv": ["-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"],
        "env": {"PATH": os.environ["PATH"]},
        "cwd": str(tmp_path),
        "fds": [1],  # the pipe is the program's stdout
    }
    deadline = time.time() + 60  # the server may still be importing torch
    while not os.path.exists(server.socket_path):
        assert time.time() < deadline, "the fork server never listened"
        time.sleep(0.1)
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as conn:
        conn.connect(server.socket_path)
        sockets.send_fds(conn, [json.dumps(request).encode() + b"\n"], [write_end])
    os.close(write_end)
    # The pipe reads to its end only once no process holds it: the program has died (or never ran).
    with os.fdopen(read_end, "rb") as stdout:
        reader = subprocess.Popen(["cat"], stdin=stdout, stdout=subprocess.PIPE)
    try:
        printed, _ = reader.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        reader.kill()
        printed, _ = reader.communicate()
        pytest.fail(f"the program {printed.decode().strip()} outlived its launcher")
    # Its descriptors close as it exits, a moment before the kernel has it gone.
    deadline = time.time() + 10
    while any(_alive(int(pid)) for pid in printed.split()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(int(pid)) for pid in printed.split())


@needs_container
def test_an_option_it_cannot_imitate_runs_the_real_interpreter(server):
    done = run(server, "-X", "utf8", "-c", "import sys; print(sys.flags.utf8_mode, sys.executable)")
    assert done.stdout.split() == ["1", str(CONTAINER_PYTHON)], done.stderr


@needs_container
def test_without_its_server_the_launcher_runs_the_interpreter(tmp_path):
    stopped = ForkServer(str(CONTAINER_PYTHON), tmp_path / "fork")
    stopped.stop()
    done = subprocess.run(
        [stopped.python, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == str(CONTAINER_PYTHON), done.stderr
    assert sys.executable != str(CONTAINER_PYTHON)


@needs_container
def test_a_relative_script_spawns_its_workers_from_its_own_folder(server, tmp_path):
    """As train.py does under SageMaker's toolkit (`python -- train.py`, in the code folder): the
    workers of a spawn pool find the main script relative to the program's folder, not the server's."""
    (tmp_path / "prog.py").write_text(
        "import multiprocessing, sys\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "def double(x):\n"
        "    return 2 * x\n"
        "if __name__ == '__main__':\n"
        "    context = multiprocessing.get_context('spawn')\n"
        "    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:\n"
        "        print(sum(pool.map(double, range(100), chunksize=10)), sys.flags.ignore_environment)\n"
    )
    done = run(server, "--", "prog.py", cwd=tmp_path)
    assert (done.returncode, done.stdout.split()) == (0, ["9900", "0"]), done.stderr
