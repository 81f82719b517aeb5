"""Sum JUnit XML reports of several pytest runs into one closing line; fail if none ran. Coverage
reports (coverage.py's JSON, one per suite) given beside them are printed just above that line.

python scripts/test_summary.py build/test-results/*.xml build/test-results/coverage-*.json
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET  # our own pytest reports
from pathlib import Path


def coverage_line(path: str) -> str:
    """`coverage (container): 81% of 2,345 statements` from a coverage.py JSON report named
    coverage-<suite>.json."""
    totals = json.loads(Path(path).read_text())["totals"]
    suite = Path(path).stem.removeprefix("coverage-")
    return (
        f"coverage ({suite}): {totals['percent_covered']:.0f}% of {totals['num_statements']:,} statements, "
        f"{totals['missing_lines']:,} not run in the test process"
    )


def main(paths: list[str]) -> int:
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for path in sorted(p for p in paths if p.endswith(".json")):
        try:
            print(coverage_line(path))
        except (OSError, KeyError, ValueError) as exc:
            print(f"test summary: cannot read {path}: {exc}", file=sys.stderr)
    for path in (p for p in paths if not p.endswith(".json")):
        try:
            root = ET.parse(path).getroot()  # noqa: S314
        except (OSError, ET.ParseError) as exc:
            print(f"test summary: cannot read {path}: {exc}", file=sys.stderr)
            return 1
        for suite in root.iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
    failed = totals["failures"] + totals["errors"]
    passed = totals["tests"] - failed - totals["skipped"]
    print(f"total: {passed} passed, {failed} failed, {totals['skipped']} skipped")
    if passed == 0:
        print("test summary: no test passed (none found?)", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
