"""The `separate_machines` check (tests/airflow_side/machines.py) itself: a DAG whose second task reads a
file its first task wrote passes on one disk, and fails or is reported with each task on a machine of
its own, as on the CeleryExecutor. The DAG tests (data prep, retrain and deploy, batch, monitor,
teardown) run their DAGs under it and assert that no task reads what another wrote."""

from __future__ import annotations

from pathlib import Path

DAG_FILE = """
import tempfile
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

FOLDER = {folder!r}


@dag(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1))
def hands_on():
    @task(retries=0)
    def write() -> str:
        path = Path(FOLDER or tempfile.mkdtemp()) / "written.txt"
        path.write_text("from the first task")
        return str(path)

    @task(retries=0)
    def read(path: str) -> str:
        return Path(path).read_text()

    read(write())


hands_on()
"""


def handing_on_a_file(where: Path, folder: str | None):
    """A DAG of two tasks: `write` puts a file in `folder` (None: the worker's temporary directory) and
    returns its path in XCom; `read` opens it. Written to `where` and stored as the DAG processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    dag_id = f"hands_on_a_{'fixed' if folder else 'temporary'}_file"
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{dag_id}.py").write_text(DAG_FILE.format(folder=folder, dag_id=dag_id))
    bag = DagBag(str(where / f"{dag_id}.py"))
    DagBundlesManager().sync_bundles_to_db()  # the bundle the DAG is stored under (dag.test() does it too)
    sync_bag_to_db(bag, "dags-folder", None)
    return bag.get_dag(dag_id)


def states(run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def test_on_one_disk_a_handed_on_file_is_found(airflow_db, tmp_path):
    run = handing_on_a_file(tmp_path / "dags", None).test()
    assert states(run) == {"write": "success", "read": "success"}


def test_on_separate_machines_a_temporary_file_is_gone_and_its_path_in_xcom_is_named(
    airflow_db, separate_machines, tmp_path
):
    run = handing_on_a_file(tmp_path / "dags", None).test()
    assert states(run) == {"write": "success", "read": "failed"}  # FileNotFoundError, as on Celery
    from tests.airflow_side.machines import local_paths_in_xcom

    found = local_paths_in_xcom(separate_machines, run)
    assert [(task, key) for task, key, _ in found] == [("write[-1]", "return_value")]


def test_on_separate_machines_a_file_at_a_fixed_path_is_reported(airflow_db, separate_machines, tmp_path):
    # A fixed folder (like /tmp/x or build/) outlives the try here; on two workers the reader would not find it.
    shared = tmp_path / "fixed"
    shared.mkdir()
    run = handing_on_a_file(tmp_path / "dags", str(shared)).test()
    assert states(run) == {"write": "success", "read": "success"}
    [found] = separate_machines.cross_task_reads()
    assert found.path == str(shared / "written.txt")
    assert [w.split("[")[0] for w in found.writers] == ["hands_on_a_fixed_file.write"]
    assert found.reader.startswith("hands_on_a_fixed_file.read[")
    from tests.airflow_side.machines import local_paths_in_xcom

    assert local_paths_in_xcom(separate_machines, run) == [("write[-1]", "return_value", found.path)]
