"""The operator's view, end to end: Airflow's own components (API server, scheduler, DAG processor,
triggerer; what `airflow standalone` runs) on loopback with SQLite, the DAGs run by the scheduler
against the local stack (moto, the SageMaker and Lambda stand-in), and

- a real browser (Debian's Chromium, driven by Playwright; no downloaded browser) that logs in,
  finds the DAGs, triggers bin_count_retrain from the Params form with changed values, watches the
  run succeed and reads the training metrics in the task log, with screenshots in
  build/test-results/screenshots/;
- a drill that kills the scheduler (its whole process group, task runners included) while the final
  training job runs, starts it again, and checks that the run completes with no job run twice.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import boto3
import pytest

from scripts import local_stack
from scripts.airflow_api import Api, wait_until
from standin.launch import free_port, start_standin
from tests.airflow_side.conftest import API_KEY, BASE_CONF, CONTAINER_PYTHON, upload_dataset
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = REPO / "build" / "test-results" / "screenshots"
USER, PASSWORD = "operator", "local-operator-password"
# Chromium as this machine allows it: no sandbox as root, and none of its calls home (refused here).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]
# Small and quick, as in test_retrain_dag: 64-pixel images, counts 0 to 2.
QUICK = BASE_CONF["extra_hyperparameters"]

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")


@pytest.fixture(scope="module")
def live(moto_endpoint, tmp_path_factory):
    """The whole system on loopback, with a dataset in S3 and the UI asking for a login."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "local")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "local")
        yield from _live(moto_endpoint, tmp_path_factory)


def _live(moto_endpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("live")
    standin_proc, standin = start_standin(work / "standin", moto_endpoint, CONTAINER_PYTHON, api_key=API_KEY)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="ui-bucket")
    upload_dataset(s3, "ui-bucket", "v-ui", {"train": 10, "validation": 4, "test": 6})
    (work / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
    port = free_port()
    env = local_stack.server_env(
        local_stack.airflow_env(work, moto_endpoint, standin), port, f"{USER}:admin", work / "passwords.json"
    )
    # A scheduler killed with its task runners leaves their tasks "running" under its dead job; the
    # next scheduler resets them once the dead one is past its health threshold (30 s, left at the
    # default: lowered, a busy scheduler declares itself dead) at its next orphan check, which comes
    # every 10 s here rather than every 5 minutes.
    env.update({"AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10", "BIN_COUNTER_SAGEMAKER_POLL_S": "1"})
    local_stack.airflow(["db", "migrate"], env, work / "migrate.log")
    airflow = local_stack.LiveAirflow(env, work, port).start()
    try:
        api = Api(airflow.url, USER, PASSWORD)
        wait_until(
            lambda: {"bin_count_data_prep", "bin_count_retrain"} <= {d["dag_id"] for d in api.get("/dags")["dags"]},
            120,
            "the DAG processor to parse the DAGs",
        )
        yield {"airflow": airflow, "api": api, "standin": standin, "work": work}
    finally:
        airflow.stop()
        standin_proc.terminate()
        standin_proc.wait(timeout=20)


@pytest.fixture
def page(live, request):
    if not CHROMIUM:
        pytest.skip("needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (requirements-dev.txt)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        yield page
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            shot(page, f"failed-{request.node.name}")
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def field(dialog, name: str):
    """A Param's field in the trigger form, found by its label (the Param's name, `*` if required)."""
    label = dialog.page.locator("label", has_text=re.compile(rf"^{re.escape(name)}\s*\*?$"))
    return dialog.locator("div.chakra-field__root").filter(has=label)


def set_json(dialog, name: str, value) -> None:
    """Replace the JSON in a Param's code editor (Monaco: click into it, select all, type over it)."""
    field(dialog, name).locator(".monaco-editor .view-lines").click()
    keyboard = dialog.page.keyboard
    keyboard.press("ControlOrMeta+a")
    # Typed over the selection: emptied first, the form puts back an empty `[]` or `{}`.
    keyboard.insert_text(json.dumps(value))
    # The editor closes brackets and quotes as they are typed: drop what it added after the cursor.
    keyboard.press("Shift+ControlOrMeta+End")
    keyboard.press("Delete")


def log_in(page, url: str, screenshot: str | None = None) -> None:
    from playwright.sync_api import expect  # the page fixture has made sure playwright is there

    page.goto(f"{url}/")
    # Nothing is shown before logging in. The redirect takes more than one hop, and waiting for a
    # navigation event fails when a hop is aborted by the next one: poll the URL instead.
    expect(page).to_have_url(re.compile(r".*/auth/login.*"), timeout=30_000)
    if screenshot:
        shot(page, screenshot)
    page.locator("input[name=username]").fill(USER)
    page.locator("input[name=password]").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{url}/", timeout=30_000)


def open_trigger_form(page, url: str, dag_id: str):
    page.goto(f"{url}/dags/{dag_id}")
    page.wait_for_load_state("networkidle")  # a click before the page's data arrived opens nothing
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.locator("div.chakra-field__root").first.wait_for()
    return dialog


@pytest.mark.parametrize("dag_id", ["bin_count_data_prep", "bin_count_retrain", "bin_count_batch"])
def test_each_dags_trigger_form_accepts_its_defaults(live, page, dag_id):
    """Every Param renders as a field with its description, and the defaults pass the form's own
    validation: an operator can trigger a run without fixing anything first."""
    url = live["airflow"].url
    log_in(page, url)
    dialog = open_trigger_form(page, url, dag_id)
    params = live["api"].get(f"/dags/{dag_id}/details")["params"]
    for name, spec in params.items():
        text = field(dialog, name).inner_text()
        assert spec["description"] in text, f"{name}: {text!r}"
    shot(page, f"form-{dag_id}")
    invalid = [el.inner_text() for el in dialog.locator("div.chakra-field__root[data-invalid]").all()]
    assert not invalid, f"the form refuses its own defaults: {invalid}"
    assert dialog.get_by_role("button", name="Trigger", exact=True).is_enabled()


def test_an_operator_triggers_a_retrain_from_the_form_and_reads_its_metrics(live, page):
    url, api = live["airflow"].url, live["api"]

    log_in(page, url, screenshot="01-login")

    page.goto(f"{url}/dags")
    for dag_id in ("bin_count_data_prep", "bin_count_retrain"):
        page.get_by_role("link", name=dag_id, exact=True).wait_for()
    shot(page, "02-dags")

    # Unpaused first, as docs/infra/README.md tells a user: the trigger form's own unpause (a second
    # write beside the new run's, to SQLite here) can time out on the database lock under load, and
    # then the run waits, queued, for an unpause that never comes.
    api.patch("/dags/bin_count_retrain", {"is_paused": False})
    page.get_by_role("link", name="bin_count_retrain", exact=True).click()
    page.wait_for_url(f"{url}/dags/bin_count_retrain")
    dialog = open_trigger_form(page, url, "bin_count_retrain")
    # The Params render as typed fields with their descriptions.
    assert "Tuning: trials in all" in field(dialog, "max_jobs").inner_text()
    changed = {
        "bucket": "ui-bucket",
        "max_count": 2,
        "epochs_min": 2,
        "epochs_max": 2,
        "max_jobs": 1,
        "max_parallel_jobs": 1,
        "initial_model": "none",
        "smoke_images": 3,
        "batch_sizes": [8],
        "extra_hyperparameters": QUICK,
    }
    for name in ("bucket", "initial_model"):
        field(dialog, name).get_by_role("textbox").fill(changed[name])
    for name in ("max_count", "epochs_min", "epochs_max", "max_jobs", "max_parallel_jobs", "smoke_images"):
        field(dialog, name).get_by_role("spinbutton").fill(str(changed[name]))
    for name in ("batch_sizes", "extra_hyperparameters"):
        set_json(dialog, name, changed[name])
    field(dialog, "strategy").get_by_role("combobox").click()
    page.get_by_role("option", name="Random", exact=True).click()
    changed["strategy"] = "Random"
    shot(page, "03-trigger-form")
    invalid = [el.inner_text() for el in dialog.locator("div.chakra-field__root[data-invalid]").all()]
    assert not invalid, f"the form refuses: {invalid}"
    dialog.get_by_role("button", name="Trigger", exact=True).click()

    wait_until(lambda: api.runs("bin_count_retrain"), 60, "the triggered run")
    run = api.runs("bin_count_retrain")[0]
    assert {k: run["conf"][k] for k in changed} == changed, run["conf"]
    page.goto(f"{url}/dags/bin_count_retrain/runs/{run['dag_run_id']}")
    shot(page, "04-run-started")
    finished = api.wait_for_run("bin_count_retrain", run["dag_run_id"])
    tasks = api.tasks("bin_count_retrain", run["dag_run_id"])
    assert finished["state"] == "success", {t: ti["state"] for t, ti in tasks.items()}
    assert all(ti["try_number"] == 1 for ti in tasks.values()), {t: ti["try_number"] for t, ti in tasks.items()}

    # What the operator sees: the run's state, then the training job's metrics in the retrain task's log.
    page.goto(f"{url}/dags/bin_count_retrain/runs/{run['dag_run_id']}")
    page.get_by_text("Success", exact=True).first.wait_for()
    shot(page, "05-run-succeeded")
    page.goto(f"{url}/dags/bin_count_retrain/runs/{run['dag_run_id']}/tasks/retrain")
    # (The final job trains on train + validation, so its epochs report only the training loss.)
    page.get_by_text(re.compile(r"epoch=2 train_loss=[\d.]+")).first.wait_for(timeout=60_000)
    page.get_by_text(re.compile(r"test_accuracy=[\d.]+")).first.wait_for()
    shot(page, "06-retrain-log")


def test_a_scheduler_killed_during_training_comes_back_and_no_job_runs_twice(live):
    api, airflow = live["api"], live["airflow"]
    sm = boto3.client("sagemaker", endpoint_url=live["standin"], region_name="us-east-1")
    conf = {
        "bucket": "ui-bucket",
        "max_count": 2,
        "epochs_min": 3,
        "epochs_max": 3,
        "batch_sizes": [8],
        "max_jobs": 1,
        "max_parallel_jobs": 1,
        "strategy": "Random",
        "initial_model": "none",
        "smoke_images": 3,
        "extra_hyperparameters": QUICK,
        "deploy": False,
    }  # the drill is about the training task's retry; deploying is test_retrain_dag's
    api.patch("/dags/bin_count_retrain", {"is_paused": False})
    run_id = api.trigger("bin_count_retrain", conf)

    def final_job_running() -> bool:
        job = api.tasks("bin_count_retrain", run_id).get("retrain_config", {})
        if job.get("state") != "success":
            return False
        names = [j["TrainingJobName"] for j in sm.list_training_jobs(NameContains="-final")["TrainingJobSummaries"]]
        return any(sm.describe_training_job(TrainingJobName=n)["TrainingJobStatus"] == "InProgress" for n in names)

    wait_until(final_job_running, 600, "the final training job to start")
    before = {j["TrainingJobName"]: j["CreationTime"] for j in sm.list_training_jobs()["TrainingJobSummaries"]}
    airflow.kill("scheduler")  # SIGKILL to its process group: the task runners die with it
    time.sleep(5)
    airflow.restart("scheduler")

    finished = api.wait_for_run("bin_count_retrain", run_id)
    tasks = api.tasks("bin_count_retrain", run_id)
    assert finished["state"] == "success", {t: ti["state"] for t, ti in tasks.items()}
    assert tasks["retrain"]["try_number"] >= 2, "the kill did not interrupt the retrain task"
    after = {j["TrainingJobName"]: j["CreationTime"] for j in sm.list_training_jobs()["TrainingJobSummaries"]}
    # The retry attached to the job already running: the same jobs, each created once, before the kill.
    assert {name: after[name] for name in before} == before
    run_jobs = [name for name in after if name not in before]
    assert run_jobs == [], f"jobs started after the kill: {run_jobs}"
    retry_log = json.dumps(
        api.get(
            f"/dags/bin_count_retrain/dagRuns/{run_id}/taskInstances/retrain/logs/"
            f"{tasks['retrain']['try_number']}?full_content=true"
        )
    )
    assert "was started by an earlier try and is" in retry_log and "attaching to it" in retry_log
