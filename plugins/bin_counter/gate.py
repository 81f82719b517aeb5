"""The deployment gate: which model the endpoint should serve after a retraining run, the new one or
the champion, and the champion to beat before anything serves (the published model).

The final training job scores the new model and the champion on the same test images (`test:*`
and `champion:*` metrics); the gate compares those numbers, nothing else.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

from bin_counter.artifacts import content_key, put_once

# The repository's published model (`make model`): the champion before any model serves.
PUBLISHED_MODEL = Path(
    os.environ.get("BIN_COUNTER_PUBLISHED_MODEL", Path(__file__).resolve().parents[2] / "models" / "bin-counter.tar.gz")
)
PUBLISHED_PREFIX = "models/published"
# The test metrics the gate may compare on, and which way is better.
GATE_METRICS = {"accuracy": "Maximize", "rmse": "Minimize"}
# Live photos (captured requests with a confirmed count, bin_counter.live) in the test channel are
# also scored alone (`test:live_*`, `champion:live_*`). With at least this many, a new model worse
# than the serving one on them by more than the margin is held back, even when it is better overall:
# they are the photos clients send. Fewer, and their score is shown but does not decide (one photo
# in ten changes accuracy by 0.1).
LIVE_MIN_PHOTOS = 30


def final_metrics(training_job: Mapping) -> dict[str, float]:
    """FinalMetricDataList as {name: value}."""
    return {m["MetricName"]: m["Value"] for m in training_job.get("FinalMetricDataList", [])}


def choose_deployment(
    metrics: Mapping[str, float],
    champion: Mapping | None,
    job_name: str,
    gate_metric: str,
    margin: float,
    deploy: bool = True,
    live_min_photos: int = LIVE_MIN_PHOTOS,
) -> dict:
    """What the gate decides: {"deploy": "new" | "published" | None, "model_version", "reason",
    "held_back"} (held_back: a serving model was kept, which on-call staff hear about).

    Before anything serves, the champion may be the published model: the better of it and the new
    model is deployed, so the first model a client meets is a good one."""
    published = champion if champion and champion.get("published") else None
    ok, reason = deployment_decision(metrics, champion is not None, gate_metric, margin, live_min_photos)
    if published is not None and not ok and metrics.get(f"champion:{gate_metric}") is not None:
        choice = {
            "deploy": "published",
            "model_version": published["model_version"],
            "reason": f"nothing serves yet; the published model is better: {reason}",
            "held_back": False,
        }
    elif published is not None and not ok:
        choice = {
            "deploy": "new",
            "model_version": job_name,
            "reason": f"nothing serves yet and the published model could not be scored: {reason}",
            "held_back": False,
        }
    else:
        choice = {
            "deploy": "new" if ok else None,
            "model_version": job_name if ok else None,
            "reason": reason,
            "held_back": not ok,
        }
    if choice["deploy"] and not deploy:
        return {
            "deploy": None,
            "model_version": None,
            "reason": f"the deploy Param is off ({choice['reason']})",
            "held_back": False,
        }
    return choice


def deployment_decision(
    metrics: Mapping[str, float],
    has_champion: bool,
    gate_metric: str,
    margin: float,
    live_min_photos: int = LIVE_MIN_PHOTOS,
) -> tuple[bool, str]:
    """Whether the newly trained model may replace the serving one, and why.

    Both were scored by the same training job on the same test images (`test:*` and `champion:*`).
    The new model deploys when it is not worse than the champion by more than `margin` on
    `gate_metric`, on all test photos and, when there are `live_min_photos` of them, on the live
    photos alone."""
    ok, reason = overall_decision(metrics, has_champion, gate_metric, margin)
    if not ok or not has_champion:
        return ok, reason
    live_ok, live_reason = live_decision(metrics, gate_metric, margin, live_min_photos)
    return live_ok, f"{reason}; {live_reason}"


def live_decision(
    metrics: Mapping[str, float], gate_metric: str, margin: float, live_min_photos: int
) -> tuple[bool, str]:
    """The same comparison on the test channel's live photos: (False, why) only when there are enough
    of them and the new model is worse on them by more than `margin`."""
    new, old = metrics.get(f"test:live_{gate_metric}"), metrics.get(f"champion:live_{gate_metric}")
    n = int(metrics.get("test:live_n") or 0)
    if new is None or old is None:
        return True, "no live photos in the test set"
    summary = f"live test {gate_metric} on {n} photos: new {new:.4f}, serving {old:.4f}"
    if n < live_min_photos:
        return True, f"{summary}, fewer than {live_min_photos}: shown, not deciding"
    worse_by = (old - new) if GATE_METRICS[gate_metric] == "Maximize" else (new - old)
    if worse_by > margin:
        return False, f"but on the live photos the new model is worse by {worse_by:.4f} ({summary})"
    return True, f"and not worse beyond the margin on the live photos ({summary})"


def overall_decision(
    metrics: Mapping[str, float], has_champion: bool, gate_metric: str, margin: float
) -> tuple[bool, str]:
    """The comparison on all test photos."""
    if gate_metric not in GATE_METRICS:
        raise ValueError(f"gate metric {gate_metric!r}: choose one of {sorted(GATE_METRICS)}")
    new = metrics.get(f"test:{gate_metric}")
    if new is None:
        return False, f"the training job reported no test:{gate_metric}; was the test channel empty?"
    if not has_champion:
        return True, f"no model is serving yet: deploying the new one (test {gate_metric} {new:.4f})"
    old = metrics.get(f"champion:{gate_metric}")
    if old is None:
        return False, (
            "the serving model could not be scored on the test images (see the training job's "
            "log); not replacing it automatically"
        )
    maximize = GATE_METRICS[gate_metric] == "Maximize"
    worse_by = (old - new) if maximize else (new - old)
    summary = f"test {gate_metric}: new {new:.4f}, serving {old:.4f}, margin {margin:.4f}"
    if worse_by > margin:
        return False, f"the new model is worse than the serving one by {worse_by:.4f} ({summary})"
    return True, f"the new model is not worse than the serving one beyond the margin ({summary})"


# -- the champion before anything serves ----------------------------------------------------------
def model_version_of(archive: bytes) -> str:
    """The model_version in a model.tar.gz's model_card.json."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "model_card.json"), None)
        card = None if member is None else tar.extractfile(member)  # None for a member that is no file
        if card is None:
            raise ValueError("not a model.tar.gz written by train.py: it has no model_card.json")
        return json.loads(card.read())["model_version"]


def initial_champion(s3, bucket: str, spec: str) -> dict | None:
    """The champion before any model serves: the published model (`spec` "published"), a local
    model.tar.gz, or an s3:// URI; None for "" or "none". A local file is uploaded to
    s3://<bucket>/models/published/<content hash>/model.tar.gz once."""
    if spec in ("", "none"):
        return None
    if spec.startswith("s3://"):
        source_bucket, key = spec.removeprefix("s3://").split("/", 1)
        archive = s3.get_object(Bucket=source_bucket, Key=key)["Body"].read()
        uri = spec
    else:
        path = PUBLISHED_MODEL if spec == "published" else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"initial model {path} does not exist; run `make model`, or set the initial_model Param to none"
            )
        archive = path.read_bytes()
        uri = put_once(s3, bucket, content_key(PUBLISHED_PREFIX, archive, "model.tar.gz", digits=12), archive)
    return {
        "endpoint": None,
        "status": "NotDeployed",
        "model": None,
        "model_data_url": uri,
        "model_version": model_version_of(archive),
        "published": True,
    }
