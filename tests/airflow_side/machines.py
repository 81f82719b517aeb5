"""Every task of a dag.test() run on a machine of its own, as a distributed executor runs them (Celery's
workers, Kubernetes' pods, MWAA's workers): no task can read a local file another task wrote.

dag.test() runs all tasks in the test's process, on one disk, where such a dependency passes unseen.
`SeparateMachines` wraps the call that runs one task try (and each resumption of a deferred task,
which a distributed executor may also send to another worker): the try gets a fresh empty working
directory and temporary directory, deleted when it ends, as a worker's container is gone for the next
task; and a Python audit hook records every file each try opens, so that a file one task wrote and
another read is reported wherever it lies (a fixed /tmp path, a build/ folder beside the code), not
only inside the per-try folders. `local_paths_in_xcom` finds the other way a dependency travels: a
local path handed on in XCom.

What every worker has is not such a dependency: files the test (or the image, or a read-only mount)
put there before the run, and the shared logs folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# os.open flags that make an open a write.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _is_write(mode: Any, flags: int) -> bool:
    if isinstance(mode, str):  # builtins.open / io.open
        return any(c in mode for c in "wax+")
    return bool(flags & _WRITE_FLAGS)  # os.open: mode is None, flags say it


def _ignored(path: str) -> bool:
    """Files every worker makes for itself or shares by design: bytecode caches, the logs folder."""
    from airflow.configuration import conf

    logs = conf.get("logging", "base_log_folder", fallback="")
    return path.endswith((".pyc", ".pyc.tmp")) or "/__pycache__/" in path or bool(logs and path.startswith(logs))


@dataclass
class CrossTaskRead:
    path: str
    writers: list[str]
    reader: str


@dataclass
class SeparateMachines:
    """Install with `install(monkeypatch)`; after the runs, `cross_task_reads()` lists each file a task
    read that another task wrote (empty on a DAG that a distributed executor runs as it runs here)."""

    root: Path
    written: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    read: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    tries: list[str] = field(default_factory=list)
    _current: str | None = None
    _count: int = 0

    # -- the audit hook: one per process (a hook cannot be removed), passing events to the active recorder
    _active: ClassVar[SeparateMachines | None] = None
    _hooked: ClassVar[bool] = False

    @classmethod
    def _audit(cls, event: str, args: tuple) -> None:
        recorder = cls._active
        if recorder is None or recorder._current is None or event != "open":
            return
        path, mode, flags = args
        if isinstance(path, int):  # an already open descriptor
            return
        path = os.path.abspath(os.fsdecode(path))
        if _ignored(path):
            return
        (recorder.written if _is_write(mode, flags or 0) else recorder.read)[path].add(recorder._current)

    def install(self, monkeypatch) -> SeparateMachines:
        from airflow.sdk.execution_time import supervisor

        if not SeparateMachines._hooked:
            sys.addaudithook(SeparateMachines._audit)
            SeparateMachines._hooked = True
        SeparateMachines._active = self
        monkeypatch.setattr(supervisor, "run_task_in_process", self._wrap(supervisor.run_task_in_process))
        return self

    def uninstall(self) -> None:
        if SeparateMachines._active is self:
            SeparateMachines._active = None

    def _wrap(self, run_task_in_process):
        def on_its_own_machine(*args, **kwargs):
            ti = kwargs.get("ti", args[0] if args else None)
            self._count += 1
            name = f"{ti.dag_id}.{ti.task_id}[{ti.map_index}]#{ti.try_number}/{self._count}"
            with self._machine(name):
                return run_task_in_process(*args, **kwargs)

        return on_its_own_machine

    @contextmanager
    def _machine(self, name: str) -> Iterator[Path]:
        home = self.root / f"{self._count:04d}"
        tmp = home / "tmp"
        tmp.mkdir(parents=True)
        cwd, tmpdir, tempdir = os.getcwd(), os.environ.get("TMPDIR"), tempfile.tempdir
        os.chdir(home)
        os.environ["TMPDIR"], tempfile.tempdir = str(tmp), str(tmp)
        self._current = name
        self.tries.append(name)
        try:
            yield home
        finally:
            self._current = None
            os.chdir(cwd)
            tempfile.tempdir = tempdir
            if tmpdir is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = tmpdir
            # The worker is gone: whatever the try left on its disk, no other task finds.
            shutil.rmtree(home, ignore_errors=True)

    def cross_task_reads(self) -> list[CrossTaskRead]:
        found = []
        for path, readers in sorted(self.read.items()):
            writers = self.written.get(path, set())
            for reader in sorted(readers):
                others = sorted(w for w in writers if _task(w) != _task(reader))
                if others:
                    found.append(CrossTaskRead(path, others, reader))
        return found


def _task(try_name: str) -> str:
    """The task (and map index) of a try's name: a retry or a resumed deferral of the same task instance
    may read what its earlier try wrote only on the same worker, which is not promised either; but that
    is the task's own business (and reported as such by no check here)."""
    return try_name.split("#", 1)[0]


def local_paths_in_xcom(machines: SeparateMachines, run) -> list[tuple[str, str, str]]:
    """(task, key, value) for every string in the run's XComs that names a local path a task wrote (or a
    folder holding one), or a path on a task's own machine: what a task on another worker could not open.
    S3 keys and URIs are relative or s3://; a path that was there before the run (a Param naming a folder
    every worker mounts, like a local ABID source) is an input, not something handed on."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id)).all()
        values = [(f"{r.task_id}[{r.map_index}]", r.key, XComModel.deserialize_value(r)) for r in rows]
    root = str(machines.root.resolve())
    return [
        (task, key, text)
        for task, key, value in values
        for text in _strings(value)
        if _local_path(text) and (_under(text, root) or any(_under(w, text) for w in machines.written))
    ]


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path.removeprefix("file://")), os.path.abspath(folder.removeprefix("file://"))
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple | set):
        for v in value:
            yield from _strings(v)


def _local_path(text: str) -> bool:
    """An absolute path, or a file: URI, whose top folder exists here (so not an API route like /count)."""
    text = text.removeprefix("file://")
    if not text.startswith("/") or any(c.isspace() for c in text) or len(text) > 4096:
        return False
    parts = Path(text).parts
    return len(parts) > 2 and Path(*parts[:2]).is_dir()


def assert_ran_apart(machines: SeparateMachines, *runs) -> None:
    """The runs' tasks, each on a machine of its own, handed nothing on through local files: no task read
    a file another task wrote, and no XCom names a local path."""
    assert machines.tries, "no task ran under separate_machines"
    crossing = machines.cross_task_reads()
    assert not crossing, "tasks read local files other tasks wrote (they fail on Celery):\n" + "\n".join(
        f"  {c.reader} read {c.path}, written by {', '.join(c.writers)}" for c in crossing
    )
    paths = [(run.dag_id, *found) for run in runs for found in local_paths_in_xcom(machines, run)]
    assert not paths, f"XComs hand on local paths, which a task on another worker cannot open: {paths}"
