"""`make mwaa-bundle` (mwaa/bundle.py) gives MWAA what it can install and run (issue #34, F8): the
requirements install under MWAA 3.3.1's own constraints (AWS's essential constraints file, vendored,
and Airflow's constraints URL the requirements name), the DAGs parse there, and the workers find
the code they package through the startup script's paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from airflow.utils.file import list_py_file_paths

from mwaa.bundle import build_bundle
from tests.conftest import REPO

MWAA_AIRFLOW = "3.3.1"
ESSENTIAL = REPO / "mwaa" / f"mwaa_essential_constraints-{MWAA_AIRFLOW}.txt"
# The constraints file mwaa/requirements.txt names by URL, as MWAA's image holds it (AWS's copy).
AIRFLOW_CONSTRAINTS = REPO / "mwaa" / f"airflow_constraints-{MWAA_AIRFLOW}.txt"
DAGS = sorted(p.name for p in (REPO / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("mwaa") / "bundle")


def startup_env(bundle: Path) -> dict[str, str]:
    """What MWAA's components see after sourcing startup.sh, with the bundle as AIRFLOW_HOME."""
    script = f'. "{bundle / "startup.sh"}" && env -0'
    out = subprocess.run(["sh", "-c", script], env={"AIRFLOW_HOME": str(bundle)}, capture_output=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.decode().split("\0") if "=" in line)


def test_plugins_zip_holds_the_package_and_the_dag_processor_sees_only_the_dags(bundle):
    names = set(zipfile.ZipFile(bundle / "plugins.zip").namelist())
    package = {str(p.relative_to(REPO / "plugins")) for p in (REPO / "plugins" / "bin_counter").glob("*.py")}
    assert package <= names and not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    # Airflow's own DAG file discovery, honouring the bundle's .airflowignore: train.py and the
    # handler, beside the DAGs, are never parsed as DAG files.
    found = list_py_file_paths(bundle / "dags", safe_mode=False)
    assert sorted(Path(p).name for p in found) == DAGS


def test_the_startup_scripts_paths_lead_the_workers_to_the_bundles_code(bundle, tmp_path):
    env = startup_env(bundle)
    plugins = tmp_path / "plugins"
    zipfile.ZipFile(bundle / "plugins.zip").extractall(plugins)
    probe = (
        "import json; from bin_counter import paths, gate; from bin_counter.api_function import function_zip; "
        "function_zip(); print(json.dumps([str(paths.CODE_DIR), str(paths.LAMBDA_DIR), str(gate.PUBLISHED_MODEL)]))"
    )
    child = {**os.environ, **{k: v for k, v in env.items() if k.startswith("BIN_COUNTER_")}, "PYTHONPATH": str(plugins)}
    out = subprocess.run([sys.executable, "-c", probe], env=child, capture_output=True, text=True, check=True)
    code, lambda_dir, model = map(Path, json.loads(out.stdout.splitlines()[-1]))
    files = bundle / "dags" / "bin_counter_files"
    assert (code, lambda_dir, model) == (
        files / "sagemaker_code",
        files / "lambda",
        files / "models/bin-counter.tar.gz",
    )
    assert (code / "train.py").is_file() and (lambda_dir / "handler.py").is_file() and model.is_file()
    # MWAA runs a triggerer: the SageMaker waits defer to it (the provider reads this at import).
    assert env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] == "True"


def test_the_workers_find_every_offline_backbones_weights_in_the_bundle(bundle):
    # F7: SageMaker's images and MWAA's workers have no ImageNet weights, and efficientnet_lite0's
    # cannot be downloaded: without them in the bundle its package_weights task fails on MWAA.
    from bin_counter.weights import OFFLINE_ONLY, find_weights

    folder = Path(startup_env(bundle)["BIN_COUNTER_IMAGENET_WEIGHTS"])
    assert folder.parent == bundle / "dags" / "bin_counter_files"
    for arch in (*OFFLINE_ONLY, "mobilenet_v2"):
        assert find_weights(arch, [folder]) is not None, arch


def constraints_url(vendored: Path) -> str:
    """The Airflow constraints URL a vendored MWAA file says it was copied from."""
    return next(line for line in vendored.read_text().splitlines() if "/constraints-" in line).strip("# ").strip()


def test_the_requirements_name_the_constraints_mwaa_has():
    url = constraints_url(ESSENTIAL)
    assert url == constraints_url(AIRFLOW_CONSTRAINTS) and f"constraints-{MWAA_AIRFLOW}/" in url
    requirements = (REPO / "mwaa" / "requirements.txt").read_text()
    assert f'--constraint "{url}"' in requirements
    assert "apache-airflow" not in requirements.replace("raw.githubusercontent.com/apache/airflow", "")


def offline_requirements(bundle: Path, target: Path) -> Path:
    """The bundle's requirements with the constraints URL replaced by AWS's copy of that file."""
    text = (bundle / "requirements.txt").read_text()
    target.write_text(text.replace(constraints_url(AIRFLOW_CONSTRAINTS), str(AIRFLOW_CONSTRAINTS)))
    return target


def python_312() -> str | None:
    """MWAA 3.3.1's Python: the container side's env has it (framework.json's py312)."""
    candidate = REPO / ".venv-container" / "bin" / "python"
    return str(candidate) if candidate.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(python_312() is None, reason="needs Python 3.12 (.venv-container)")
def test_the_requirements_install_under_mwaas_constraints_and_the_dags_parse_there(bundle, tmp_path):
    """About a minute with a warm pip cache; needs PyPI."""
    venv = tmp_path / "mwaa-venv"
    subprocess.run([python_312(), "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # As MWAA's image has it: Airflow at its version, then `safe-pip-install -r requirements.txt`, which
    # is pip install under the essential constraints.
    install = [python, "-m", "pip", "install", "--quiet", "-c", str(ESSENTIAL), f"apache-airflow=={MWAA_AIRFLOW}"]
    install += [
        "apache-airflow-providers-amazon",
        "-r",
        str(offline_requirements(bundle, tmp_path / "requirements.txt")),
    ]
    subprocess.run(install, check=True)
    env = {**os.environ, **startup_env(bundle), "AIRFLOW_HOME": str(tmp_path / "home")}
    env.update(PYTHONPATH=str(tmp_path / "plugins"), AIRFLOW__CORE__LOAD_EXAMPLES="false")
    zipfile.ZipFile(bundle / "plugins.zip").extractall(tmp_path / "plugins")
    probe = (
        "import json, sys; from airflow.dag_processing.dagbag import DagBag; b = DagBag(sys.argv[1]); "
        "print(json.dumps([sorted(b.dag_ids), {k: str(v) for k, v in b.import_errors.items()}]))"
    )
    out = subprocess.run(
        [python, "-c", probe, str(bundle / "dags")], env=env, capture_output=True, text=True, check=True
    )
    dag_ids, errors = json.loads(out.stdout.splitlines()[-1])
    assert not errors and dag_ids == sorted(p.removesuffix(".py") for p in DAGS)
    # The triggerer's client for the deferred SageMaker waits, at the version MWAA's constraints pin
    # with their botocore (aiobotocore takes a narrow botocore range).
    versions = subprocess.run(
        [python, "-c", "import aiobotocore, botocore; print(aiobotocore.__version__, botocore.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert versions == ["3.9.0", "1.43.56"], versions
