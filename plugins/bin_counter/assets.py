"""Assets shared by the DAGs: the data-prep DAG updates the dataset, the retraining DAG is scheduled on it
and announces approved models, which the deploy DAG is scheduled on;
the batch DAG updates the report."""

from airflow.sdk import Asset

# One logical dataset; each event's `extra` says which version and where (bucket, prefix, sizes).
BIN_COUNT_DATASET = Asset(name="bin_count_dataset", uri="bin-counter://datasets/bin-count")
# Each batch count's report; its event's `extra` is the summary (photos, counts, verdicts, where the report is).
BIN_COUNT_REPORT = Asset(name="bin_count_report", uri="bin-counter://reports/bin-count")
# Each approved model package version; its event's `extra` names it (arn, group, version, model_version):
# the retraining DAG announces it, the deploy DAG is scheduled on it.
BIN_COUNT_MODEL = Asset(name="bin_count_model", uri="bin-counter://models/bin-count")
# A window in which live traffic drifted from the serving model's test set or its live accuracy fell
# under its threshold (bin_count_monitor); its event's `extra` holds the figures and the report's place.
BIN_COUNT_DRIFT = Asset(name="bin_count_drift", uri="bin-counter://monitoring/bin-count")
