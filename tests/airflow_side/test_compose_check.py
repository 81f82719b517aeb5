"""scripts/compose_check.py's plan, read off the real compose file and Dockerfiles: which engine it
picks, which images podman must build first and in what order the services start. The check itself
(`make compose-check`) starts the stack; it runs after `make test` in .ci/run."""

from __future__ import annotations

import shutil

import pytest
import yaml

from scripts import compose_check
from tests.airflow_side.conftest import dag_without_retries
from tests.conftest import REPO


@pytest.fixture(scope="module")
def config() -> dict:
    return compose_check.compose_config()


@pytest.mark.parametrize(
    ("answering", "engine"),
    [
        ({"docker info", "docker compose version", "podman --version"}, "docker"),
        ({"docker compose version", "podman --version"}, "podman"),  # a Docker client without an engine
        ({"docker info", "podman --version"}, "podman"),  # an engine without the compose plugin
    ],
)
def test_docker_is_used_where_its_engine_and_compose_answer_else_podman(answering, engine):
    assert compose_check.pick_engine("auto", lambda command: " ".join(command) in answering) == engine


def test_no_engine_is_a_clear_error_and_a_named_engine_is_taken_as_asked():
    with pytest.raises(SystemExit, match="apt-get install podman runc mmdebstrap"):
        compose_check.pick_engine("auto", lambda command: False)
    assert compose_check.pick_engine("podman", lambda command: False) == "podman"


def test_podman_builds_every_image_the_compose_file_pulls_and_every_base_our_dockerfiles_use(config):
    images = compose_check.offline_images(config)
    names = [image.name for image in images]
    assert (
        set(names)
        >= compose_check.pulled_images(config)
        == {"postgres:16", "redis:7.2-bookworm", "motoserver/moto:5.2.5"}
    )
    assert {"apache/airflow:3.3.2-python3.11", "python:3.12-slim"} <= set(names)
    for image in images:
        assert (compose_check.OFFLINE / image.containerfile).is_file()
        assert all(path.is_file() for path in image.files.values())
        # What an image builds on is built before it.
        assert all(need == "debian" or names.index(need) < names.index(image.name) for need in image.needs)
    assert compose_check.built_images(config).keys() == {"bin-counter-airflow:local", "bin-counter-standin:local"}


@pytest.mark.parametrize(
    ("service", "image", "refusal"),
    [
        ("moto", "localstack/localstack:4", "localstack/localstack:4, which docker/offline/ has no recipe for"),
        ("postgres", "postgres:17", "PostgreSQL 16 only"),
    ],
)
def test_an_image_docker_offline_cannot_build_is_refused(config, service, image, refusal):
    changed = yaml.safe_load(yaml.safe_dump(config))
    changed["services"][service]["image"] = image
    with pytest.raises(SystemExit, match=refusal):
        compose_check.offline_images(changed)


def test_an_image_is_rebuilt_when_what_goes_into_it_changes(config, tmp_path):
    moto = next(i for i in compose_check.offline_images(config) if i.name.startswith("motoserver/"))
    bases = {"python:3.11-slim": "python-a"}
    before = compose_check.image_digest(moto, bases)
    assert compose_check.image_digest(moto, bases) == before
    assert compose_check.image_digest(moto, {"python:3.11-slim": "python-b"}) != before
    changed = tmp_path / "airflow.txt"
    shutil.copyfile(REPO / "constraints" / "airflow.txt", changed)
    changed.write_text(changed.read_text() + "six==1.16.0\n")
    moto.files["airflow.txt"] = changed
    assert compose_check.image_digest(moto, bases) != before


def test_services_start_after_what_they_depend_on(config):
    waves = compose_check.start_order(config)
    position = {service: n for n, wave in enumerate(waves) for service in wave}
    assert position.keys() == config["services"].keys()
    for service, spec in config["services"].items():
        assert all(position[dep] < position[service] for dep in spec.get("depends_on") or {}), service
    assert position["airflow-init"] < position["airflow-scheduler"] and position["moto"] < position["standin"]


def test_a_dependency_cycle_is_refused():
    cycle = {"services": {"a": {"depends_on": ["b"]}, "b": {"depends_on": {"a": {}}}}}
    with pytest.raises(SystemExit, match="cycle"):
        compose_check.start_order(cycle)


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("postgres:16", "docker.io/library/postgres:16"),
        ("motoserver/moto:5.2.5", "docker.io/motoserver/moto:5.2.5"),
        ("localhost/bin-counter-offline/debian:x", "localhost/bin-counter-offline/debian:x"),
        ("ghcr.io/org/image:1", "ghcr.io/org/image:1"),
    ],
)
def test_image_names_are_qualified_as_podman_stores_them(name, stored):
    assert compose_check.qualified(name) == stored


@pytest.mark.parametrize("dag_id", ["bin_count_data_prep", "bin_count_retrain"])
def test_the_confs_it_triggers_are_ones_the_dags_accept(dag_id, airflow_db):
    import copy

    conf = compose_check.prep_conf("00001:00061") if dag_id == "bin_count_data_prep" else compose_check.retrain_conf()
    params = copy.deepcopy(dag_without_retries(dag_id).params)
    assert set(conf) <= set(params)
    params.update(conf)
    params.validate()


def test_what_the_check_sets_are_variables_the_compose_file_reads():
    import re

    used = set(re.findall(r"\$\{([A-Z0-9_]+)", compose_check.COMPOSE_FILE.read_text()))
    env = compose_check.stack_env()
    assert set(env) <= used
    assert len({env[p] for p in ("AIRFLOW_PORT", "MOTO_PORT", "STANDIN_PORT")}) == 3


def test_the_deployment_it_waits_for_is_the_one_the_retrains_announcement_starts(airflow_db):
    """The check triggers bin_count_retrain only and waits for an asset-triggered bin_count_deploy
    run: the retrain must announce an asset the deploy DAG is scheduled on, and the retrain's conf
    must leave deployment settings to bin_count_deploy's Params."""
    retrain, deploy = dag_without_retries("bin_count_retrain"), dag_without_retries("bin_count_deploy")
    announced = {outlet.uri for task in retrain.tasks for outlet in task.outlets}
    condition = deploy.timetable.asset_condition  # schedule=[asset]: all of them
    scheduled_on = {asset.uri for asset in getattr(condition, "objects", [condition])}
    assert scheduled_on and scheduled_on <= announced
    assert set(deploy.params) >= compose_check.DEPLOY_PARAMS and not compose_check.DEPLOY_PARAMS & set(retrain.params)
    assert compose_check.retrain_conf()["approval"] == "auto"  # nobody is there to approve


class RunsOnHosts:
    """The REST API's task instances of each run, with the host each ran on."""

    def __init__(self, hosts: dict[str, dict[str, str]]) -> None:
        self.hosts = hosts  # run id -> task id -> hostname

    def get(self, path: str) -> dict:
        run_id = path.split("/dagRuns/")[1].split("/")[0]
        return {"task_instances": [{"task_id": t, "hostname": h} for t, h in self.hosts[run_id].items()]}


def test_a_run_must_spread_over_the_celery_workers(monkeypatch):
    monkeypatch.setattr(compose_check, "worker_hostnames", lambda engine: {"a1b2", "c3d4"})
    runs = {"bin_count_data_prep": "prep", "bin_count_retrain": "retrain"}
    spread = RunsOnHosts({"prep": {"fetch": "a1b2", "split": "c3d4.dns.podman"}, "retrain": {"tune": "a1b2"}})
    said = compose_check.spread_over_workers(None, spread, runs)
    assert "bin_count_data_prep on worker c3d4: split" in said and "bin_count_retrain on worker a1b2: tune" in said
    one_worker = RunsOnHosts({"prep": {"fetch": "a1b2", "split": "a1b2"}, "retrain": {"tune": "a1b2"}})
    with pytest.raises(SystemExit, match="no run's tasks ran on all of the workers"):
        compose_check.spread_over_workers(None, one_worker, runs)
    elsewhere = RunsOnHosts({"prep": {"fetch": "a1b2", "split": "scheduler9"}, "retrain": {"tune": "c3d4"}})
    with pytest.raises(SystemExit, match=r"ran on \['scheduler9'\], not on the Celery workers"):
        compose_check.spread_over_workers(None, elsewhere, runs)


def test_docker_takes_its_compose_plugin_or_a_standalone_compose_v2_never_v1(tmp_path, monkeypatch):
    assert compose_check.docker_compose_command(lambda command: True) == ["docker", "compose"]
    standalone = tmp_path / "docker-compose"
    monkeypatch.setenv("DOCKER_COMPOSE", str(standalone))
    standalone.write_text("#!/bin/sh\necho v2.40.3\n")
    standalone.chmod(0o755)
    assert compose_check.docker_compose_command(lambda command: False) == [str(standalone)]
    standalone.write_text("#!/bin/sh\necho 1.29.2\n")  # Compose v1: no `up --wait`
    with pytest.raises(SystemExit, match="no Compose v2 for Docker"):
        compose_check.docker_compose_command(lambda command: False)


@pytest.mark.parametrize(
    ("image", "stored"),
    [
        ("bin-counter-airflow:local", "localhost/bin-counter-airflow:local"),
        ("localhost/x:1", "localhost/x:1"),
        ("registry.example.com/team/x:1", "registry.example.com/team/x:1"),
    ],
)
def test_the_images_podman_built_are_found_under_its_names(image, stored):
    assert compose_check.built_name(image) == stored


def test_a_podman_health_check_runs_as_docker_runs_it_with_the_containers_hostname(tmp_path):
    # A podman whose `inspect` names the container's host and whose `exec` runs the command here, with
    # the environment it is given (podman 4.3's own exec sessions have no HOSTNAME).
    fake = tmp_path / "podman"
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = inspect ]; then echo worker7; exit 0; fi\n'
        'shift; unset HOSTNAME\nwhile [ "$1" = -e ]; do export "$2"; shift 2; done\nshift; exec "$@"\n'
    )
    fake.chmod(0o755)
    engine = compose_check.Engine(str(fake), {"PATH": "/usr/bin:/bin"}, [])
    ping = {"Test": ["CMD-SHELL", 'test "celery@${HOSTNAME}" = celery@worker7'], "Timeout": 10**10}
    assert compose_check.podman_health_check(engine, "c1", ping)
    assert not compose_check.podman_health_check(engine, "c1", {**ping, "Test": ["CMD", "false"]})
