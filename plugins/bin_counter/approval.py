"""A person's approval of a registered model, in the Airflow UI: the run waits on Airflow's own
ApprovalOperator (Required Actions page, or the HITL REST API) showing the comparison with the serving
model; the answer is written to the Model Registry as the version's status, with who and why.

Reject, or no answer within the timeout: the version is Rejected with the reason, on-call staff get an
alert, and the tasks after the review are skipped (nothing is deployed).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

from bin_counter import registry


class ModelReviewOperator(ApprovalOperator):
    """ApprovalOperator whose answer decides the registry version's status.

    `registered` (templated) is what the register task returned: `arn`, `version`, `review` (the page's
    markdown). The response timeout is the run's `approval_timeout_hours` Param (a timeout answers
    "Reject", the default)."""

    template_fields = (*ApprovalOperator.template_fields, "registered")

    def __init__(self, *, registered: Any, aws_conn_id: str = "aws_default", **kwargs) -> None:
        super().__init__(defaults=self.REJECT, **kwargs)
        self.registered = registered
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> Any:
        hours = context["params"].get("approval_timeout_hours")
        if hours:
            self.response_timeout = timedelta(hours=hours)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        # Recorded first: on Reject the ApprovalOperator skips what follows by raising to the task runner.
        if "error" not in event and event.get("chosen_options"):
            hours = context["params"].get("approval_timeout_hours")
            status, reason = self.record_answer(event["chosen_options"][0], event.get("responded_by_user"), hours)
            if status == registry.REJECTED:
                from bin_counter.alerts import held_back_alert

                held_back_alert(
                    "A reviewer did not approve the new model; nothing was deployed, the endpoint keeps its model.",
                    f"model package version {self.registered['version']} ({self.registered['arn']}): {reason}",
                    self.aws_conn_id,
                )(context)
        return super().execute_complete(context, event)

    def record_answer(self, chosen: str, who: Any, timeout_hours: float | None) -> tuple[str, str]:
        """The answer as the version's status in the registry, with who and why: (status, reason). No
        respondent means the review timed out and its default answered."""
        by = who.get("name") if isinstance(who, dict) else None
        if chosen == self.APPROVE:
            status, reason = registry.APPROVED, f"approved by {by or 'a reviewer'} in Airflow"
        elif by:
            status, reason = registry.REJECTED, f"rejected by {by} in Airflow"
        else:
            status, reason = registry.REJECTED, f"no answer within {timeout_hours} h: rejected (the review's default)"
        registry.set_status(self._sagemaker(), self.registered["arn"], status, reason)
        self.log.info("model package version %s: %s (%s)", self.registered["version"], status, reason)
        return status, reason

    def _sagemaker(self):
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        return SageMakerHook(aws_conn_id=self.aws_conn_id).conn
