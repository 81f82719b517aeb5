"""Quantity verification: how likely a bin holds exactly the count a warehouse system expects, and
what to do about it. Standard library only, so benchmarks can score verdicts without boto3."""

from __future__ import annotations

import os

DEFAULT_MATCH_THRESHOLD = 0.5
DEFAULT_MISMATCH_THRESHOLD = 0.1


def thresholds() -> tuple[float, float]:
    """(match, mismatch) from MATCH_THRESHOLD / MISMATCH_THRESHOLD, else the defaults."""
    match = os.environ.get("MATCH_THRESHOLD") or DEFAULT_MATCH_THRESHOLD
    mismatch = os.environ.get("MISMATCH_THRESHOLD") or DEFAULT_MISMATCH_THRESHOLD
    return float(match), float(mismatch)


def classify(p: float, match: float, mismatch: float) -> str:
    """match when the expected count is likely, mismatch when it is unlikely, else uncertain."""
    if p >= match:
        return "match"
    if p <= mismatch:
        return "mismatch"
    return "uncertain"


def verdict(probabilities: list[float], expected: int, limits: tuple[float, float] | None = None) -> dict:
    """The expected count's probability and the verdict, as the API returns them; `limits` (match,
    mismatch) default to thresholds()."""
    # The top class may mean "that many or more"; beyond it the model cannot tell counts apart.
    if not 0 <= expected < len(probabilities):
        return {"expected": expected, "expected_probability": None, "verdict": "uncertain"}
    p = probabilities[expected]
    match, mismatch = limits or thresholds()
    return {"expected": expected, "expected_probability": round(p, 4), "verdict": classify(p, match, mismatch)}
