"""A blue/green update's plan, from its `DeploymentConfig.BlueGreenUpdatePolicy`: the share of requests
the new (green) fleet gets at each step and how long each step bakes, and the refusals SageMaker makes
at the request. No I/O: `models.SageMakerBackend` runs the plan.

From SageMaker's guide ("Blue/Green Deployments", "Use canary traffic shifting", "Use linear traffic
shifting", https://docs.aws.amazon.com/sagemaker/latest/dg/deployment-guardrails-blue-green.html) and
botocore's service model (TrafficRoutingConfig, CapacitySize):
- ALL_AT_ONCE: all traffic to green in one step, then a baking period;
- CANARY: the canary first ("Value must be less than or equal to 50% of the variant's total instance
  count"), a baking period, then the rest and a final baking period;
- LINEAR: steps of `LinearStepSize` ("Value must be 10-50% of the variant's total instance count"),
  each baked, until green has all of it.
The baking period is `WaitIntervalInSeconds` ("the waiting time between incremental steps"); the final
one is taken to be as long (the guide gives it no length of its own). A canary or a linear step turns
on whole instances of the green fleet, so a step is counted in instances: INSTANCE_COUNT k is k of the
n instances, CAPACITY_PERCENT p is floor(p n / 100) of them (rounded down so that it never exceeds the
share asked for; the rounding is the stand-in's, AWS does not document it), and a step's share of
requests is its share of the instances, k/n. A step of no whole instance is refused: a 50% canary
needs two instances or more.
"""

from __future__ import annotations

import math

from standin.sagemaker.exceptions import ValidationException

# SageMaker's FailureReason after an alarm rollback is not quoted in any public source found (AWS docs,
# GitHub issues): this is the stand-in's wording, labelled as such.
ALARM_ROLLBACK = (
    "Deployment rolled back: CloudWatch alarm(s) {alarms} went into ALARM state during the baking period. "
    "(stand-in's wording: SageMaker's own was not found)"
)
TIMEOUT_ROLLBACK = (
    "Deployment rolled back: it did not complete within MaximumExecutionTimeoutInSeconds ({seconds} s). "
    "(stand-in's wording: SageMaker's own was not found)"
)


def step_instances(size: dict, instances: int) -> int:
    """The whole instances one canary or linear step turns on, of a fleet of `instances`."""
    if size["Type"] == "INSTANCE_COUNT":
        return size["Value"]
    return size["Value"] * instances // 100


def _whole(size: dict, instances: int, what: str) -> int:
    count = step_instances(size, instances)
    if count < 1:
        raise ValidationException(
            f"{what} {size['Value']} ({size['Type']}) is no whole instance of the variant's {instances}: a "
            "step turns on whole instances, so a fleet of one instance cannot take a canary or linear "
            "deployment (use ALL_AT_ONCE, or two instances or more). (stand-in's wording)"
        )
    return count


def check(deployment_config: dict, instances: int) -> None:
    """Refuse what SageMaker refuses at the request: a canary above half the fleet, a linear step
    outside 10-50% of it, a MaximumExecutionTimeoutInSeconds not above the waits it must hold, and the
    parts the stand-in does not run (a rolling update)."""
    if "RollingUpdatePolicy" in deployment_config:
        raise ValidationException("RollingUpdatePolicy is valid SageMaker but not served by the local stand-in")
    policy = deployment_config.get("BlueGreenUpdatePolicy")
    if policy is None:
        return
    routing = policy["TrafficRoutingConfiguration"]
    kind = routing["Type"]
    if kind == "CANARY":
        size = routing.get("CanarySize")
        if size is None:
            raise ValidationException("CanarySize must be specified for the CANARY traffic routing type.")
        share = size["Value"] / 100 if size["Type"] == "CAPACITY_PERCENT" else 0.0
        if share > 0.5 or _whole(size, instances, "CanarySize") > instances / 2:
            raise ValidationException(
                f"CanarySize {size['Value']} ({size['Type']}) must be less than or equal to 50% of the "
                f"variant's total instance count ({instances})."
            )
    if kind == "LINEAR":
        size = routing.get("LinearStepSize")
        if size is None:
            raise ValidationException("LinearStepSize must be specified for the LINEAR traffic routing type.")
        share = size["Value"] / 100 if size["Type"] == "CAPACITY_PERCENT" else 0.1
        if not 0.1 <= share <= 0.5 or not 0.1 <= _whole(size, instances, "LinearStepSize") / instances <= 0.5:
            raise ValidationException(
                f"LinearStepSize {size['Value']} ({size['Type']}) must be 10-50% of the variant's total "
                f"instance count ({instances})."
            )
    timeout = policy.get("MaximumExecutionTimeoutInSeconds")
    waits = policy.get("TerminationWaitInSeconds", 0) + routing["WaitIntervalInSeconds"]
    if timeout is not None and timeout <= waits:
        raise ValidationException(
            f"MaximumExecutionTimeoutInSeconds ({timeout}) must be larger than the total waiting time "
            f"in TerminationWaitInSeconds and WaitIntervalInSeconds ({waits})."
        )


def steps(policy: dict, instances: int) -> list[tuple[float, int]]:
    """(green's share of requests, seconds it bakes) for each step of the traffic shift, in order."""
    routing = policy["TrafficRoutingConfiguration"]
    bake = routing["WaitIntervalInSeconds"]
    if routing["Type"] == "CANARY":
        return [(step_instances(routing["CanarySize"], instances) / instances, bake), (1.0, bake)]
    if routing["Type"] == "LINEAR":
        step = step_instances(routing["LinearStepSize"], instances)
        count = math.ceil(instances / step)
        return [(min(1.0, step * n / instances), bake) for n in range(1, count + 1)]
    return [(1.0, bake)]
