"""Scheduler overhead per task over a full demo run, with a real scheduler (not `airflow dags test`).

Starts the local stack and Airflow's components on loopback (scripts/local_stack.py), runs
bin_count_data_prep on a key range of an ABID source and then bin_count_retrain with the demo's
small search, both through the scheduler and the LocalExecutor, and splits each task's wall time:

  latency   scheduled (its upstream done) -> running: the scheduler's loop, the executor's queue,
            starting the task's process
  startup   running -> the operator's execute() begins: the task runner parsing the DAG file,
            fetching the task's context
  work      execute() itself (for SageMaker tasks: submitting and following the job)
  teardown  execute() returns -> the task is marked done: pushing XComs, reporting the state

overhead = latency + startup + teardown. The execute() bounds come from the task log's own
"Pre Execute" / "Post Execute" groups.

  PYTHONPATH=plugins .venv/bin/python -m bench.scheduler_overhead --source ../shared/abid --keys 01000:01600
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from scripts import local_stack as stack

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "abid"), help="ABID source (mirror or s3://)")
    parser.add_argument("--keys", default="01000:01600", help="key range START:STOP to prepare")
    parser.add_argument("--work", default="build/bench-scheduler", help="state of the stack (emptied first)")
    parser.add_argument("--port", type=int, default=8093, help="port of the Airflow API server")
    parser.add_argument("--moto-port", type=int, default=5083, help="port of the moto server")
    parser.add_argument("--standin-port", type=int, default=5088, help="port of the stand-in")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each DAG run may take")
    return parser


TIMINGS = """
import json
from airflow.models import DagRun, TaskInstance
from airflow.utils.session import create_session
with create_session() as s:
    run = s.query(DagRun).filter(DagRun.dag_id == {dag_id!r}, DagRun.run_id == {run_id!r}).one()
    tis = s.query(TaskInstance).filter(TaskInstance.dag_id == {dag_id!r}, TaskInstance.run_id == {run_id!r})
    iso = lambda t: t.isoformat() if t else None
    print(json.dumps({{"state": str(run.state), "start": iso(run.start_date), "end": iso(run.end_date),
                      "tasks": {{t.task_id: {{"state": str(t.state), "try": t.try_number,
                                              "scheduled": iso(t.scheduled_dttm), "start": iso(t.start_date),
                                              "end": iso(t.end_date)}} for t in tis}}}}))
"""


def run_timings(env: dict[str, str], dag_id: str, run_id: str) -> dict:
    code = TIMINGS.format(dag_id=dag_id, run_id=run_id)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def execute_bounds(log: Path) -> tuple[datetime | None, datetime | None]:
    """When execute() began and ended, from the task log's Pre/Post Execute groups."""
    begin = end = None
    in_pre = False
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        event, stamp = record.get("event", ""), datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        if event == "::group::Pre Execute":
            in_pre = True
        elif event == "::endgroup::" and in_pre:
            begin, in_pre = stamp, False
        elif event == "::group::Post Execute":
            end = stamp
    return begin, end


def split_times(timings: dict, logs: Path, dag_id: str, run_id: str) -> list[dict]:
    rows = []
    for task_id, ti in sorted(timings["tasks"].items(), key=lambda kv: kv[1]["start"] or ""):
        if not (ti["scheduled"] and ti["start"] and ti["end"]):
            continue  # skipped: never ran
        scheduled, start, end = (datetime.fromisoformat(ti[k]) for k in ("scheduled", "start", "end"))
        log = logs / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}" / f"attempt={ti['try']}.log"
        begin, finish = execute_bounds(log) if log.exists() else (None, None)
        if begin is None or finish is None:
            continue
        row = {
            "task": task_id,
            "latency": (start - scheduled).total_seconds(),
            "startup": (begin - start).total_seconds(),
            "work": (finish - begin).total_seconds(),
            "teardown": (end - finish).total_seconds(),
        }
        row["overhead"] = row["latency"] + row["startup"] + row["teardown"]
        rows.append(row)
    return rows


def report(dag_id: str, timings: dict, rows: list[dict]) -> str:
    wall = (datetime.fromisoformat(timings["end"]) - datetime.fromisoformat(timings["start"])).total_seconds()
    lines = [
        f"\n{dag_id}: {timings['state']} in {wall:.0f} s, {len(rows)} tasks ran",
        "| task | latency s | startup s | work s | teardown s | overhead s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['latency']:.1f} | {r['startup']:.1f} | {r['work']:.1f} | "
            f"{r['teardown']:.1f} | {r['overhead']:.1f} |"
        )
    overheads = [r["overhead"] for r in rows]
    lines.append(
        f"overhead per task: median {statistics.median(overheads):.1f} s, max {max(overheads):.1f} s, "
        f"sum {sum(overheads):.0f} s; work sum {sum(r['work'] for r in rows):.0f} s"
    )
    return "\n".join(lines)


def wait_for(env: dict[str, str], dag_id: str, run_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        timings = run_timings(env, dag_id, run_id)
        if timings["state"] in ("success", "failed"):
            return timings
        time.sleep(5)
    raise SystemExit(f"{dag_id} {run_id} did not finish within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    processes, moto, standin = stack.start_servers(work, args.moto_port, args.standin_port)
    env = stack.server_env(stack.airflow_env(work, moto, standin), args.port)
    log = work / "cli.log"
    live = None
    try:
        stack.airflow(["db", "migrate"], env, log)
        live = stack.LiveAirflow(env, work, args.port).start()
        deadline = time.time() + 180
        while True:  # until the DAG processor has parsed the DAG
            try:
                stack.airflow(["dags", "unpause", "bin_count_data_prep"], env, log)
                break
            except SystemExit:
                if time.time() > deadline:
                    raise
                time.sleep(5)
        prep_conf = {
            "bucket": stack.BUCKET,
            "source": str(Path(args.source).resolve()) if Path(args.source).exists() else args.source,
            "subset": "key_range",
            "key_range": args.keys,
            "block_size": 20,
            "max_count": 5,
        }
        # bin_count_retrain stays paused meanwhile: the dataset's asset event would start it with its
        # production defaults; it is triggered below with the demo's small search instead.
        stack.airflow(
            ["dags", "trigger", "bin_count_data_prep", "--run-id", "bench-prep", "-c", json.dumps(prep_conf)], env, log
        )
        prep = wait_for(env, "bin_count_data_prep", "bench-prep", args.timeout)
        stack.airflow(
            [
                "dags",
                "trigger",
                "bin_count_retrain",
                "--run-id",
                "bench-retrain",
                "-c",
                json.dumps({"bucket": stack.BUCKET, **stack.DEMO_RETRAIN}),
            ],
            env,
            log,
        )
        stack.airflow(["dags", "unpause", "bin_count_retrain"], env, log)
        retrain = wait_for(env, "bin_count_retrain", "bench-retrain", args.timeout)
    finally:
        if live:
            live.stop()
        for process in processes:
            process.terminate()
    logs = work / "airflow" / "logs"
    result = {}
    for dag_id, run_id, timings in (
        ("bin_count_data_prep", "bench-prep", prep),
        ("bin_count_retrain", "bench-retrain", retrain),
    ):
        rows = split_times(timings, logs, dag_id, run_id)
        print(report(dag_id, timings, rows), flush=True)
        result[dag_id] = {"timings": timings, "rows": rows}
    every = [r["overhead"] for d in result.values() for r in d["rows"]]
    print(
        f"\nall {len(every)} tasks: overhead median {statistics.median(every):.1f} s, "
        f"mean {statistics.mean(every):.1f} s"
    )
    (work / "scheduler-overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if prep["state"] == retrain["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
