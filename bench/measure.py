"""Timing and memory helpers the benchmarks share. Standard library only, so that either environment
can import it (the Airflow side's benchmarks and the container side's train_throughput)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def timed(call, runs: int, warm: int = 3) -> list[float]:
    """Milliseconds of each of `runs` calls of `call`, after `warm` untimed ones."""
    for _ in range(warm):
        call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def p50(times: list[float]) -> float:
    return round(statistics.median(times), 1)


def memory_mb(pids: list[int]) -> dict:
    """Resident memory of the processes: RSS (shared pages counted in each) and PSS (shared out)."""
    rss = pss = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        rss += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        pss += int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:")))
    return {"processes": len(pids), "rss_mb": round(rss / 1024), "pss_mb": round(pss / 1024)}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), the ones that ended meanwhile left out."""
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found
