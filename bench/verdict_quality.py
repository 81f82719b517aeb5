"""How good the API's quantity verdicts are on real photos: the share of wrong expected counts
flagged as `mismatch`, at a fixed share of right ones wrongly flagged (false alarms).

  PYTHONPATH=sagemaker_code:lambda .venv-container/bin/python -m bench.verdict_quality \\
      --model models/bin-counter.tar.gz --split build/exp/e10/split --false-alarm 0.05

Every test photo is asked twice: with its true count (a right expectation) and with a count one
off (a wrong one: the usual discrepancy, an item missing or extra), and also with counts two or
more off. A verdict compares the model's probability of exactly the expected count with
MISMATCH_THRESHOLD / MATCH_THRESHOLD, as lambda/handler.py does. The mismatch threshold for the
target false-alarm rate is chosen on the validation photos and then applied to the test photos,
so the reported rates are not tuned on the images they are measured on.
Prints one JSON object; --markdown also prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import datasets
import evaluate

# The API's own verdict code and defaults, so the benchmark measures what the API does.
from verdicts import DEFAULT_MATCH_THRESHOLD, DEFAULT_MISMATCH_THRESHOLD, classify


def probabilities_of(model_path: Path, split_dir: Path, max_count: int, batch_size: int) -> list[tuple[int, list]]:
    """(true count, class probabilities) of every photo in a split folder, through the serving code."""
    samples = [s for s in datasets.list_samples(str(split_dir)) if s.count <= max_count]
    with tempfile.TemporaryDirectory() as workdir:
        model = evaluate.open_model(model_path, Path(workdir))
        predictions = evaluate.predict_counts(model, samples, batch_size)
    return [(s.count, p["probabilities"]) for s, p in zip(samples, predictions, strict=True)]


def queries(photos: list[tuple[int, list]], offsets: tuple[int, ...]) -> list[float]:
    """The model's probability of the expected count, for every photo and every expected count at
    one of `offsets` from the truth (0: the right count), where that count is a class."""
    found = []
    for truth, probabilities in photos:
        for offset in offsets:
            for expected in {truth - offset, truth + offset}:
                if 0 <= expected < len(probabilities):
                    found.append(probabilities[expected])
    return found


def shares(probabilities: list[float], match: float, mismatch: float) -> dict:
    """The share of each verdict the API would give for these expected-count probabilities."""
    outcomes = [classify(p, match, mismatch) for p in probabilities]
    n = len(outcomes)
    return {"n": n, **{v: round(outcomes.count(v) / n, 3) for v in ("match", "mismatch", "uncertain")}}


def threshold_for(right: list[float], false_alarm: float) -> float:
    """The largest mismatch threshold that flags at most `false_alarm` of the right expectations."""
    ordered = sorted(right)
    allowed = int(false_alarm * len(ordered))  # this many right expectations may fall at or below it
    if allowed == 0:
        return max(0.0, ordered[0] - 1e-6)
    return (ordered[allowed - 1] + ordered[allowed]) / 2 if allowed < len(ordered) else ordered[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.tar.gz or model folder")
    parser.add_argument("--split", required=True, help="a split folder with validation/ and test/ (<count>/<key>.jpg)")
    parser.add_argument("--max-count", type=int, default=5, help="top count class")
    parser.add_argument("--false-alarm", type=float, default=0.05, help="target share of right counts flagged")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args()
    split = Path(args.split)
    validation = probabilities_of(Path(args.model), split / "validation", args.max_count, args.batch_size)
    test = probabilities_of(Path(args.model), split / "test", args.max_count, args.batch_size)
    tuned = threshold_for(queries(validation, (0,)), args.false_alarm)
    far = tuple(range(2, args.max_count + 1))
    rows = {}
    for name, mismatch in (
        ("handler defaults", DEFAULT_MISMATCH_THRESHOLD),
        (f"tuned for {args.false_alarm:.0%} false alarms", tuned),
    ):
        rows[name] = {
            "mismatch_threshold": round(mismatch, 4),
            "right count (false alarm = mismatch)": shares(queries(test, (0,)), DEFAULT_MATCH_THRESHOLD, mismatch),
            "one off (caught = mismatch)": shares(queries(test, (1,)), DEFAULT_MATCH_THRESHOLD, mismatch),
            "two or more off": shares(queries(test, far), DEFAULT_MATCH_THRESHOLD, mismatch),
        }
    result = {
        "model": args.model,
        "test_photos": len(test),
        "validation_photos": len(validation),
        "match_threshold": DEFAULT_MATCH_THRESHOLD,
        "rows": rows,
    }
    print(json.dumps(result))
    if args.markdown:
        print(
            "| thresholds | mismatch below | right count: false alarms / match / uncertain | one off: caught / "
            "wrongly matched / uncertain | two or more off: caught / wrongly matched |"
        )
        print("| --- | --- | --- | --- | --- |")
        for name, row in rows.items():
            right, one, far = (row[k] for k in list(row)[1:])
            print(
                f"| {name} | {row['mismatch_threshold']} | {right['mismatch']} / {right['match']} / "
                f"{right['uncertain']} | {one['mismatch']} / {one['match']} / {one['uncertain']} | "
                f"{far['mismatch']} / {far['match']} |"
            )


if __name__ == "__main__":
    main()
