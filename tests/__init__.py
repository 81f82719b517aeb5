"""The two test suites, one per environment: airflow_side (.venv) and container (.venv-container)."""
