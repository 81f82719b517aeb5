"""Assets shared by the DAGs: the data-prep DAG updates them, the retraining DAG is scheduled on them."""

from airflow.sdk import Asset

# One logical dataset; each event's `extra` says which version and where (bucket, prefix, sizes).
BIN_COUNT_DATASET = Asset(name="bin_count_dataset", uri="bin-counter://datasets/bin-count")
