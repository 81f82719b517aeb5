"""Assets shared by the DAGs: the data-prep DAG updates the dataset, the retraining DAG is scheduled on it;
the batch DAG updates the report."""

from airflow.sdk import Asset

# One logical dataset; each event's `extra` says which version and where (bucket, prefix, sizes).
BIN_COUNT_DATASET = Asset(name="bin_count_dataset", uri="bin-counter://datasets/bin-count")
# Each batch count's report; its event's `extra` is the summary (photos, counts, verdicts, where the report is).
BIN_COUNT_REPORT = Asset(name="bin_count_report", uri="bin-counter://reports/bin-count")
