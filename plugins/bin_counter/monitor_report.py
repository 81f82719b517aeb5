"""The monitor's report for one window: four plots (answers over time, the predicted-count and
confidence distributions against the serving model's test set, the confusion matrix of the answers
that came with an expected count), one HTML page with the plots in it (base64 PNG: one object to
open, nothing to keep beside it) and figures.json, under `monitoring/<endpoint>/<window start>/` in
the bucket."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from datetime import UTC, datetime

REPORT_PREFIX = "monitoring"
HTML_NAME, JSON_NAME = "report.html", "figures.json"


def report_prefix(endpoint: str, window_start: datetime) -> str:
    """`monitoring/<endpoint>/<window start, UTC, e.g. 20261207T010000Z>`."""
    return f"{REPORT_PREFIX}/{endpoint}/{window_start.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def _shares(histogram: list[int] | None) -> list[float] | None:
    total = sum(histogram or [])
    return [v / total for v in histogram] if histogram and total else None


def _png(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=90, bbox_inches="tight")
    return out.getvalue()


def _against_baseline(axes, found: Mapping, labels: list[str], title: str) -> None:
    positions = range(len(found["live"]))
    live, base = _shares(found["live"]), _shares(found.get("baseline"))
    if base:
        axes.bar([p - 0.2 for p in positions], base, width=0.4, label="test set (baseline)", color="#999999")
    if live:
        axes.bar([p + 0.2 for p in positions], live, width=0.4, label="live", color="#1f77b4")
    axes.set_xticks(list(positions), labels, rotation=45 if len(labels) > 6 else 0)
    axes.set_ylabel("share of answers")
    axes.set_title(
        f"{title}: {found['status']}"
        + (f" ({found['test']} {found['statistic']})" if found["statistic"] is not None else "")
    )
    axes.legend()


def plots(figures: Mapping) -> dict[str, bytes]:
    """The four plots as PNG, by name."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    from matplotlib import pyplot as plt

    made = {}
    figure, axes = plt.subplots(figsize=(8, 3))
    line = figures["timeline"]
    window_start = datetime.fromisoformat(figures["window"]["start"]).timestamp()
    minutes = [(t - window_start) / 60 for t in line["starts"]]
    for name in ("answers", "labelled", "correct"):
        axes.plot(minutes, line[name], marker=".", label=name)
    axes.set_xlabel(f"minutes after {figures['window']['start']}")
    axes.set_title("answers over time (labelled: with an expected count; correct: count == expected)")
    axes.legend()
    made["timeline"] = _png(figure)
    plt.close(figure)

    counts, confidence = figures["drift"]["counts"], figures["drift"]["confidence"]
    figure, axes = plt.subplots(figsize=(6, 3))
    labels = [str(c) for c in range(len(counts["live"]))]
    labels[-1] += "+"
    _against_baseline(axes, counts, labels, "predicted counts")
    made["counts"] = _png(figure)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 3))
    bins = len(confidence["live"])
    _against_baseline(axes, confidence, [f"{i / bins:.1f}" for i in range(bins)], "confidence")
    made["confidence"] = _png(figure)
    plt.close(figure)

    live = figures.get("live")
    figure, axes = plt.subplots(figsize=(4.5, 4))
    if live:
        matrix = live["confusion_matrix"]
        axes.imshow(matrix, cmap="Blues")
        for t, row in enumerate(matrix):
            for p, n in enumerate(row):
                axes.text(p, t, str(n), ha="center", va="center")
        axes.set_xlabel("predicted count")
        axes.set_ylabel("expected count (client)")
        axes.set_title(f"live answers: accuracy {live['accuracy']:.3f}")
    else:
        axes.text(0.5, 0.5, figures["live_status"], ha="center", va="center")
        axes.set_axis_off()
    made["confusion"] = _png(figure)
    plt.close(figure)
    return made


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def page(figures: Mapping, pngs: Mapping[str, bytes]) -> str:
    """The HTML report: the headline figures, the drift table and the plots."""
    live = figures.get("live")
    rows = [
        ("model", f"{figures['model'].get('model')} ({figures['model'].get('model_version')})"),
        ("window", f"{figures['window']['start']} to {figures['window']['end']}"),
        (
            "requests / answers / with expected count",
            f"{figures['requests']} / {figures['answers']} / {figures['labelled']}",
        ),
        ("live accuracy", f"{live['accuracy']:.3f}" if live else figures["live_status"]),
        (
            "RMSE / MAE / within one",
            f"{live['rmse']:.3f} / {live['mae']:.3f} / {live['within_1']:.3f}" if live else "-",
        ),
        ("test-set accuracy", str(figures["model"].get("test_accuracy"))),
        ("verdicts", ", ".join(f"{k} {v}" for k, v in figures["verdicts"].items())),
        ("drift", ", ".join(figures["drifted"]) or "none"),
    ]
    drift_rows = [(n, figures["drift"][n]) for n in ("counts", "confidence")]
    drift_rows += [(f"photo {n}", found) for n, found in figures["drift"]["photos"].items()]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    drift_table = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{f['test']}</td><td>{_cell(f['statistic'])}</td><td>{_cell(f.get('p_value'))}</td>"
        f"<td>{f['threshold']}</td><td>{f['n']}</td><td>{html.escape(f['status'])}</td></tr>"
        for n, f in drift_rows
    )
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for name, png in pngs.items()
    )
    title = f"bin-counter monitor: {figures['model'].get('model')} {figures['window']['start']}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><table>{table}</table><h2>Drift against the test set</h2>"
        "<table><tr><th>what</th><th>test</th><th>statistic</th><th>p</th><th>threshold</th><th>n</th>"
        f"<th>result</th></tr>{drift_table}</table><h2>Plots</h2>{images}"
        "<p>What each figure means and what to do: docs/dags/README.md, section Monitor DAG.</p></body></html>"
    )


def write_report(s3, bucket: str, endpoint: str, window_start: datetime, figures: Mapping) -> dict:
    """report.html and figures.json under the window's prefix; their keys. A re-run of the window
    writes them again in place: the latest figures for a window are the ones to read."""
    prefix = report_prefix(endpoint, window_start)
    keys = {"html": f"{prefix}/{HTML_NAME}", "json": f"{prefix}/{JSON_NAME}"}
    body = json.dumps(figures, indent=1, sort_keys=True, default=str).encode()
    s3.put_object(Bucket=bucket, Key=keys["json"], Body=body, ContentType="application/json")
    text = page(figures, plots(figures)).encode()
    s3.put_object(Bucket=bucket, Key=keys["html"], Body=text, ContentType="text/html; charset=utf-8")
    return {"bucket": bucket, **keys, "uri": f"s3://{bucket}/{keys['html']}"}


def presigned_url(s3, bucket: str, key: str, expires_s: int) -> str:
    """A GET URL for the report that opens in a browser without AWS credentials, for `expires_s`
    (SigV4 allows at most 7 days; with a role's temporary credentials it ends with them)."""
    return s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)
