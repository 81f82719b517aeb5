"""The monitor report's link on its task in the Airflow UI ("Monitor report", an operator extra link).

Airflow 3 computes an operator's extra links on the worker when the task ends and keeps each URL in
XCom (`_link_<class>`), where the UI reads it; the API server runs no link code (links need no plugin
registration: the UI rebuilds them from the serialized DAG as XCom links). So the URL is fixed when
the task ends: a presigned S3 GET URL, which opens the report in a browser without AWS credentials
(locally, on moto), valid for the run's `report_link_hours` (SigV4's limit is 7 days; on MWAA the
worker's role credentials end sooner, and the URL with them). After that the report is still at the
s3:// URI the task logs and returns.
"""

from __future__ import annotations

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import BaseOperatorLink

REPORT_URL_KEY = "monitor_report_url"


class MonitorReportLink(BaseOperatorLink):
    name = "Monitor report"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(key=REPORT_URL_KEY, ti_key=ti_key) or ""


class MonitorReportOperator(PythonOperator):
    """A Python task whose callable pushes the report's URL to XCom key REPORT_URL_KEY; the task shows
    it as the "Monitor report" link."""

    operator_extra_links = (MonitorReportLink(),)
