#!/bin/sh
# MWAA's startup script (`make mwaa-bundle` copies it into build/mwaa/): MWAA sources it before each
# Airflow component starts and keeps what it exports. It says where the workers find the code the
# DAGs package for SageMaker and Lambda and the published model, which the bundle ships in the DAGs
# folder (plugins/bin_counter/paths.py and gate.py find them beside plugins/ only in a checkout).
FILES="${AIRFLOW_HOME:-/usr/local/airflow}/dags/bin_counter_files"
export BIN_COUNTER_CODE_DIR="$FILES/sagemaker_code"
export BIN_COUNTER_LAMBDA_DIR="$FILES/lambda"
export BIN_COUNTER_PUBLISHED_MODEL="$FILES/models/bin-counter.tar.gz"
# The backbones' ImageNet weights, which the retraining DAG hands every job (its `weights` channel).
export BIN_COUNTER_IMAGENET_WEIGHTS="$FILES/weights"
# MWAA runs a triggerer: the SageMaker waits defer to it and free their worker slots (README,
# "Deferrable waits"). MWAA's constraints bring aiobotocore 3.9.0 with its botocore 1.43.56.
export AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE=True
