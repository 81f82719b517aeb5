"""bin-counter's Airflow-side package: the data functions and operators the DAGs use, the SageMaker
requests, the deployment gate and the API function (README, "Layout")."""
