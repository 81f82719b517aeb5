"""Sum JUnit XML reports of several pytest runs into one closing line; fail if none ran.

python scripts/test_summary.py build/test-results/*.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET  # our own pytest reports


def main(paths: list[str]) -> int:
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for path in paths:
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
