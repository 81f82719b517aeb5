"""scripts/test_summary.py: one closing line for both suites, their coverage just above it."""

from __future__ import annotations

import json

from scripts import test_summary


def junit(path, tests: int, failures: int = 0, skipped: int = 0):
    path.write_text(
        f'<testsuites><testsuite tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}"/></testsuites>'
    )
    return str(path)


def test_the_closing_line_sums_the_suites_and_coverage_stands_above_it(tmp_path, capsys):
    coverage = tmp_path / "coverage-container.json"
    coverage.write_text(
        json.dumps({"totals": {"percent_covered": 81.26, "num_statements": 2345, "missing_lines": 439}})
    )
    paths = [junit(tmp_path / "a.xml", 10, skipped=1), junit(tmp_path / "b.xml", 5), str(coverage)]
    assert test_summary.main(paths) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "coverage (container): 81% of 2,345 statements, 439 not run in the test process",
        "total: 14 passed, 0 failed, 1 skipped",
    ]


def test_a_failure_or_no_test_at_all_fails(tmp_path, capsys):
    assert test_summary.main([junit(tmp_path / "a.xml", 3, failures=1)]) == 1
    assert capsys.readouterr().out.strip() == "total: 2 passed, 1 failed, 0 skipped"
    assert test_summary.main([junit(tmp_path / "b.xml", 0)]) == 1
