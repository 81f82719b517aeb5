"""What a tuning job decides: the next trial's hyperparameters, whether to stop a trial early, each
trial's training job request, and how its trials are summarised and counted.

Strategies:
- Random: every trial drawn independently from the ranges (linear or logarithmic scaling).
- Bayesian: the first trials are random; after that each trial perturbs the best configuration so
  far, with a spread that narrows as trials accumulate, and now and then explores at random. This
  is a small model-free stand-in for SageMaker's Gaussian-process search, good enough to move
  towards better regions on a laptop; it is not the same algorithm.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics

from standin.sagemaker.training import TERMINAL

RANDOM_START = 2
EXPLORE_SHARE = 0.2


def _scaled(low: float, high: float, scaling: str, u: float) -> float:
    if scaling == "Logarithmic" and low > 0:
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return low + u * (high - low)


def _unit(low: float, high: float, scaling: str, value: float) -> float:
    if high == low:
        return 0.0
    if scaling == "Logarithmic" and low > 0:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def _format(value: float, integer: bool) -> str:
    return str(round(value)) if integer else f"{value:.6g}"


def sample(ranges: dict, rng: random.Random, best: dict[str, str] | None, spread: float) -> dict[str, str]:
    """One configuration as SageMaker passes it to a trial: every value a string."""
    chosen: dict[str, str] = {}
    numeric = [(r, False) for r in ranges.get("ContinuousParameterRanges", [])] + [
        (r, True) for r in ranges.get("IntegerParameterRanges", [])
    ]
    for spec, integer in numeric:
        low, high = float(spec["MinValue"]), float(spec["MaxValue"])
        scaling = spec.get("ScalingType", "Auto")
        if best is not None and spec["Name"] in best:
            centre = _unit(low, high, scaling, float(best[spec["Name"]]))
            u = min(1.0, max(0.0, rng.gauss(centre, spread)))
        else:
            u = rng.random()
        chosen[spec["Name"]] = _format(_scaled(low, high, scaling, u), integer)
    for spec in ranges.get("CategoricalParameterRanges", []):
        if best is not None and spec["Name"] in best and rng.random() > spread:
            chosen[spec["Name"]] = best[spec["Name"]]
        else:
            chosen[spec["Name"]] = rng.choice(spec["Values"])
    return chosen


def next_configuration(
    strategy: str, ranges: dict, rng: random.Random, history: list[tuple[dict, float]], maximize: bool
) -> dict[str, str]:
    """The next trial's hyperparameters given (configuration, objective) of finished trials."""
    if strategy == "Random" or len(history) < RANDOM_START or rng.random() < EXPLORE_SHARE:
        return sample(ranges, rng, None, 1.0)
    best = (max if maximize else min)(history, key=lambda item: item[1])[0]
    spread = max(0.05, 0.5 / math.sqrt(len(history)))
    return sample(ranges, rng, best, spread)


MIN_COMPLETED = 2


def stop_early(running: list[float], completed: list[list[float]], maximize: bool) -> bool:
    """The median stopping rule: stop a trial whose latest objective value is worse than the median
    of what completed trials had reached after as many reports. Needs two completed trials."""
    step = len(running)
    peers = [series[step - 1] for series in completed if len(series) >= step]
    if step == 0 or len(peers) < MIN_COMPLETED:
        return False
    median = statistics.median(peers)
    return running[-1] < median if maximize else running[-1] > median


# What a trial takes from the tuning job's training job definition (the rest is the tuning job's own).
TRIAL_FIELDS = (
    "AlgorithmSpecification",
    "RoleArn",
    "InputDataConfig",
    "OutputDataConfig",
    "ResourceConfig",
    "StoppingCondition",
    "CheckpointConfig",
    "EnableManagedSpotTraining",
    "Environment",
)
TRIAL_ALGORITHM_FIELDS = ("TrainingImage", "TrainingInputMode", "MetricDefinitions")


def trial_request(tuning_job_name: str, definition: dict, number: int, tuned: dict[str, str]) -> dict:
    """The CreateTrainingJob request of trial `number`, named `<tuning job>-<NNN>-<hash>` as SageMaker names it."""
    digest = hashlib.sha256(json.dumps(tuned, sort_keys=True).encode()).hexdigest()[:8]
    params = {k: v for k, v in definition.items() if k in TRIAL_FIELDS}
    params["AlgorithmSpecification"] = {
        k: v for k, v in params["AlgorithmSpecification"].items() if k in TRIAL_ALGORITHM_FIELDS
    }
    params.update(
        TrainingJobName=f"{tuning_job_name[:23]}-{number:03d}-{digest}",
        HyperParameters={**definition.get("StaticHyperParameters", {}), **tuned},
    )
    return params


def objective_value(job: dict, metric: str) -> float | None:
    """A completed trial's final value of the objective metric; None before, or without one."""
    if job["TrainingJobStatus"] != "Completed":
        return None
    values = [m["Value"] for m in job.get("FinalMetricDataList", []) if m["MetricName"] == metric]
    return values[-1] if values else None


def trial_summary(job: dict, objective: dict) -> dict:
    """A trial as the tuning job reports it (HyperParameterTrainingJobSummary)."""
    summary = {
        k: job[k]
        for k in (
            "TrainingJobName",
            "TrainingJobArn",
            "CreationTime",
            "TrainingJobStatus",
            "TunedHyperParameters",
            "TrainingStartTime",
            "TrainingEndTime",
            "FailureReason",
        )
        if k in job
    }
    value = objective_value(job, objective["MetricName"])
    if value is not None:
        summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
            "Type": objective["Type"],
            "MetricName": objective["MetricName"],
            "Value": value,
        }
    summary["ObjectiveStatus"] = (
        "Succeeded" if value is not None else "Pending" if job["TrainingJobStatus"] not in TERMINAL else "Failed"
    )
    return summary


def counters(summaries: list[dict]) -> tuple[dict[str, int], dict[str, int]]:
    """TrainingJobStatusCounters and ObjectiveStatusCounters of the trials so far."""
    status_counts = {"Completed": 0, "InProgress": 0, "RetryableError": 0, "NonRetryableError": 0, "Stopped": 0}
    objective_counts = {"Succeeded": 0, "Pending": 0, "Failed": 0}
    for s in summaries:
        key = {"Failed": "NonRetryableError", "Stopping": "InProgress"}.get(
            s["TrainingJobStatus"], s["TrainingJobStatus"]
        )
        status_counts[key] += 1
        objective_counts[s["ObjectiveStatus"]] += 1
    return status_counts, objective_counts


def best_trial(summaries: list[dict], maximize: bool) -> dict | None:
    """The summary with the best objective value (BestTrainingJob); None while no trial has one."""
    scored = [s for s in summaries if "FinalHyperParameterTuningJobObjectiveMetric" in s]
    if not scored:
        return None
    pick = max if maximize else min
    return pick(scored, key=lambda s: s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"])
