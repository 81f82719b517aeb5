"""bench/deferral_slots.py's arithmetic on a canned sample: what a mode's figures count (slot-seconds
of the SageMaker waits, deferred seconds, time waiting for a slot, peaks) and the memory fit. The
measurement itself starts Airflow twice and runs for many minutes: BENCHMARKS.md has its numbers."""

from __future__ import annotations

import pytest

from bench.deferral_slots import get_args_parser, memory_fit, summarize, summary_lines


def canned() -> dict:
    """Two runs on two slots, sampled at t = 0, 1, 3, 4 (each sample counts until the next)."""
    samples = [
        {"t": 0.0, "tasks": {"a": {"dataset": "running"}, "b": {"dataset": "queued"}}, "jobs": [],
         "triggerer_rss_mb": 100.0},
        {"t": 1.0, "tasks": {"a": {"tune": "running"}, "b": {"dataset": "running"}}, "jobs": ["a"],
         "triggerer_rss_mb": 100.0},
        {"t": 3.0, "tasks": {"a": {"tune": "deferred"}, "b": {"tune": "deferred"}}, "jobs": ["a", "b"],
         "triggerer_rss_mb": 130.0},
        {"t": 4.0, "tasks": {"a": {}, "b": {"retrain": "scheduled"}}, "jobs": [], "triggerer_rss_mb": 120.0},
    ]  # fmt: skip
    runs = {
        "a": {"state": "success", "triggered_s": 0.0, "ended_s": 4.0, "tries": {}},
        "b": {"state": "success", "triggered_s": 0.5, "ended_s": 6.5, "tries": {}},
    }
    return {"deferrable": True, "slots": 2, "runs": runs, "samples": samples}


def test_a_modes_figures_count_each_state_for_the_time_until_the_next_sample():
    mode = summarize(canned())
    a, b = mode["runs"]["a"], mode["runs"]["b"]
    assert (a["wait_running_s"], a["wait_deferred_s"], a["slot_s"]) == (2.0, 1.0, 3.0)
    assert (b["wait_running_s"], b["wait_deferred_s"], b["slot_s"]) == (0.0, 1.0, 2.0)
    # b's dataset waited for a slot the first second, with nothing of b's running: blocked.
    assert (b["queued_task_s"], b["blocked_s"]) == (1.0, 1.0)
    assert (a["finish_s"], b["finish_s"], mode["makespan_s"]) == (4.0, 6.0, 6.5)
    assert mode["peak_runs_with_job_in_progress"] == 2
    assert (mode["peak_tasks_running"], mode["peak_tasks_deferred"]) == (2, 2)
    rss = mode["triggerer_rss_mb"]
    assert (rss["first"], rss["peak"], rss["at_peak_deferred"]) == (100.0, 130.0, 130.0)
    assert (mode["wait_running_s"], mode["wait_deferred_s"]) == (2.0, 2.0)
    lines = "\n".join(summary_lines({"modes": {"on": mode}}))
    # a's job ran from t=1 to t=4, b's from t=3.
    assert (a["job_s"], b["job_s"], mode["job_s"]) == (3.0, 1.0, 4.0)
    assert "| a | 4 | 3 | 2 | 1 | 3 | 0 | 0 |" in lines and "makespan 6 s" in lines


def test_the_memory_fit_is_the_first_waits_cost_and_the_slope_after_it():
    rows = [{"waits": k, "rss_mb": v} for k, v in ((0, 100.0), (1, 130.0), (10, 148.0), (100, 328.0))]
    assert memory_fit(rows) == {"fixed_mb": 30.0, "per_wait_mb": pytest.approx(2.0)}


def test_the_defaults_are_the_measurement_the_issue_asks_for():
    args = get_args_parser().parse_args([])
    assert (args.runs, args.slots, args.modes, args.waits) == (3, 2, "off,on", "0,1,10,50,100")
