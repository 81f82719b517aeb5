"""Tests run in the Airflow-side environment (.venv): the DAGs, the operators, the local stack, the API."""
