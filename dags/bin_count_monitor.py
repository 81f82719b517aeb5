"""bin_count_monitor: every hour, how the serving model does on live traffic (the counts clients
expect), and whether that traffic still looks like the model's test set."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from airflow.timetables.trigger import CronTriggerTimetable

from bin_counter.alerts import failure_alert
from bin_counter.assets import BIN_COUNT_DRIFT
from bin_counter.monitor_link import MonitorReportOperator
from bin_counter.stack import name_param, run_params

AWS_CONN_ID = "aws_default"
WHERE, WINDOW, THRESHOLDS, REPORT = "Where", "Window", "Thresholds", "Report"

DOC = """
### Bin count, monitor

Every hour, joins the endpoint's data capture (the photos and answers SageMaker records, a sample of
requests: bin_count_deploy's `capture_percent`) with the API function's per-request log lines (every
request: count, confidence, the count the client expected, the verdict) for the hour that ended
`settle_minutes` ago, and says how the serving model does on live traffic:

1. **window**: the run's data interval moved back by `settle_minutes` (or the `window_start` and
   `window_end` Params, for a look at any past window).
2. **baseline**: the model the endpoint serves, its test-set histograms of predicted counts and
   confidences (its model card), and simple statistics of up to 200 of its dataset's test photos.
   Nothing serving: the run is skipped.
3. **assess**: live accuracy, RMSE, MAE and within-one on the answers that came with an expected
   count (at least `min_labelled`), the verdict mix, and drift: PSI of the predicted counts and the
   confidences (> `psi_threshold`), KS test of photo brightness, contrast, pixels and JPEG bytes
   (p < `ks_p_threshold`), each only with at least `min_requests` answers ("too few requests" else).
4. **report**: `report.html` (plots) and `figures.json` under `s3://<bucket>/monitoring/<endpoint>/<window start>/`;
   the task's **Monitor report** link opens the page (a presigned URL, valid `report_link_hours`).
5. **publish**: the figures as CloudWatch metrics (namespace BinCounter, dimension EndpointName,
   timestamped at the window's end) and the alarms `<endpoint>-live-drift` and
   `<endpoint>-live-accuracy` (to the alerts topic).
6. **announce**: when drift or the live accuracy crossed its threshold, a `bin_count_drift` asset
   event with the figures (a retraining can be scheduled on it).

What each alarm means and what on-call does: docs/dags/README.md, section "Monitor DAG".

**When a task fails**
- *baseline*: the serving model's artifact has no model card (not a model written by train.py).
- *assess*: the capture files or the log group cannot be read (the worker's role: s3:GetObject on
  captures/, logs:FilterLogEvents on /aws/lambda/<function>).
- *publish*: CloudWatch refused the metrics (a window more than two weeks old) or the alarms.
"""


@dag(
    dag_id="bin_count_monitor",
    # Every hour on the hour, its data interval the hour before (Airflow 3's plain "@hourly" is a trigger
    # timetable whose runs have a zero-length interval).
    schedule=CronTriggerTimetable("0 * * * *", timezone="UTC", interval=timedelta(hours=1)),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=DOC,
    tags=["bin-counter", "monitoring", "inference"],
    default_args={
        "owner": "bin-counter",
        # Reads and writes only: a retry repeats them harmlessly (the report and alarms are overwritten).
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        # Less than the schedule: an hour's run must not still be going when the next one is due.
        "execution_timeout": timedelta(minutes=20),
        "on_failure_callback": failure_alert(),
    },
    params={
        "endpoint_name": name_param("endpoint_name", "The endpoint to monitor", section=WHERE),
        "function_name": name_param(
            "function_name", "The API function whose log lines hold the verdicts", section=WHERE
        ),
        "bucket": name_param("bucket", "Our S3 bucket: captures/ is read, monitoring/ written", section=WHERE),
        "window_start": Param(
            None,
            type=["null", "string"],
            description="Start of the window to look at (ISO 8601, UTC unless it says). Empty: the run's hour",
            section=WINDOW,
        ),
        "window_end": Param(
            None, type=["null", "string"], description="End of the window (ISO 8601), with window_start", section=WINDOW
        ),
        "settle_minutes": Param(
            10,
            type="integer",
            minimum=0,
            maximum=59,
            description="The run's hour ends this many minutes before the run: SageMaker writes capture files "
            "every few minutes",
            section=WINDOW,
        ),
        "psi_threshold": Param(
            0.2,
            type="number",
            minimum=0,
            description="Drift when the PSI of predicted counts or confidences exceeds this (0.2: a significant shift)",
            section=THRESHOLDS,
        ),
        "ks_p_threshold": Param(
            0.001,
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            description="Drift when a photo statistic's KS test has a p-value under this",
            section=THRESHOLDS,
        ),
        "min_requests": Param(
            200,
            type="integer",
            minimum=1,
            description="Fewer answers in the window: no drift verdict (too few requests)",
            section=THRESHOLDS,
        ),
        "min_labelled": Param(
            30,
            type="integer",
            minimum=1,
            description="Fewer answers with an expected count: no live accuracy",
            section=THRESHOLDS,
        ),
        "min_live_accuracy": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Alarm when live accuracy is under this. Empty: the model's test accuracy less "
            "max_accuracy_drop",
            section=THRESHOLDS,
        ),
        "max_accuracy_drop": Param(
            0.15,
            type="number",
            minimum=0,
            maximum=1,
            description="With no min_live_accuracy: how far under its test accuracy live accuracy may fall",
            section=THRESHOLDS,
        ),
        "report_link_hours": Param(
            24,
            type="integer",
            minimum=1,
            maximum=168,
            description="How long the task's report link works (a presigned URL; at most 7 days)",
            section=REPORT,
        ),
    },
)
def bin_count_monitor():
    @task(execution_timeout=timedelta(minutes=1))
    def window() -> dict:
        """The window's start and end."""
        from bin_counter.monitor import window as monitor_window

        context = get_current_context()
        # A run triggered without a logical date has no data interval (Airflow 3).
        interval = context.get("data_interval_start"), context.get("data_interval_end")
        start, end = monitor_window(context["params"], *interval, pendulum.now("UTC"))
        print(f"window: {start.isoformat()} to {end.isoformat()}")
        return {"start": start.isoformat(), "end": end.isoformat()}

    @task(execution_timeout=timedelta(minutes=10))
    def baseline() -> dict:
        """The serving model and its test set's figures."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
        from airflow.sdk.exceptions import AirflowSkipException

        from bin_counter.monitor_baseline import NothingServes
        from bin_counter.monitor_baseline import baseline as serving_baseline

        params = run_params(get_current_context())
        sm, s3 = SageMakerHook(aws_conn_id=AWS_CONN_ID).conn, S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
        try:
            found = serving_baseline(sm, s3, params["bucket"], params["endpoint_name"])
        except NothingServes as exc:
            raise AirflowSkipException(str(exc)) from exc
        print(
            f"{params['endpoint_name']} serves {found['model']} ({found['model_version']}), trained on dataset "
            f"{found['dataset_version']}; test accuracy {found['test_accuracy']}; "
            f"{len(next(iter(found['photo_statistics'].values()), []))} test photos for the photo baseline"
        )
        return found

    @task(execution_timeout=timedelta(minutes=20))
    def assess(span: dict, model: dict) -> dict:
        """Captures and verdicts joined; live accuracy, verdicts, drift."""
        from datetime import datetime

        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from bin_counter import capture, monitor

        params = run_params(get_current_context())
        start, end = datetime.fromisoformat(span["start"]), datetime.fromisoformat(span["end"])
        s3 = S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
        logs = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="logs").get_conn()
        keys = capture.capture_keys(s3, params["bucket"], params["endpoint_name"], start, end)
        captures = capture.read_captures(s3, params["bucket"], keys, start, end)
        verdicts = capture.read_verdicts(logs, params["function_name"], start, end)
        figures = monitor.assess(captures, verdicts, model, monitor.thresholds(params, model), span)
        figures["endpoint"] = params["endpoint_name"]
        print(f"{len(keys)} capture files, {len(verdicts)} API log lines")
        for line in monitor.summary_lines(figures):
            print(line)
        return figures

    def write_report(figures: dict) -> dict:
        """report.html and figures.json in S3; the link to the page."""
        from datetime import datetime

        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from botocore.config import Config

        from bin_counter.monitor_link import REPORT_URL_KEY
        from bin_counter.monitor_report import presigned_url
        from bin_counter.monitor_report import write_report as put_report

        context = get_current_context()
        params = run_params(context)
        # SigV4 for the presigned URL: S3 refuses SigV2 in newer regions, and SigV4 states its expiry.
        s3 = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="s3", config=Config(signature_version="s3v4")).get_conn()
        start = datetime.fromisoformat(figures["window"]["start"])
        written = put_report(s3, params["bucket"], params["endpoint_name"], start, figures)
        url = presigned_url(s3, written["bucket"], written["html"], params["report_link_hours"] * 3600)
        context["ti"].xcom_push(key=REPORT_URL_KEY, value=url)
        print(f"report: {written['uri']} (the task's 'Monitor report' link, valid {params['report_link_hours']} h)")
        return written

    @task(execution_timeout=timedelta(minutes=5))
    def publish(figures: dict) -> list[str]:
        """CloudWatch metrics at the window's end, and the alarms on them."""
        from datetime import datetime

        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.sdk import Variable

        from bin_counter import monitor_metrics
        from bin_counter.alerts import TOPIC_VARIABLE

        params = run_params(get_current_context())
        endpoint = params["endpoint_name"]
        cloudwatch = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="cloudwatch").get_conn()
        data = monitor_metrics.metric_data(endpoint, figures, datetime.fromisoformat(figures["window"]["end"]))
        monitor_metrics.put_metrics(cloudwatch, data)
        topic = Variable.get(TOPIC_VARIABLE, default=None)
        if not topic:
            print(f"the alarms notify nobody: set the Airflow Variable {TOPIC_VARIABLE} to the alerts topic")
        requests = monitor_metrics.alarms(endpoint, topic, figures["thresholds"]["min_accuracy"])
        names = monitor_metrics.ensure_alarms(cloudwatch, requests)
        print(f"published {', '.join(d['MetricName'] for d in data)} to {monitor_metrics.NAMESPACE}; alarms {names}")
        return names

    @task.short_circuit(execution_timeout=timedelta(minutes=1))
    def crossed(figures: dict) -> bool:
        """Whether drift or the live accuracy crossed its threshold (else nothing is announced)."""
        print(
            f"drift in: {figures['drifted'] or 'nothing'}; "
            f"accuracy under threshold: {figures['accuracy_below_threshold']}"
        )
        return figures["alerts"]

    @task(outlets=[BIN_COUNT_DRIFT], execution_timeout=timedelta(minutes=1))
    def announce(figures: dict, written: dict) -> dict:
        """The bin_count_drift asset event, with the figures."""
        from bin_counter.monitor import event_extra

        extra = event_extra(figures, written["uri"])
        get_current_context()["outlet_events"][BIN_COUNT_DRIFT].extra = extra
        return extra

    figures = assess(window(), baseline())
    report = MonitorReportOperator(
        task_id="report", python_callable=write_report, op_args=[figures], execution_timeout=timedelta(minutes=10)
    )
    published = publish(figures)
    gate = crossed(figures)
    published >> gate
    gate >> announce(figures, report.output)


bin_count_monitor()
