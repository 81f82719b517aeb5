"""Every DAG file imports cleanly, quickly, without heavy libraries, with tags and owners."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DAG_FILES = sorted((REPO / "dags").glob("*.py"))
HEAVY = ("torch", "torchvision", "PIL", "pandas", "sagemaker", "bin_counter.fetch", "bin_counter.split")

PROBE = """
import json, sys, time
sys.path.insert(0, {plugins!r})
started = time.perf_counter()
import importlib.util
spec = importlib.util.spec_from_file_location("dag_under_test", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "modules": sorted(sys.modules)}}))
"""


def test_there_are_dag_files():
    assert DAG_FILES, "no DAG files in dags/"


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.name for p in DAG_FILES])
def test_dag_file_parses_without_heavy_imports(path: Path):
    # A fresh interpreter, so what the file imports is not hidden by what the tests imported.
    probe = PROBE.format(plugins=str(REPO / "plugins"), path=str(path))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = [m for m in HEAVY if m in result["modules"]]
    assert loaded == [], f"{path.name} imports {loaded} at parse time"
    print(f"{path.name}: parsed in {result['seconds']:.2f}s (includes importing Airflow)")


def test_dagbag_has_no_import_errors_and_every_dag_is_documented(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO / "dags"))
    assert bag.import_errors == {}
    assert bag.dags, "no DAGs found"
    for dag_id, dag in bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no operator-facing doc_md"
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"
            assert task.execution_timeout is not None, f"{dag_id}.{task.task_id} has no execution timeout"
        for name, param in dag.params.items():
            assert param.description, f"{dag_id} Param {name} has no description"
