"""Alerts for on-call staff through Amazon SNS (the moto server locally): a task that failed for good
(after its retries), and a new model the deployment gate held back.

The topic is the Airflow Variable `bin_counter_alerts_topic` (an SNS topic ARN); subscribe e-mail,
chat or a pager to it. Without it, alerts are off and the task log says so once per alert. Every
alert carries the DAG, the task, the run, the try, the log URL and the reason, in the subject
(short, for a phone) and the body.

The reason is the exception's own text, which on-call needs (which job, which role, which AWS
error), with the AWS account id masked: e-mail leaves AWS (mail providers, forwards, phones), and the
id is what turns the ARNs and image URIs in it into targets; the names stay, and the task log, behind
Airflow's login, keeps the full text.
"""

from __future__ import annotations

import logging
import re

from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

log = logging.getLogger(__name__)

TOPIC_VARIABLE = "bin_counter_alerts_topic"
TOPIC = "{{ var.value.get('" + TOPIC_VARIABLE + "', '') }}"
# SNS subjects: at most 100 characters, one line.
FAILURE_SUBJECT = "bin-counter FAILED: {{ dag.dag_id }}.{{ ti.task_id }}"
FAILURE_MESSAGE = """\
A task of bin-counter failed after its retries.

DAG:    {{ dag.dag_id }}
Task:   {{ ti.task_id }} (try {{ ti.try_number }})
Run:    {{ run_id }}
Log:    {{ ti.log_url }}
Reason: {{ (exception | string)[:3000] if exception else 'see the log' }}

What a failure of this task usually means is in the DAG's documentation (the DAG's page in the UI).
"""
GATED_SUBJECT = "bin-counter: new model NOT deployed ({{ dag.dag_id }})"
GATED_MESSAGE = """\
{{ headline }}

DAG:    {{ dag.dag_id }}
Task:   {{ ti.task_id }}
Run:    {{ run_id }}
Log:    {{ ti.log_url }}
Reason: {{ reason }}
"""


# An AWS account id: 12 digits standing alone (in ARNs `arn:aws:iam::123456789012:role/x`, ECR image
# URIs `123456789012.dkr.ecr...`, S3 bucket names such as `bin-counter-123456789012-eu-west-1`).
ACCOUNT_ID = re.compile(r"(?<![0-9])[0-9]{12}(?![0-9])")


def mask_account_ids(text: str) -> str:
    """`text` with every AWS account id in it replaced by <account>."""
    return ACCOUNT_ID.sub("<account>", text)


class AlertNotifier(SnsNotifier):
    """The provider's SNS notifier, quiet (with a log line) when no topic is configured, never
    failing the task it reports on, and sending no account id."""

    def render_template_fields(self, context, jinja_env=None) -> None:
        # After rendering (the reason comes in with the exception): the sync and async paths both render here.
        super().render_template_fields(context, jinja_env)
        if self.subject:
            self.subject = mask_account_ids(self.subject)
        self.message = mask_account_ids(self.message)

    def notify(self, context) -> None:
        if not self.target_arn:
            log.warning(
                "alerts are off: set the Airflow Variable %s to an SNS topic ARN (alert: %s)",
                TOPIC_VARIABLE,
                self.subject,
            )
            return
        try:
            super().notify(context)
            log.info("alert sent to %s: %s", self.target_arn, self.subject)
        except Exception:  # an alert that cannot be sent must not hide what it was about
            log.exception("could not send the alert %r to %s", self.subject, self.target_arn)


def failure_alert(aws_conn_id: str = "aws_default") -> AlertNotifier:
    """For `on_failure_callback`: called once a task has failed for good."""
    return AlertNotifier(aws_conn_id=aws_conn_id, target_arn=TOPIC, subject=FAILURE_SUBJECT, message=FAILURE_MESSAGE)


def gated_alert(reason: str, aws_conn_id: str = "aws_default") -> AlertNotifier:
    """Call with the task's context when the gate keeps a new model from being deployed."""
    return held_back_alert(
        "The deployment gate held back the new model; the endpoint keeps serving the old one.", reason, aws_conn_id
    )


def held_back_alert(headline: str, reason: str, aws_conn_id: str = "aws_default") -> AlertNotifier:
    """Call with the task's context when a new model is kept from clients (the gate, a reviewer)."""

    # Our own text with numbers in it: put in as it is, not rendered as a template.
    def literal(text: str) -> str:
        return text.replace("{", "(").replace("}", ")")

    message = GATED_MESSAGE.replace("{{ headline }}", literal(headline)).replace("{{ reason }}", literal(reason))
    return AlertNotifier(aws_conn_id=aws_conn_id, target_arn=TOPIC, subject=GATED_SUBJECT, message=message)
