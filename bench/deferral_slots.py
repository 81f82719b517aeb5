"""Deferred SageMaker waits: concurrent retraining runs on few worker slots, and triggerer memory.

Concurrent retraining runs with their SageMaker waits held by their tasks against deferred to the
triggerer; and the triggerer's memory per deferred wait.

A. Per mode (deferral off, then on; each a fresh Airflow home on the same moto server and stand-in):
   Airflow's components on loopback (scripts/local_stack.py; the LocalExecutor with
   `[core] parallelism` = --slots: that many worker processes, so at most that many tasks running;
   Airflow 3.3's scheduler queues more at once, and they wait, queued, for a worker),
   --runs bin_count_retrain runs triggered at once with the scheduler-kill drill's quick conf (one
   trial, then the final job, deploy off, initial_model none), each naming an endpoint of its own.
   The task instances' states are sampled every --sample-s through the REST API, the runs' SageMaker
   jobs through the stand-in, and the `airflow triggerer` process group's RSS from /proc.
   bin_count_retrain allows one active run (max_active_runs=1); a cluster policy
   (airflow_local_settings.py's dag_policy, in this bench's Airflow home only) raises it to --runs
   so that the runs can overlap at all.
B. In a fresh interpreter per K: K SageMakerTrigger(...).run() coroutines on one event loop, as the
   triggerer runs them, all polling one long InProgress training job on the stand-in; the process's
   VmRSS (after gc.collect()) once each has polled --polls times.

  PYTHONPATH=plugins .venv/bin/python -m bench.deferral_slots
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "bin_count_retrain"
# The tasks that only wait on SageMaker: they hold a slot while running, none while deferred.
WAIT_TASKS = ("tune", "retrain")
# A task instance in these states is ready and waits for an executor slot.
WAITING_FOR_SLOT = ("scheduled", "queued")
USER, PASSWORD = "bench", "bench-password"
DATASET = "v-bench"
# The cluster policy that lets the bench's runs of bin_count_retrain overlap (see the docstring).
POLICY = '''"""bench.deferral_slots: lets {runs} runs of {dag_id} be active at once."""


def dag_policy(dag):
    if dag.dag_id == "{dag_id}":
        dag.max_active_runs = {runs}
'''
# Part B's training job: an entry point that sleeps, so the job stays InProgress at no CPU cost.
SLEEPER = "import time\ntime.sleep(3600)\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="bin_count_retrain runs triggered at once (A)")
    parser.add_argument("--slots", type=int, default=2, help="worker slots: [core] parallelism (A)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the trial and of the final job (A)")
    parser.add_argument(
        "--modes", default="off,on", help="deferral modes to measure, in this order: off, on or both (A)"
    )
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds between two samples of the states (A)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one mode's runs may take (A)")
    parser.add_argument(
        "--waits", default="0,1,10,50,100", help="numbers of deferred waits K to measure the memory of (B)"
    )
    parser.add_argument("--polls", type=int, default=3, help="polls each wait makes before the RSS is read (B)")
    parser.add_argument("--poll-s", type=int, default=2, help="the triggers' waiter_delay in seconds (B)")
    parser.add_argument("--skip-memory", action="store_true", help="measure A only")
    parser.add_argument("--skip-runs", action="store_true", help="measure B only")
    parser.add_argument("--work", default="build/bench-deferral", help="state of the stack (emptied first)")
    parser.add_argument("--out", default="build/bench/deferral_slots.json", help="where the result JSON goes")
    parser.add_argument("--port", type=int, default=8097, help="port of the first mode's API server (+1 the next)")
    parser.add_argument("--moto-port", type=int, default=5091, help="port of the moto server")
    parser.add_argument("--standin-port", type=int, default=5096, help="port of the stand-in")
    parser.add_argument(
        "--report", action="store_true", help="measure nothing: summarize --out's samples again and print them"
    )
    parser.add_argument(
        "--child-waits",
        type=int,
        default=None,
        metavar="K",
        help="internal: be B's measuring process with K waits on --job, print its JSON and exit",
    )
    parser.add_argument("--job", default="", help="internal: the training job --child-waits polls")
    return parser


# -- A: concurrent runs ------------------------------------------------------------------------------
def quick_conf(endpoint: str, epochs: int) -> dict:
    """The scheduler-kill drill's conf (tests/airflow_side/test_live_airflow.py): one trial, then the
    final job, nothing registered or deployed; on an endpoint of the run's own."""
    from tests.airflow_side.conftest import BASE_CONF

    return {
        "dataset_version": DATASET,
        "endpoint_name": endpoint,
        "max_count": 2,
        "epochs_min": epochs,
        "epochs_max": epochs,
        "batch_sizes": [8],
        "max_jobs": 1,
        "max_parallel_jobs": 1,
        "strategy": "Random",
        "initial_model": "none",
        "extra_hyperparameters": BASE_CONF["extra_hyperparameters"],
        "deploy": False,
    }


def mode_env(stack, work: Path, moto: str, standin: str, port: int, deferrable: bool, slots: int) -> dict[str, str]:
    """The local stack's Airflow environment in a fresh home under `work`, with --slots worker slots."""
    (work / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
    env = stack.server_env(stack.airflow_env(work, moto, standin), port, f"{USER}:admin", work / "passwords.json")
    from standin.launch import free_port

    env.update(
        {
            "AIRFLOW__CORE__PARALLELISM": str(slots),
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": str(deferrable),
            # Log servers of their own: on a port another Airflow holds, the triggerer's exits and its
            # memory leaves the triggerer's sum (the first measurement's deferral-off mode lost 132 MB so).
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
    )
    return env


def job_runs(sm, digests: dict[str, str]) -> set[str]:
    """The runs with a SageMaker job InProgress (the tuning job, a trial or the final job), by the
    run digest their job names carry (bin_counter.sagemaker_config.run_job_names)."""
    names = [
        j["TrainingJobName"]
        for j in sm.list_training_jobs(StatusEquals="InProgress", MaxResults=100)["TrainingJobSummaries"]
    ]
    names += [
        j["HyperParameterTuningJobName"]
        for j in sm.list_hyper_parameter_tuning_jobs(StatusEquals="InProgress", MaxResults=100)[
            "HyperParameterTuningJobSummaries"
        ]
    ]
    return {run for run, d in digests.items() if any(d in name for name in names)}


def process_rss_mb(pid: int) -> tuple[float | None, int]:
    """VmRSS of `pid` and every process below it, MB, and how many processes that is: the triggerer
    runs its triggers in a child, and its log server (`airflow serve-logs`) in another, which exits
    when its port is taken. (None, 0) once it is gone; a child that ends meanwhile, or a zombie (no
    VmRSS), counts nothing."""
    from bench.measure import descendants

    total_kb, counted = 0, 0
    for n, each in enumerate([pid, *descendants(pid)]):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            if n == 0:
                return None, 0
            continue
        rss = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")]
        total_kb, counted = total_kb + sum(rss), counted + bool(rss)
    return round(total_kb / 1024, 1), counted


def sample(api, sm, run_ids: list[str], digests: dict[str, str], triggerer_pid: int, started: float) -> dict:
    """One sample: each run's unfinished task instances' states, the runs with a job InProgress, the
    triggerer's RSS."""
    found = api.get(f"/dags/{DAG_ID}/dagRuns/~/taskInstances?limit=500")["task_instances"]
    states: dict[str, dict[str, str]] = {run: {} for run in run_ids}
    for ti in found:
        if ti["dag_run_id"] in states and ti["state"] not in (None, "success", "skipped", "removed"):
            states[ti["dag_run_id"]][ti["task_id"]] = ti["state"]
    rss, processes = process_rss_mb(triggerer_pid)
    return {
        "t": round(time.time() - started, 2),
        "tasks": states,
        "jobs": sorted(job_runs(sm, digests)),
        "triggerer_rss_mb": rss,
        "triggerer_processes": processes,
    }


def run_mode(stack, args, name: str, moto: str, standin: str, port: int) -> dict:
    """One mode's runs, sampled until they end: its samples and the runs' own records."""
    import boto3

    from bin_counter.sagemaker_config import run_digest
    from scripts.airflow_api import Api, wait_until

    deferrable = name == "on"
    work = Path(args.work).resolve() / f"deferral-{name}"
    work.mkdir(parents=True)
    env = mode_env(stack, work, moto, standin, port, deferrable, args.slots)
    (work / "airflow" / "config").mkdir(parents=True)
    (work / "airflow" / "config" / "airflow_local_settings.py").write_text(POLICY.format(runs=args.runs, dag_id=DAG_ID))
    stack.airflow(["db", "migrate"], env, work / "migrate.log")
    live = stack.LiveAirflow(env, work, port).start()
    try:
        api = Api(live.url, USER, PASSWORD)
        wait_until(lambda: api.get(f"/dags/{DAG_ID}/details")["max_active_runs"] == args.runs, 180, "the DAG parsed")
        api.patch(f"/dags/{DAG_ID}", {"is_paused": False})
        sm = boto3.client("sagemaker", endpoint_url=standin, region_name="us-east-1")
        run_ids = [f"bench-{name}-{i}" for i in range(1, args.runs + 1)]
        digests = {run: run_digest(DAG_ID, run) for run in run_ids}
        print(f"== deferral {name}: {args.runs} runs of {DAG_ID} on {args.slots} worker slots", flush=True)
        started = time.time()
        triggered = {}
        for i, run in enumerate(run_ids, 1):
            body = {"dag_run_id": run, "logical_date": None, "conf": quick_conf(f"bc-bench-{name}-{i}", args.epochs)}
            api.post(f"/dags/{DAG_ID}/dagRuns", body)
            triggered[run] = round(time.time() - started, 2)
        samples = []
        deadline = started + args.timeout
        while True:
            tick = time.time()
            samples.append(sample(api, sm, run_ids, digests, live.components["triggerer"].pid, started))
            runs = {r["dag_run_id"]: r for r in api.get(f"/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]}
            if all(runs.get(run, {}).get("state") in ("success", "failed") for run in run_ids):
                break
            if time.time() > deadline:
                raise SystemExit(f"deferral {name}: the runs did not end within {args.timeout:.0f} s")
            time.sleep(max(0.0, args.sample_s - (time.time() - tick)))
        records = {}
        for run in run_ids:
            tis = api.tasks(DAG_ID, run)
            records[run] = {
                "state": runs[run]["state"],
                "triggered_s": triggered[run],
                "ended_s": round(datetime.fromisoformat(runs[run]["end_date"]).timestamp() - started, 2),
                "tries": {t: ti["try_number"] for t, ti in tis.items() if ti["try_number"] > 1},
            }
            if runs[run]["state"] != "success":
                records[run]["failures"] = api.failures(DAG_ID, run)
    finally:
        live.stop()
    return {"deferrable": deferrable, "slots": args.slots, "runs": records, "samples": samples}


# What summarize adds up per run, seconds.
FIGURES = ("wait_running_s", "wait_deferred_s", "slot_s", "queued_task_s", "blocked_s", "job_s")


def summarize(measured: dict) -> dict:
    """A mode's figures from its samples (each counts for the time until the next) and run records."""
    samples, runs = measured["samples"], measured["runs"]
    per_run = {
        run: {
            "state": r["state"],
            "finish_s": round(r["ended_s"] - r["triggered_s"], 1),
            "wait_running_s": 0.0,
            "wait_deferred_s": 0.0,
            "slot_s": 0.0,
            "queued_task_s": 0.0,
            "blocked_s": 0.0,
            "job_s": 0.0,
        }
        for run, r in runs.items()
    }
    peak_jobs = peak_deferred = peak_running = 0
    rss = [s["triggerer_rss_mb"] for s in samples if s.get("triggerer_rss_mb") is not None]
    rss_at_peak = None
    for now, after in zip(samples, [*samples[1:], None], strict=True):
        dt = (after["t"] - now["t"]) if after else 0.0
        running = deferred = 0
        for run, tasks in now["tasks"].items():
            states = list(tasks.values())
            row = per_run[run]
            row["slot_s"] += dt * states.count("running")
            row["wait_running_s"] += dt * sum(tasks.get(t) == "running" for t in WAIT_TASKS)
            row["wait_deferred_s"] += dt * sum(tasks.get(t) == "deferred" for t in WAIT_TASKS)
            waiting = sum(s in WAITING_FOR_SLOT for s in states)
            row["queued_task_s"] += dt * waiting
            if waiting and not any(s in ("running", "deferred") for s in states):
                row["blocked_s"] += dt  # ready to go on, and no task of it running or deferred
            running += states.count("running")
            deferred += states.count("deferred")
        for run in now["jobs"]:
            per_run[run]["job_s"] += dt  # a SageMaker job of the run InProgress
        peak_jobs = max(peak_jobs, len(now["jobs"]))
        peak_running = max(peak_running, running)
        if deferred > peak_deferred or (deferred == peak_deferred and rss_at_peak is None):
            peak_deferred, rss_at_peak = deferred, now.get("triggerer_rss_mb")
    for row in per_run.values():
        for key in FIGURES:
            row[key] = round(row[key], 1)
    intervals = [b["t"] - a["t"] for a, b in itertools.pairwise(samples)]
    return {
        "deferrable": measured["deferrable"],
        "slots": measured["slots"],
        "makespan_s": round(max(r["ended_s"] for r in runs.values()) - min(r["triggered_s"] for r in runs.values()), 1),
        "runs": per_run,
        "succeeded": sum(r["state"] == "success" for r in runs.values()),
        "wait_running_s": round(sum(r["wait_running_s"] for r in per_run.values()), 1),
        "wait_deferred_s": round(sum(r["wait_deferred_s"] for r in per_run.values()), 1),
        "slot_s": round(sum(r["slot_s"] for r in per_run.values()), 1),
        "queued_task_s": round(sum(r["queued_task_s"] for r in per_run.values()), 1),
        "blocked_s": round(sum(r["blocked_s"] for r in per_run.values()), 1),
        "job_s": round(sum(r["job_s"] for r in per_run.values()), 1),
        "peak_runs_with_job_in_progress": peak_jobs,
        "peak_tasks_running": peak_running,
        "peak_tasks_deferred": peak_deferred,
        "triggerer_rss_mb": {
            "first": rss[0] if rss else None,
            "peak": max(rss) if rss else None,
            "at_peak_deferred": rss_at_peak,
            # Absent in results measured before the count was kept.
            "processes": max((s.get("triggerer_processes", 0) for s in samples), default=0) or None,
        },
        "samples": len(samples),
        "sample_interval_s": round(statistics.median(intervals), 2) if intervals else None,
    }


# -- B: the triggerer's memory per deferred wait -------------------------------------------------------
def sleeping_job(stack, moto: str, standin: str, name: str) -> None:
    """A training job on the stand-in whose entry point sleeps an hour: InProgress, at no CPU cost."""
    import boto3

    from bin_counter.sagemaker_config import training_job_config

    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("train.py")
        info.size = len(SLEEPER)
        tar.addfile(info, io.BytesIO(SLEEPER.encode()))
    s3.put_object(Bucket=stack.BUCKET, Key=f"{name}/sourcedir.tar.gz", Body=buf.getvalue())
    s3.put_object(Bucket=stack.BUCKET, Key=f"{name}/train/empty.txt", Body=b"-")
    config = training_job_config(
        job_name=name,
        image_uri="local/pytorch-training:cpu",
        role_arn=json.loads(stack.STACK.outputs["SageMakerVariable"])["role_arn"],
        source_s3_uri=f"s3://{stack.BUCKET}/{name}/sourcedir.tar.gz",
        channels={"train": f"s3://{stack.BUCKET}/{name}/train/"},
        output_s3_uri=f"s3://{stack.BUCKET}/{name}/output/",
        hyperparameters={},
        region="us-east-1",
    )
    boto3.client("sagemaker", endpoint_url=standin, region_name="us-east-1").create_training_job(**config)


def vm_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")))


def child_waits(waits: int, job: str, polls: int, poll_s: int) -> dict:
    """B's measuring process: `waits` SageMakerTrigger.run() coroutines on one event loop, as the
    triggerer runs them, until each has polled `polls` times (counted from the waiter's status lines);
    then the RSS after gc.collect(), with every wait still pending."""
    import asyncio
    import gc
    import logging

    from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

    polled = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            polled.append(1)

    waiter_log = logging.getLogger("airflow.providers.amazon.aws.utils.waiter_with_logging")
    waiter_log.setLevel(logging.INFO)
    waiter_log.addHandler(Count())
    waiter_log.propagate = False
    ended: list = []

    async def wait(trigger: SageMakerTrigger) -> None:
        async for event in trigger.run():
            ended.append(event.payload)  # the job ended or the wait failed: reported, not counted as polling

    async def measure() -> dict:
        gc.collect()
        before_kb = vm_kb("VmRSS")
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(
                wait(
                    SageMakerTrigger(job_name=job, job_type="Training", waiter_delay=poll_s, waiter_max_attempts=10**6)
                )
            )
            for _ in range(waits)
        ]
        target = waits * polls
        deadline = time.time() + 120 + polls * poll_s
        while len(polled) < target and not ended and time.time() < deadline:
            await asyncio.sleep(0.1)
        if not waits:
            await asyncio.sleep(polls * poll_s)  # the loop idles as long as the waits would have polled
        took = time.perf_counter() - started
        gc.collect()
        after_kb = vm_kb("VmRSS")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "waits": waits,
            "rss_mb": round(after_kb / 1024, 1),
            "rss_before_waits_mb": round(before_kb / 1024, 1),
            "hwm_mb": round(vm_kb("VmHWM") / 1024, 1),
            "polls": len(polled),
            "polls_wanted": target,
            "seconds": round(took, 1),
            "ended": ended[:3],
        }

    return asyncio.run(measure())


def trigger_memory(stack, args, moto: str, standin: str) -> dict:
    """B: a fresh interpreter per K, each polling the same sleeping job; the fixed cost (K=1 minus
    K=0) and the slope per wait (least squares over K >= 1)."""
    import boto3

    work = Path(args.work).resolve() / "trigger-memory"
    work.mkdir(parents=True)
    env = stack.airflow_env(work, moto, standin)
    job = "bench-deferral-sleeper"
    sleeping_job(stack, moto, standin, job)
    sm = boto3.client("sagemaker", endpoint_url=standin, region_name="us-east-1")
    rows = []
    try:
        for waits in [int(k) for k in args.waits.split(",")]:
            command = [
                sys.executable,
                "-m",
                "bench.deferral_slots",
                "--child-waits",
                str(waits),
                "--job",
                job,
                "--polls",
                str(args.polls),
                "--poll-s",
                str(args.poll_s),
            ]
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"the K={waits} measurement failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"   K={waits}: RSS {row['rss_mb']} MB after {row['polls']} polls ({row['seconds']} s)"
                + (f"; ended: {row['ended']}" if row["ended"] else ""),
                flush=True,
            )
            rows.append(row)
    finally:
        with contextlib.suppress(Exception):
            sm.stop_training_job(TrainingJobName=job)
    return {"job": job, "poll_s": args.poll_s, "rows": rows, **memory_fit(rows)}


def memory_fit(rows: list[dict]) -> dict:
    """The fixed cost of the first wait (K=1 minus K=0) and the cost of each further one (the
    least-squares slope of RSS over K >= 1), MB."""
    by_k = {r["waits"]: r["rss_mb"] for r in rows}
    fixed = round(by_k[1] - by_k[0], 1) if 0 in by_k and 1 in by_k else None
    points = sorted((k, v) for k, v in by_k.items() if k >= 1)
    slope = None
    if len(points) >= 2:
        mean_k = statistics.mean(k for k, _ in points)
        mean_v = statistics.mean(v for _, v in points)
        slope = sum((k - mean_k) * (v - mean_v) for k, v in points) / sum((k - mean_k) ** 2 for k, _ in points)
        slope = round(slope, 3)
    return {"fixed_mb": fixed, "per_wait_mb": slope}


# -- the report ----------------------------------------------------------------------------------------
def summary_lines(result: dict) -> list[str]:
    """What the run prints: a table per mode and B's rows."""
    lines = []
    for name, mode in result.get("modes", {}).items():
        lines += [
            f"\ndeferral {name}: {mode['succeeded']}/{len(mode['runs'])} runs succeeded on {mode['slots']} slots, "
            f"makespan {mode['makespan_s']:.0f} s; peak runs with a SageMaker job InProgress "
            f"{mode['peak_runs_with_job_in_progress']}, peak tasks running {mode['peak_tasks_running']}, "
            f"deferred {mode['peak_tasks_deferred']}",
            "| run | finished after s | SageMaker job InProgress s | wait in a slot (tune, retrain running) s "
            "| wait deferred s | all tasks' slot s | task s waiting for a slot "
            "| s blocked (nothing running or deferred) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for run, row in mode["runs"].items():
            lines.append(
                f"| {run} | {row['finish_s']:.0f} | {row['job_s']:.0f} | {row['wait_running_s']:.0f} | "
                f"{row['wait_deferred_s']:.0f} | {row['slot_s']:.0f} | {row['queued_task_s']:.0f} | "
                f"{row['blocked_s']:.0f} |"
            )
        lines.append(
            f"| all | makespan {mode['makespan_s']:.0f} | {mode['job_s']:.0f} | {mode['wait_running_s']:.0f} | "
            f"{mode['wait_deferred_s']:.0f} | {mode['slot_s']:.0f} | {mode['queued_task_s']:.0f} | "
            f"{mode['blocked_s']:.0f} |"
        )
        rss = mode["triggerer_rss_mb"]
        lines.append(
            f"triggerer RSS ({rss.get('processes') or 'its'} processes, summed): {rss['first']} MB at the start, "
            f"{rss['peak']} MB at most, {rss['at_peak_deferred']} MB with {mode['peak_tasks_deferred']} waits deferred"
        )
    memory = result.get("trigger_memory")
    if memory:
        lines += ["\n| deferred waits K | RSS MB | polls |", "| --- | --- | --- |"]
        lines += [f"| {r['waits']} | {r['rss_mb']} | {r['polls']} |" for r in memory["rows"]]
        lines.append(f"first wait {memory['fixed_mb']} MB, each further wait {memory['per_wait_mb']} MB")
    return lines


def report(out: Path) -> int:
    """Summarize an earlier result's samples again (the figures of this version) and print them."""
    result = json.loads(out.read_text())
    result["modes"] = {name: summarize(measured) for name, measured in result.get("samples", {}).items()}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(summary_lines(result)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.child_waits is not None:
        print(json.dumps(child_waits(args.child_waits, args.job, args.polls, args.poll_s)), flush=True)
        return 0
    if args.report:
        return report(Path(args.out))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"off", "on"}:
        raise SystemExit(f"--modes: off and/or on, not {args.modes!r}")
    from scripts import local_stack as stack
    from tests.airflow_side.conftest import upload_dataset

    if not stack.CONTAINER_PYTHON.exists():
        raise SystemExit(f"{stack.CONTAINER_PYTHON} is missing: run `make envs` first")
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    processes, moto, standin = stack.start_servers(work, args.moto_port, args.standin_port)
    result: dict = {
        "args": {k: v for k, v in vars(args).items() if k not in ("child_waits", "job")},
        # Everything here shares the machine's cores with whatever else runs: say how busy it was.
        "cpus": os.cpu_count(),
        "load_at_start": os.getloadavg(),
    }
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
        # As test_live_airflow's stack: 10, 4 and 6 photos of each count (0, 1, 2).
        upload_dataset(s3, stack.BUCKET, DATASET, {"train": 10, "validation": 4, "test": 6})
        if not args.skip_memory:
            print("== B: triggerer memory per deferred wait", flush=True)
            result["trigger_memory"] = trigger_memory(stack, args, moto, standin)
        if not args.skip_runs:
            result["modes"], result["samples"] = {}, {}
            for i, name in enumerate(modes):
                measured = run_mode(stack, args, name, moto, standin, args.port + i)
                result["modes"][name] = summarize(measured)
                result["samples"][name] = measured
    finally:
        for process in processes:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["load_at_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(summary_lines(result)))
    print(f"\nresult: {out}")
    ok = all(m["succeeded"] == len(m["runs"]) for m in result.get("modes", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    sys.exit(main())
