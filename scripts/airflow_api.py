"""Airflow 3's REST API as an operator's user: what the live tests and the compose check drive a
running Airflow with (log in, trigger, wait for a run, read its task instances)."""

from __future__ import annotations

import time

import requests


class Api:
    """A logged-in client of the API server at `url` (its SimpleAuthManager's `user` and `password`)."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.url = url
        self.token = self._call("POST", "/auth/token", {"username": user, "password": password}, auth=False)[
            "access_token"
        ]

    def _call(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        response = requests.request(method, f"{self.url}{path}", json=body, headers=headers, timeout=30)
        response.raise_for_status()
        return response.json() if response.content else {}

    def get(self, path: str) -> dict:
        return self._call("GET", f"/api/v2{path}")

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", f"/api/v2{path}", body)

    def patch(self, path: str, body: dict) -> dict:
        return self._call("PATCH", f"/api/v2{path}", body)

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns?order_by=-run_after")["dag_runs"]

    def trigger(self, dag_id: str, conf: dict) -> str:
        """A manual run of `dag_id` now with `conf`; its run id."""
        return self.post(f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def tasks(self, dag_id: str, run_id: str) -> dict[str, dict]:
        found = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
        return {ti["task_id"]: ti for ti in found}

    def task_log(self, dag_id: str, run_id: str, ti: dict) -> list[str]:
        """A task instance's log (one of `tasks`' values): its structured lines as text."""
        found = self.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}"
            f"?full_content=true&map_index={ti.get('map_index', -1)}"
        )["content"]
        lines = []
        for entry in found:
            if isinstance(entry, dict):
                lines.append(f"{entry.get('level', '')} {entry.get('event', '')}".strip())
                lines += [f"    {line}" for line in _error_lines(entry.get("error_detail"))]
            else:
                lines.append(str(entry))
        return lines

    def failures(self, dag_id: str, run_id: str, last: int = 15) -> str:
        """Each failed task instance of the run with the last lines of its log: what an on-call reads."""
        found = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
        said = []
        for ti in found:
            if ti["state"] == "failed":
                where = ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else "")
                try:
                    tail = self.task_log(dag_id, run_id, ti)[-last:]
                except requests.RequestException as exc:
                    tail = [f"(its log could not be read: {exc})"]
                said.append(f"-- {where}, try {ti['try_number']}:\n  " + "\n  ".join(tail))
        return "\n".join(said)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(3)
        states = {t: ti["state"] for t, ti in self.tasks(dag_id, run_id).items()}
        raise AssertionError(f"{dag_id} {run_id} still {run['state']} after {timeout:.0f} s: {states}")


def _error_lines(detail) -> list[str]:
    """The exception lines of a structured log entry's error_detail (Airflow's JSON traceback)."""
    if not isinstance(detail, list):
        return []
    return [f"{e.get('exc_type', '')}: {e.get('exc_value', '')}" for e in detail if isinstance(e, dict)]


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll `condition` every 2 s until it is true; a connection refused counts as not yet."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass  # not up yet
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
