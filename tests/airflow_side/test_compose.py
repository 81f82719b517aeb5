"""docker-compose.yaml and its AWS override, checked without a Docker engine: valid under the Compose
specification's schema, and everything they name (build files, mounted folders, variables, the
connection, the code the DAGs package) exists in the repository or is documented."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from bin_counter import gate
from standin.launch import airflow_connection, local_stack
from tests.conftest import REPO

SCHEMA = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
COMPOSE_FILES = ["docker-compose.yaml", "docker-compose.aws.yaml"]
# ${NAME}, ${NAME:-default}, ${NAME:?error}; not $${NAME}, which Compose passes on as ${NAME}.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")
# The services Airflow's own Docker Compose file has for Airflow 3 with the CeleryExecutor.
AIRFLOW_SERVICES = {
    "postgres",
    "redis",
    "airflow-worker",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
}
# Images pulled rather than built here, each named in the stand-in page's Docker Compose section.
PULLED = {"postgres:16", "redis:7.2-bookworm", "motoserver/moto:5.2.5"}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_the_file_is_valid_under_the_compose_specification(name):
    jsonschema.Draft201909Validator(SCHEMA).validate(load(name))


def test_the_schema_check_catches_a_mistake():
    broken = load("docker-compose.yaml")
    broken["services"]["airflow-scheduler"]["depends_on"]["postgres"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(SCHEMA).validate(broken)


def test_it_runs_airflow_3_and_the_local_stack():
    services = load("docker-compose.yaml")["services"]
    assert AIRFLOW_SERVICES | {"moto", "standin"} == set(services)
    commands = {name: s.get("command") for name, s in services.items() if name.startswith("airflow-")}
    assert commands == {
        "airflow-init": ["db", "migrate"],
        "airflow-apiserver": "api-server",
        "airflow-scheduler": "scheduler",
        "airflow-worker": "celery worker",
        "airflow-dag-processor": "dag-processor",
        "airflow-triggerer": "triggerer",
    }
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    host_ports = [p.rsplit(":", 1)[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))


def test_built_images_come_from_files_here_and_pulled_ones_are_documented():
    readme = (REPO / "docs" / "standin" / "README.md").read_text()
    for name, service in load("docker-compose.yaml")["services"].items():
        if "build" in service:
            dockerfile = REPO / service["build"]["context"] / service["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for source in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), flags=re.M):
                for path in source.split():
                    assert (REPO / path).exists(), f"{dockerfile.name} copies {path}, which is not here"
        else:
            assert service["image"] in PULLED and service["image"] in readme, f"{name}: {service['image']}"


def test_mounted_folders_exist_and_named_volumes_are_declared():
    for file in COMPOSE_FILES:
        compose = load(file)
        declared = set(load("docker-compose.yaml").get("volumes") or {})
        for name, service in compose["services"].items():
            for mount in service.get("volumes", []):
                source = mount.split(":")[0]
                if source.startswith("./"):
                    assert (REPO / source).is_dir(), f"{file} {name}: {source} missing"
                elif not source.startswith("${"):
                    assert source in declared, f"{file} {name}: volume {source} not declared"


def test_every_variable_is_documented_in_the_env_example():
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), flags=re.M))
    for file in COMPOSE_FILES:
        used = set(VARIABLE.findall((REPO / file).read_text())) - {"HOME"}
        assert used <= documented, f"{file}: {sorted(used - documented)} not in .env.example"


def test_airflow_finds_what_the_dags_need():
    common = load("docker-compose.yaml")["x-airflow-common"]
    env, mounts = common["environment"], common["volumes"]
    targets = {m.split(":")[1]: m.split(":")[0] for m in mounts}
    # The code the DAGs package for SageMaker and Lambda is mounted where the env says it is.
    assert targets[env["BIN_COUNTER_CODE_DIR"]] == "./sagemaker_code"
    assert targets[env["BIN_COUNTER_LAMBDA_DIR"]] == "./lambda"
    assert targets["/opt/airflow/dags"] == "./dags" and targets["/opt/airflow/plugins"] == "./plugins"
    # The gate finds the published model beside the plugins folder: that folder is mounted too.
    published = gate.PUBLISHED_MODEL.parent.relative_to(REPO)
    assert targets[f"/opt/airflow/{published}"] == f"./{published}"
    # The connection: S3 and logs on moto, SageMaker and Lambda on the stand-in, as in `make demo`.
    connection = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
    assert connection == airflow_connection("http://moto:5000", "http://standin:5055", login="local")
    # The stack's Variable, names included: the DAGs have no default bucket, endpoint or function.
    assert json.loads(env["AIRFLOW_VAR_BIN_COUNTER_SAGEMAKER"]) == json.loads(
        local_stack().outputs["SageMakerVariable"]
    )


def test_the_aws_override_only_changes_the_connection_and_the_local_stack():
    override = load("docker-compose.aws.yaml")["services"]
    for name in ("moto", "standin"):
        assert override[name] == {"profiles": ["local-stack"]}
    for name, service in override.items():
        if name.startswith("airflow-"):
            connection = service["environment"]["AIRFLOW_CONN_AWS_DEFAULT"]
            assert "endpoint_url" not in connection and "service_config" not in connection


def test_every_long_running_service_says_when_it_is_healthy():
    """The compose check (and `docker compose up --wait`) waits on these; a one-off (airflow-init)
    is waited for until it exits instead."""
    for name, service in load("docker-compose.yaml")["services"].items():
        if service.get("restart") != "no":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
