"""The self-hosted AWS stack (docker-compose.yaml + docker-compose.aws.yaml) holds AWS credentials that
start paid jobs: it must keep no published secret, be reachable from this machine only, and use a
profile the user chose (issue #34, K1 and K2). Read as Compose reads the files (tests/airflow_side/
test_compose.py checks them against the Compose specification)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import REPO

# ${NAME:?message}: Compose refuses to start when NAME is unset or empty, and prints the message.
REQUIRED = re.compile(r"^\$\{(?P<name>[A-Z_][A-Z0-9_]*):\?(?P<message>[^}]+)\}$")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def airflow_services(compose: dict) -> dict:
    return {name: s for name, s in compose["services"].items() if name.startswith("airflow-")}


@pytest.mark.parametrize(
    ("setting", "variable"),
    [
        ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_JWT_SECRET"),
        ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW_FERNET_KEY"),
        ("AWS_PROFILE", "AWS_PROFILE"),
    ],
)
def test_against_aws_the_secrets_and_the_profile_must_be_set_with_no_default(setting, variable):
    override = airflow_services(load("docker-compose.aws.yaml"))
    assert override
    for name, service in override.items():
        required = REQUIRED.match(str(service["environment"][setting]))
        assert required, f"{name}: {setting} is {service['environment'][setting]!r}, not ${{{variable}:?...}}"
        assert required["name"] == variable and len(required["message"]) > 20  # a message saying what to set


def published_ports(service: dict) -> list[str]:
    """Compose merges `ports` of the files by appending: an override cannot take a binding away."""
    return [str(p) for p in service.get("ports", [])]


def test_the_api_server_is_reachable_from_this_machine_only():
    merged = published_ports(load("docker-compose.yaml")["services"]["airflow-apiserver"]) + published_ports(
        load("docker-compose.aws.yaml")["services"].get("airflow-apiserver", {})
    )
    assert merged and all(p.startswith("127.0.0.1:") for p in merged), merged
