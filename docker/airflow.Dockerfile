# The Airflow side: the official Airflow image plus our pinned requirements. The DAGs, plugins,
# training code and Lambda code are mounted by docker-compose.yaml, so editing them needs no rebuild.
FROM apache/airflow:3.3.2-python3.11

COPY requirements.txt constraints/airflow.txt /opt/bin-counter/
RUN pip install --no-cache-dir -r /opt/bin-counter/requirements.txt -c /opt/bin-counter/airflow.txt
