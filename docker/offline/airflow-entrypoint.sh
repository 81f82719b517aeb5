#!/usr/bin/env bash
# What the official Airflow image's entry point does for docker-compose.yaml's commands: `bash` and
# `python` run as given; anything else is an Airflow command (`db migrate`, `scheduler`, ...).
set -euo pipefail
case "${1:-}" in
    "") exec bash ;;
    bash | python | python3) exec "$@" ;;
    *) exec airflow "$@" ;;
esac
