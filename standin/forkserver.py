"""A fork server for the container side's Python: the stand-in's jobs and model servers start in
seconds less, because torch is imported once.

Every training job, model front end and model worker of the stand-in is a container-side Python
process that imports torch and torchvision first (about 3 s on this machine, dozens of times a test
suite). The server imports them once and forks a process for each start. It runs no torch operation
and starts no thread of its own (torch's thread pools start at a program's first operation, after the
fork); the one other thread, numpy's OpenBLAS pool, is shut down around each fork by OpenBLAS itself
(its pthread_atfork handler).
The stand-in and AWS's toolkits never see the difference: they run `python` as always, except that
`python` is a small launcher (`Launcher.path`) which hands its argv, environment, working directory
and open file descriptors to the server and mirrors the started program's exit status and signals.
Because the toolkits start their own children through `sys.executable`, which is the launcher in
every forked program, the user script that SageMaker's training toolkit starts is forked too.

What a forked program gets, as `python ARGS` would give it: its argv, environment, working folder,
standard streams and every other descriptor the caller had open (a model worker's socket); a session
and process group of its own, so a signal to the launcher's group reaches it and whatever it starts;
`sys.path` from its PYTHONPATH and script folder; `-u`/PYTHONUNBUFFERED, `-P`, `-B`/PYTHONDONTWRITEBYTECODE
and OMP_NUM_THREADS applied as a fresh interpreter would. Anything else (another option, `-I`, `-E`,
`-X`) is not imitated: that program is started by exec of the real interpreter instead. What it does
not get fresh: modules the server preloaded (torch, torchvision, PIL, numpy: none of ours) and the hash
seed; what those modules read at import and a program depends on is set again (multiprocessing's
ORIGINAL_DIR). The server itself runs with no interpreter option, so a forked program's sys.flags are a
plain interpreter's, as multiprocessing passes them on to the children it spawns.

Protocol (one Unix-socket connection per program): the launcher sends one JSON line with the request
and its descriptors (SCM_RIGHTS); the server answers `{"pgid": N}` once the program's session exists,
then `{"status": S}` (os.waitstatus_to_exitcode) when it ends. If the launcher goes away (killed), the
program's process group is killed, as a container's processes die with it.

This file runs in the container-side Python by path (`python forkserver.py SOCKET PRELOAD...`) and
imports nothing of ours; the stand-in uses `ForkServer` from the Airflow side.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_FDS = 250  # SCM_RIGHTS carries at most 253 descriptors in one message (SCM_MAX_FD)
PRELOAD = ("torch", "torchvision", "PIL.Image", "numpy")
# Signals the launcher passes on to the program's process group (SIGKILL cannot be caught: a killed
# launcher closes its connection instead, and the server kills the group).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

# The launcher: `python` for the stand-in and for every program it forks. Stdlib only, started with -I -S
# (isolated, no site) so that it costs milliseconds; it execs the real interpreter when the server is gone.
LAUNCHER = r"""#!{python} -IS
import json, os, signal, socket, sys, time
SOCKET, PYTHON = {socket!r}, {python!r}
def fds():
    mine = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue
        mine.add(fd)
    return sorted(mine)[:{max_fds}]
pgid, pending = None, []
def forward(number, frame):
    if pgid is None:  # the program does not exist yet: it gets the signal as soon as it does
        pending.append(number)
        return
    try:
        os.killpg(pgid, number)
    except ProcessLookupError:
        pass
def execute():
    for number in {forwarded}:
        signal.signal(number, signal.SIG_DFL)
    for number in pending:  # a signal that came before the exec is for the interpreter
        os.kill(os.getpid(), number)
    os.execv(PYTHON, [PYTHON, *sys.argv[1:]])
def main():
    global pgid
    for number in {forwarded}:  # from the start: a stop may come before the program does
        signal.signal(number, forward)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connected = False
    for _ in range(400):  # the server may still be importing torch (a few seconds)
        try:
            conn.connect(SOCKET)
            connected = True
            break
        except OSError:
            if not os.path.isdir(os.path.dirname(SOCKET)):
                break  # the server was stopped
            time.sleep(0.05)
    if not connected:
        execute()
    passed = [fd for fd in fds() if fd != conn.fileno()]
    request = {{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "fds": passed}}
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], passed)
    for fd in passed:
        if fd > 2:
            os.close(fd)
    reader = conn.makefile("rb")
    started = reader.readline()
    if not started:
        sys.exit("bin-counter fork server: the program could not be started")
    pgid = json.loads(started)["pgid"]
    for number in pending:
        forward(number, None)
    line = reader.readline()
    status = json.loads(line)["status"] if line else -signal.SIGKILL
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)
main()
"""


class Unsupported(Exception):
    """An interpreter option the forked program cannot imitate: exec the real interpreter instead."""


def parse_argv(argv: list[str]) -> tuple[dict, str, str | None, list[str]]:
    """`python ARGV` as (options, kind, target, args): kind is "script", "module", "code" or "stdin"."""
    options = {"unbuffered": False, "safe_path": False, "no_bytecode": False}
    flags = {"u": "unbuffered", "P": "safe_path", "B": "no_bytecode"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-m", "-c"):
            if i + 1 >= len(argv):
                raise Unsupported(arg)
            return options, "module" if arg == "-m" else "code", argv[i + 1], argv[i + 2 :]
        if not arg.startswith("-") or arg == "-":
            break
        for letter in arg[1:]:
            if letter not in flags:
                raise Unsupported(arg)
            options[flags[letter]] = True
        i += 1
    if i >= len(argv) or argv[i] == "-":
        return options, "stdin", None, argv[i + 1 :]
    return options, "script", argv[i], argv[i + 1 :]


def reopen_streams(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr on descriptors 0, 1 and 2, as a fresh interpreter opens them."""
    import io

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), errors="strict")
    out = io.FileIO(1, "w", closefd=False)
    err = io.FileIO(2, "w", closefd=False)
    if unbuffered:
        sys.stdout = io.TextIOWrapper(out, write_through=True)
    else:
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(out), line_buffering=os.isatty(1))
    # stderr is line-buffered, as a fresh interpreter's is since 3.9.
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(err), line_buffering=True, write_through=unbuffered, errors="backslashreplace"
    )
    # typeshed marks these Final; a fresh interpreter sets them to its own streams, as this one must.
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr  # type: ignore[misc]


def run_program(request: dict, base_path: list[str], launcher: str) -> int:
    """In the forked child: become `python ARGV` and run it; the exit code."""
    import runpy
    import threading

    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if "multiprocessing.process" in sys.modules:
        # Read at its import (torch's, in the server): where a spawned child finds a relative __main__.
        setattr(sys.modules["multiprocessing.process"], "ORIGINAL_DIR", os.path.abspath(request["cwd"]))  # noqa: B010
    try:
        options, kind, target, args = parse_argv(request["argv"])
    except Unsupported:
        os.execv(sys.executable, [sys.executable, *request["argv"]])  # noqa: S606 - the interpreter itself
    target = target or ""  # None only for stdin, which runs no target
    unbuffered = options["unbuffered"] or bool(os.environ.get("PYTHONUNBUFFERED"))
    reopen_streams(unbuffered)
    sys.dont_write_bytecode = options["no_bytecode"] or bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    first = {"script": os.path.dirname(os.path.abspath(target)), "module": os.getcwd(), "code": ""}
    head = [] if options["safe_path"] or kind == "stdin" else [first[kind]]
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [*head, *extra, *base_path]
    sys.executable = launcher  # what the program starts with sys.executable is forked too
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and "torch" in sys.modules:
        # OpenMP read the server's environment when torch loaded it; a fresh process reads its own.
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    code = 0
    try:
        if kind == "module":
            sys.argv = [target, *args]  # runpy puts the module's path in argv[0]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "code":
            sys.argv = ["-c", *args]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
        elif kind == "script":
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = ["-" if args or request["argv"][-1:] == ["-"] else "", *args]
            exec(compile(sys.stdin.read(), "<stdin>", "exec"), {"__name__": "__main__"})  # noqa: S102
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    # What the interpreter does at exit: wait for non-daemon threads, then the atexit functions.
    threading._shutdown()  # type: ignore[attr-defined]
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return code


def place_fds(received: list[int], targets: list[int]) -> None:
    """dup2 each received descriptor to the number it had in the launcher, without clobbering."""
    high = max([*targets, *received, 2]) + 1
    moved = [os.dup2(fd, high + i) for i, fd in enumerate(received)]
    for fd in received:
        os.close(fd)
    for fd, target in zip(moved, targets, strict=True):
        os.dup2(fd, target)  # dup2's copy is inheritable, as the launcher's descriptor was
        os.close(fd)


def serve_one(conn: socket.socket, listener: socket.socket, base_path: list[str], launcher: str) -> None:
    """In the session leader forked for one connection: start the program, report, wait, report."""
    os.setsid()  # a session and process group of its own: the launcher signals the group
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server's SIG_IGN would reap the program unseen
    for number in FORWARDED:  # a signal to the group is for the program, not for this process
        signal.signal(number, signal.SIG_IGN)
    data, received, _flags, _addr = socket.recv_fds(conn, 1 << 20, MAX_FDS)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            os._exit(1)
        data += more
    request = json.loads(data)
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        os.close(ready_read)
        # A fresh interpreter's dispositions (SIGPIPE stays ignored, as Python sets it).
        for number in FORWARDED:
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.close(ready_write)  # from here a signal to the group reaches the program
        try:
            place_fds(received, request["fds"])
            os._exit(run_program(request, base_path, launcher))
        except BaseException:  # never back into the server's loop, whatever happened
            import traceback

            traceback.print_exc()
            os._exit(1)
    for fd in received:
        os.close(fd)
    os.close(ready_write)
    os.read(ready_read, 1)  # EOF once the program takes signals (or has died)
    os.close(ready_read)
    try:
        conn.sendall(json.dumps({"pgid": os.getpid()}).encode() + b"\n")
    except OSError:  # the launcher was killed while the program started: so is its container
        os.killpg(os.getpid(), signal.SIGKILL)
    pidfd = os.pidfd_open(pid)
    import select

    watched: list[int | socket.socket] = [pidfd, conn]
    while True:
        ready, _, _ = select.select(watched, [], [])
        if pidfd in ready:
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"status": status}).encode() + b"\n")
            # What the program left running ends with it, as a container's processes do.
            os.killpg(os.getpid(), signal.SIGKILL)
        if launcher_gone(conn):  # killed: so is its container
            os.killpg(os.getpid(), signal.SIGKILL)


def launcher_gone(conn: socket.socket) -> bool:
    """The launcher sends nothing after its request: readable means closed (or reset, when it died)."""
    try:
        return not conn.recv(1)
    except OSError:
        return True


def serve(socket_path: str, launcher: str, preload: list[str]) -> None:
    """Import `preload`, then fork a session for each connection to `socket_path`, for ever."""
    import importlib

    # The interpreter's own path, without this file's folder (our modules are not the program's).
    base_path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path[:] = base_path
    for name in preload:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".new")
    listener.listen(64)
    os.rename(socket_path + ".new", socket_path)  # the socket appears only once it is listening
    parent = os.getppid()
    listener.settimeout(1.0)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the stand-in is gone, however it ended
                return
            continue
        conn.setblocking(True)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            try:
                serve_one(conn, listener, base_path, launcher)
            finally:
                # Whatever went wrong in the session leader, its program does not outlive it unseen
                # (before setsid there is no such group yet: nothing was started).
                with contextlib.suppress(OSError):
                    os.killpg(os.getpid(), signal.SIGKILL)
                os._exit(0)
        conn.close()


def launcher_bin(python: str, folder: Path, socket_path: str) -> str:
    """`folder` as the interpreter's bin/ with the launcher in place of python (and python3, python3.x):
    a program that finds `python` or `torchrun` by name on a PATH that starts here gets the launcher
    or the real tool. The launcher's path."""
    real_bin = Path(python).parent
    if folder.exists():  # a restarted stand-in's: its socket is another
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    launcher = folder / "python"
    text = LAUNCHER.format(
        python=str(python), socket=socket_path, max_fds=MAX_FDS, forwarded=tuple(int(n) for n in FORWARDED)
    )
    launcher.write_text(text)
    launcher.chmod(0o755)
    for tool in real_bin.iterdir():
        if not (folder / tool.name).exists():
            is_python = tool.name.startswith("python") and not tool.name.endswith("-config")
            (folder / tool.name).symlink_to("python" if is_python else tool)
    return str(launcher)


class ForkServer:
    """The server process for one container-side interpreter, and the launcher that stands for it.
    `python` is what to run instead of the interpreter; `stop()` ends the server (forked programs
    live on until they end or their launchers are killed)."""

    def __init__(self, python: str, folder: Path, preload: tuple[str, ...] = PRELOAD) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # A short path of its own: a Unix socket's path has at most 107 bytes, a test's folder more.
        self.socket_dir = tempfile.mkdtemp(prefix="bin-counter-fork-")
        self.socket_path = os.path.join(self.socket_dir, "socket")
        self.python = launcher_bin(python, folder / "bin", self.socket_path)
        self.log = open(folder / "forkserver.log", "ab")  # noqa: SIM115 - lives as long as the server
        # No interpreter options and no PYTHON* variables: a forked program's sys.flags are a plain
        # interpreter's (multiprocessing passes them on to the children it spawns), and the server's
        # path is the interpreter's own.
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.process = subprocess.Popen(
            [str(python), __file__, self.socket_path, self.python, *preload],
            env=server_env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Not waited for: the stand-in answers while the server imports torch, and a launcher that comes
        # sooner waits for the socket (up to 20 s; once stop() has removed its folder, at once) and
        # otherwise execs the interpreter itself.

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3:])
