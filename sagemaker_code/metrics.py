"""Counting metrics, computed the same way in training logs, evaluation and benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence


def count_metrics(truth: Sequence[int], predicted: Sequence[int], num_classes: int) -> dict:
    """accuracy, rmse, mae, within_1, per-class accuracy and the confusion matrix.

    `truth` holds true counts; a true count at or above `num_classes` lands in the last row of
    the confusion matrix (it can never be predicted exactly) but keeps its value for rmse/mae.
    """
    if len(truth) != len(predicted):
        raise ValueError("truth and predicted differ in length")
    n = len(truth)
    if n == 0:
        raise ValueError("no samples to score")
    pairs = list(zip(truth, predicted, strict=True))
    errors = [p - t for t, p in pairs]
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for t, p in pairs:
        confusion[min(t, num_classes - 1)][min(p, num_classes - 1)] += 1
    per_class = {}
    for c in range(num_classes):
        total = sum(1 for t in truth if t == c)
        if total:
            hits = sum(1 for t, p in pairs if t == c and p == c)
            per_class[str(c)] = round(hits / total, 4)
    return {
        "n": n,
        "accuracy": round(sum(1 for e in errors if e == 0) / n, 4),
        "rmse": round(math.sqrt(sum(e * e for e in errors) / n), 4),
        "mae": round(sum(abs(e) for e in errors) / n, 4),
        "within_1": round(sum(1 for e in errors if abs(e) <= 1) / n, 4),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion,
    }
