"""What `bin_count_monitor` computes for a window of live traffic, with no I/O: the requests joined
from the endpoint's data capture and the API function's per-request lines (bin_counter.capture), the
live accuracy the clients' expected counts imply, the verdict mix, and the drift of the predicted
counts, the confidences and simple photo statistics against the serving model's test set
(bin_counter.monitor_baseline).

The tests and thresholds, and why (docs/dags/README.md, "Monitor DAG"):
* predicted counts and confidences: the Population Stability Index over the baseline's bins
  (counts: one bin per class; confidence: ten equal bins of [0, 1]), drift when PSI > 0.2, the
  usual "significant shift" line. PSI, not a test's p-value: the baseline is a histogram (the model
  card keeps the test set's histograms, not each photo's answer), and with thousands of requests an
  hour any test's p-value flags shifts too small to matter, where PSI measures the size of the shift.
  PSI is biased upwards on small samples (about (bins - 1) / n with no shift at all), hence the
  minimum sample below which the monitor says "too few requests" instead.
* photo statistics (brightness, contrast, pixels, JPEG bytes): both sides are samples of photos, so
  the two-sample Kolmogorov-Smirnov test, drift when p < 0.001 for a statistic (four statistics an
  hour: about one false alarm in 250 windows without any shift).
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from bin_counter.paths import CODE_DIR

CONFIDENCE_BINS = 10
# PSI's smoothing: an empty bin on either side counts as this share, so one unseen class is a large
# but finite shift rather than an infinite one.
PSI_FLOOR = 1e-4
PHOTO_STATISTICS = ("brightness", "contrast", "pixels", "jpeg_bytes")
VERDICTS = ("match", "mismatch", "uncertain")
TOO_FEW, NO_BASELINE, DRIFT, NO_DRIFT = "too few requests", "no baseline", "drift", "no drift"


@dataclass(frozen=True)
class Thresholds:
    """When the monitor calls a shift drift, and how much data it needs to say anything."""

    psi: float = 0.2
    ks_p: float = 0.001
    min_requests: int = 200  # answers, for the distributions' drift
    min_labelled: int = 30  # answers with an expected count, for the live accuracy
    min_accuracy: float | None = None  # None: no accuracy alarm


@dataclass
class Answer:
    """One photo's answer in the window: from the API's log line (with the client's expected count)
    and/or the capture (with the photo)."""

    request_id: str
    time: datetime
    count: int
    confidence: float | None
    expected: int | None = None
    verdict: str | None = None
    model_version: str | None = None
    photo: bytes | None = field(default=None, repr=False)


def join(captures: Iterable[Any], verdicts: Mapping[str, Any]) -> tuple[list[Answer], dict]:
    """Every answered photo of the window, once: the API's line gives count, confidence, expected
    count and verdict for every request (the function logs them all); the capture, joined on its
    inferenceId (the API's request id), adds the photo for the sampled ones, and stands alone for a
    request whose log line is missing (a capture sent with no InferenceId, a line lost). What joined
    how, for the report."""
    by_request: dict[str, list[Answer]] = {}
    for request_id, verdict in verdicts.items():
        by_request[request_id] = [
            Answer(
                request_id,
                verdict.time,
                int(a["count"]),
                _number(a.get("confidence")),
                _int(a.get("expected")),
                a.get("verdict"),
                verdict.model_version,
            )
            for a in verdict.answers
            if a.get("count") is not None
        ]
    stats = Counter(verdict_lines=len(verdicts))
    for captured in captures:
        stats["captures"] += 1
        answers = by_request.get(captured.inference_id or "")
        if answers is not None and len(answers) == len(captured.images):
            stats["joined"] += 1
            for answer, photo in zip(answers, captured.images, strict=True):
                answer.photo = photo
            continue
        if answers is not None:  # its line answered another number of photos: keep the line's answers
            stats["photos_not_matched"] += 1
            continue
        stats["capture_only"] += 1
        key = captured.inference_id or f"capture:{captured.event_id}"
        by_request[key] = [
            Answer(
                key,
                captured.time,
                int(p["count"]),
                _number(p.get("confidence")),
                None,
                None,
                captured.model_version,
                photo,
            )
            for p, photo in zip(captured.predictions, captured.images, strict=False)
            if isinstance(p, dict) and p.get("count") is not None
        ]
    answers = sorted((a for rows in by_request.values() for a in rows), key=lambda a: a.time)
    stats["requests"] = len(by_request)
    return answers, dict(stats)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None or isinstance(value, bool) else int(value)


@cache
def _count_metrics():
    """sagemaker_code/metrics.py's count_metrics: live accuracy is scored exactly as the test set was."""
    spec = importlib.util.spec_from_file_location("bin_counter_code_metrics", CODE_DIR / "metrics.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no module loader for {CODE_DIR / 'metrics.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.count_metrics


def live_accuracy(answers: Sequence[Answer], num_classes: int) -> dict | None:
    """accuracy, RMSE, MAE, within-1 and the confusion matrix (rows: expected, columns: predicted) on
    the answers whose client sent an expected count; None when none did."""
    labelled = [a for a in answers if a.expected is not None]
    if not labelled:
        return None
    return _count_metrics()([a.expected for a in labelled], [a.count for a in labelled], num_classes)


def verdict_mix(answers: Sequence[Answer]) -> dict[str, int]:
    """How many answers the API judged match, mismatch and uncertain."""
    found = Counter(a.verdict for a in answers if a.verdict)
    return {name: found.get(name, 0) for name in VERDICTS}


def count_histogram(counts: Iterable[int], num_classes: int) -> list[int]:
    """Answers per predicted count, the last class taking anything above it."""
    histogram = [0] * num_classes
    for count in counts:
        histogram[min(max(int(count), 0), num_classes - 1)] += 1
    return histogram


def confidence_histogram(confidences: Iterable[float], bins: int = CONFIDENCE_BINS) -> list[int]:
    """Answers per equal-width bin of [0, 1] (a confidence of 1 in the last bin); the same bins as
    the training job's test evaluation (sagemaker_code/evaluate.py)."""
    histogram = [0] * bins
    for value in confidences:
        histogram[min(max(int(value * bins), 0), bins - 1)] += 1
    return histogram


def psi(baseline: Sequence[float], live: Sequence[float]) -> float:
    """Population Stability Index of two histograms over the same bins: sum((l - b) * ln(l / b)) of
    the bins' shares, each at least PSI_FLOOR."""
    if len(baseline) != len(live):
        raise ValueError(f"histograms over different bins: {len(baseline)} and {len(live)}")
    total_b, total_l = sum(baseline), sum(live)
    if not total_b or not total_l:
        raise ValueError("an empty histogram has no distribution")
    value = 0.0
    for b, lv in zip(baseline, live, strict=True):
        share_b, share_l = max(b / total_b, PSI_FLOOR), max(lv / total_l, PSI_FLOOR)
        value += (share_l - share_b) * math.log(share_l / share_b)
    return value


def photo_statistics(photo: bytes) -> dict[str, float] | None:
    """Mean brightness and contrast (grey levels 0-255, mean and standard deviation), pixels (width
    times height) and JPEG bytes of a photo; None for bytes that are no image. Decoded at a reduced
    size (JPEG's draft mode): the statistics barely change and the monitor stays cheap."""
    from PIL import Image, ImageStat, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(photo)) as image:
            width, height = image.size
            image.draft("L", (128, 128))
            stat = ImageStat.Stat(image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return {
        "brightness": stat.mean[0],
        "contrast": stat.stddev[0],
        "pixels": float(width * height),
        "jpeg_bytes": float(len(photo)),
    }


def histogram_drift(baseline: Sequence[int] | None, live: Sequence[int], thresholds: Thresholds) -> dict:
    """PSI of the live histogram against the baseline's, and the verdict."""
    n = sum(live)
    result: dict[str, Any] = {"test": "PSI", "threshold": thresholds.psi, "n": n, "live": list(live)}
    if not baseline or not sum(baseline):
        return {**result, "status": NO_BASELINE, "statistic": None, "drifted": False}
    result["baseline"] = list(baseline)
    if n < thresholds.min_requests:
        return {**result, "status": TOO_FEW, "statistic": None, "drifted": False}
    value = psi(baseline, live)
    drifted = value > thresholds.psi
    return {**result, "status": DRIFT if drifted else NO_DRIFT, "statistic": round(value, 4), "drifted": drifted}


def sample_drift(baseline: Sequence[float], live: Sequence[float], thresholds: Thresholds) -> dict:
    """The two-sample Kolmogorov-Smirnov test of one photo statistic, and the verdict."""
    from scipy.stats import ks_2samp

    result: dict[str, Any] = {"test": "KS", "threshold": thresholds.ks_p, "n": len(live), "baseline_n": len(baseline)}
    if not baseline:
        return {**result, "status": NO_BASELINE, "statistic": None, "p_value": None, "drifted": False}
    if len(live) < thresholds.min_requests:
        return {**result, "status": TOO_FEW, "statistic": None, "p_value": None, "drifted": False}
    test = ks_2samp(baseline, live)
    drifted = bool(test.pvalue < thresholds.ks_p)
    return {
        **result,
        "status": DRIFT if drifted else NO_DRIFT,
        "statistic": round(float(test.statistic), 4),
        "p_value": float(test.pvalue),
        "drifted": drifted,
        "baseline_median": _median(baseline),
        "live_median": _median(live),
    }


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def drift(answers: Sequence[Answer], baseline: Mapping, thresholds: Thresholds) -> dict:
    """Each distribution's drift against the baseline (bin_counter.monitor_baseline's dict)."""
    num_classes = len(baseline.get("count_histogram") or []) or baseline.get("num_classes") or 1
    counts = count_histogram((a.count for a in answers), num_classes)
    confidences = confidence_histogram(a.confidence for a in answers if a.confidence is not None)
    live_photos = [s for s in (photo_statistics(a.photo) for a in answers if a.photo) if s]
    base_photos = baseline.get("photo_statistics") or {}
    return {
        "counts": histogram_drift(baseline.get("count_histogram"), counts, thresholds),
        "confidence": histogram_drift(baseline.get("confidence_histogram"), confidences, thresholds),
        "photos": {
            name: sample_drift(base_photos.get(name) or [], [s[name] for s in live_photos], thresholds)
            for name in PHOTO_STATISTICS
        },
    }


def thresholds(params: Mapping[str, Any], baseline: Mapping) -> Thresholds:
    """The run's thresholds from its Params; with no `min_live_accuracy`, the serving model's test
    accuracy less `max_accuracy_drop` (no accuracy alarm when the model card has no test accuracy)."""
    min_accuracy = params.get("min_live_accuracy")
    if min_accuracy is None and baseline.get("test_accuracy") is not None:
        min_accuracy = max(0.0, round(baseline["test_accuracy"] - params["max_accuracy_drop"], 4))
    return Thresholds(
        psi=params["psi_threshold"],
        ks_p=params["ks_p_threshold"],
        min_requests=params["min_requests"],
        min_labelled=params["min_labelled"],
        min_accuracy=min_accuracy,
    )


def assess(
    captures: Iterable[Any], verdicts: Mapping[str, Any], baseline: Mapping, thresholds: Thresholds, window: Mapping
) -> dict:
    """The window's figures: what was seen, live accuracy, verdict mix, drift, and whether drift or
    the live accuracy crossed its threshold (`alerts`, what the asset event announces)."""
    answers, joined = join(captures, verdicts)
    num_classes = (
        baseline.get("num_classes")
        or len(baseline.get("count_histogram") or [])
        or max((a.count for a in answers), default=0) + 1
    )
    labelled = sum(1 for a in answers if a.expected is not None)
    live = live_accuracy(answers, num_classes) if labelled >= thresholds.min_labelled else None
    drifts = drift(answers, baseline, thresholds)
    drifted = [name for name in ("counts", "confidence") if drifts[name]["drifted"]]
    drifted += [f"photo {name}" for name, found in drifts["photos"].items() if found["drifted"]]
    low = live is not None and thresholds.min_accuracy is not None and live["accuracy"] < thresholds.min_accuracy
    return {
        "window": dict(window),
        "model": {k: baseline.get(k) for k in ("model", "model_version", "dataset_version", "test_accuracy")},
        "thresholds": asdict(thresholds),
        "requests": joined.get("requests", 0),
        "answers": len(answers),
        "labelled": labelled,
        "joined": joined,
        "live": live,
        "live_status": "ok" if live else (TOO_FEW if labelled else "no expected counts sent"),
        "verdicts": verdict_mix(answers),
        "drift": drifts,
        "drifted": drifted,
        "drift_detected": bool(drifted),
        "accuracy_below_threshold": low,
        "alerts": bool(drifted) or low,
        "timeline": timeline(answers),
    }


def timeline(answers: Sequence[Answer], buckets: int = 60) -> dict:
    """Answers, labelled answers and exact answers per slice of the window, for the counts-over-time plot."""
    if not answers:
        return {"starts": [], "answers": [], "labelled": [], "correct": []}
    first, last = answers[0].time, answers[-1].time
    width = max((last - first).total_seconds() / buckets, 1.0)
    slices: dict[int, Counter] = {}
    for a in answers:
        index = min(int((a.time - first).total_seconds() / width), buckets - 1)
        row = slices.setdefault(index, Counter())
        row["answers"] += 1
        row["labelled"] += a.expected is not None
        row["correct"] += a.expected is not None and a.expected == a.count
    ordered = sorted(slices)
    return {
        "starts": [(first.timestamp() + i * width) for i in ordered],
        **{name: [slices[i][name] for i in ordered] for name in ("answers", "labelled", "correct")},
    }


def summary_lines(figures: Mapping) -> list[str]:
    """The figures in on-call's words, for the task log."""
    live = figures["live"]
    lines = [
        f"window {figures['window']['start']} to {figures['window']['end']}: {figures['requests']} requests, "
        f"{figures['answers']} answers, {figures['labelled']} with an expected count; joins {figures['joined']}",
        "live accuracy: "
        + (
            f"{live['accuracy']:.3f} (RMSE {live['rmse']:.3f}, MAE {live['mae']:.3f}, "
            f"within one {live['within_1']:.3f})"
            if live
            else figures["live_status"]
        ),
        f"verdicts: {figures['verdicts']}",
    ]
    for name in ("counts", "confidence"):
        found = figures["drift"][name]
        lines.append(f"{name} drift ({found['test']} > {found['threshold']}): {found['status']} {found['statistic']}")
    for name, found in figures["drift"]["photos"].items():
        lines.append(f"photo {name} drift (KS p < {found['threshold']}): {found['status']} p={found.get('p_value')}")
    return lines


def utc(moment: datetime) -> datetime:
    """`moment` as a plain datetime in UTC (naive: taken as UTC)."""
    from datetime import UTC

    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return datetime.fromtimestamp(moment.timestamp(), UTC)


def window(
    params: Mapping[str, Any], interval_start: datetime | None, interval_end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """The window a run looks at: the `window_start`/`window_end` Params (ISO 8601, UTC unless they
    say else) when given, else the run's data interval moved back by `settle_minutes`, so that the
    capture files SageMaker writes every few minutes and the function's log lines are in before the
    window is read (consecutive runs still cover every minute exactly once). A run with no data
    interval (triggered by hand without a logical date, as Airflow 3 allows) looks at the hour that
    ended `settle_minutes` before `now`; one with a zero-length interval (a trigger timetable's) at
    the hour before it."""
    from datetime import UTC, timedelta

    def parse(text: str) -> datetime:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    if params.get("window_start") or params.get("window_end"):
        if not (params.get("window_start") and params.get("window_end")):
            raise ValueError("give both window_start and window_end, or neither (the run's data interval)")
        start, end = parse(params["window_start"]), parse(params["window_end"])
    else:
        settle = timedelta(minutes=params.get("settle_minutes") or 0)
        if interval_start is None or interval_end is None:
            interval_start, interval_end = now - timedelta(hours=1), now
        elif interval_start >= interval_end:  # a trigger timetable's run: the hour before it
            interval_start = interval_end - timedelta(hours=1)
        # Plain datetimes first: pendulum's DateTime in the stdlib's UTC loses its zone in arithmetic
        # (an hourly run then compared naive window edges with aware log times, and failed).
        start, end = utc(interval_start) - settle, utc(interval_end) - settle
    if end <= start:
        raise ValueError(f"the window ends ({end.isoformat()}) before it starts ({start.isoformat()})")
    return start, end


def event_extra(figures: Mapping, report_uri: str) -> dict:
    """The bin_count_drift asset event's `extra`: what crossed, the headline figures, each test's
    verdict and where the report is (not the timeline or the histograms: an event is no report)."""
    tests = {name: figures["drift"][name] for name in ("counts", "confidence")}
    tests |= {f"photo {name}": found for name, found in figures["drift"]["photos"].items()}
    return {
        "endpoint_name": figures.get("endpoint"),
        "window": figures["window"],
        "model": figures["model"],
        "drifted": figures["drifted"],
        "accuracy_below_threshold": figures["accuracy_below_threshold"],
        "live": {k: v for k, v in (figures["live"] or {}).items() if k != "confusion_matrix"} or None,
        "drift": {
            name: {k: found[k] for k in ("test", "statistic", "threshold", "status")} for name, found in tests.items()
        },
        "requests": figures["requests"],
        "labelled": figures["labelled"],
        "report": report_uri,
    }
