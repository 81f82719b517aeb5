"""The operator's view, end to end: Airflow's own components (API server, scheduler, DAG processor,
triggerer; what `airflow standalone` runs) on loopback with SQLite, the DAGs run by the scheduler
against the local stack (moto, the SageMaker and Lambda stand-in), and

- a real browser (Debian's Chromium, driven by Playwright; no downloaded browser) that logs in,
  finds the DAGs, reads every trigger form section by section, triggers bin_count_retrain from its
  form with manual approval, approves the new model on the Required Actions page (its comparison
  table in a screenshot), sees bin_count_deploy roll it out on the registry's asset event, and rolls
  back to an earlier version from bin_count_deploy's form, opens bin_count_monitor's report from its
  task's link, with screenshots in
  build/test-results/screenshots/;
- a drill that kills the scheduler (its whole process group, task runners included) and the triggerer
  (which holds the deferred wait) while the final training job runs, starts them again, and checks
  that the run completes with no job run twice.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
import requests

from bin_counter import registry
from scripts import local_stack
from scripts.airflow_api import Api, wait_until
from standin.launch import free_port, start_standin
from tests.airflow_side.conftest import (
    API_KEY,
    BASE_CONF,
    CONTAINER_PYTHON,
    ENDPOINT,
    QUICK_DEPLOY,
    upload_dataset,
)
from tests.airflow_side.test_deploy_dag import PUBLISHED_ARCHIVE, register
from tests.conftest import REPO, make_bin_image

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
RETRAIN, DEPLOY, MONITOR = "bin_count_retrain", "bin_count_deploy", "bin_count_monitor"
# The form's section for Params that name none (Airflow UI's flexible form).
DEFAULT_SECTION = "Run Parameters"

pytestmark = pytest.mark.skipif(not CONTAINER_PYTHON.exists(), reason="needs .venv-container (make envs)")


def quick_retrain(epochs: int) -> dict:
    """bin_count_retrain on the live stack's dataset (v-ui, its newest): one trial of `epochs`, then the
    final job; nothing registered from the published model, nothing deployed."""
    return {
        "bucket": "ui-bucket",
        "max_count": 2,
        "epochs_min": epochs,
        "epochs_max": epochs,
        "batch_sizes": [8],
        "max_jobs": 1,
        "max_parallel_jobs": 1,
        "strategy": "Random",
        "initial_model": "none",
        "extra_hyperparameters": QUICK,
        "deploy": False,
    }


def parked(work: Path, run_id: str, task_id: str) -> bool:
    """Whether the scheduler has seen the process that parked `task_id` (AWAITING_INPUT) end. Airflow
    3.3 marks the task FAILED ("task state changed externally") when an answer resumes it before that:
    the late event finds it queued again. A person takes longer than the scheduler's loop; a test under
    load may not."""
    key = f"TaskInstanceKey(dag_id='{RETRAIN}', task_id='{task_id}', run_id='{run_id}', try_number=1"
    log = (work / "scheduler.log").read_text(errors="replace")
    return any("Received executor event with state success" in line and key in line for line in log.splitlines())


@pytest.fixture(scope="module")
def live(moto_endpoint, tmp_path_factory):
    """The whole system on loopback, with a dataset in S3 and the UI asking for a login."""
    yield from live_stack(moto_endpoint, tmp_path_factory)


def live_stack(moto_endpoint, tmp_path_factory, **settings: str):
    """The `live` fixture's stack, with Airflow `settings` of a test's own (AIRFLOW__...=value)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "local")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "local")
        yield from _live(moto_endpoint, tmp_path_factory, settings)


def _live(moto_endpoint, tmp_path_factory, settings: dict[str, str]):
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
    env.update(settings)
    local_stack.airflow(["db", "migrate"], env, work / "migrate.log")
    airflow = local_stack.LiveAirflow(env, work, port).start()
    try:
        api = Api(airflow.url, USER, PASSWORD)
        wait_until(
            lambda: {"bin_count_data_prep", RETRAIN, DEPLOY} <= {d["dag_id"] for d in api.get("/dags")["dags"]},
            120,
            "the DAG processor to parse the DAGs",
        )
        yield {"airflow": airflow, "api": api, "standin": standin, "moto": moto_endpoint, "work": work}
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


def section_of(spec: dict) -> str:
    return spec["schema"].get("section") or DEFAULT_SECTION


def sections(params: dict) -> list[str]:
    """The form's sections, in the order the DAG declares its Params: the order the form reads in."""
    return list(dict.fromkeys(section_of(spec) for spec in params.values()))


def section_titles(dialog) -> list[str]:
    """The Params' sections as the form shows them, top to bottom (the conf JSON's own one left out)."""
    triggers = dialog.get_by_test_id("config-form").locator("[data-scope=accordion][data-part=item-trigger]")
    return [t.strip() for t in triggers.all_inner_texts() if t.strip() != "Advanced Options"]


def open_section(dialog, title: str):
    """Open one section of the form (an accordion: opening one closes the one open); the section."""
    trigger = dialog.locator(
        "[data-scope=accordion][data-part=item-trigger]", has_text=re.compile(rf"^{re.escape(title)}$")
    )
    if trigger.get_attribute("aria-expanded") != "true":
        trigger.click()
    section = dialog.locator("[data-scope=accordion][data-part=item]").filter(
        has=dialog.page.locator("[data-part=item-trigger]", has_text=re.compile(rf"^{re.escape(title)}$"))
    )
    section.locator("[data-part=item-content]").wait_for()  # visible: opened
    # The one that closes slides shut first: a screenshot before then shows both half-drawn.
    for closing in dialog.locator("[data-scope=accordion][data-part=item-content][data-state=closed]").all():
        closing.wait_for(state="hidden")
    return section


def fill_form(dialog, params: dict, values: dict) -> None:
    """Type `values` into the trigger form section by section, as an operator does: text and numbers
    typed, JSON into its editor, a choice from its list."""
    for title in sections(params):
        wanted = {name: v for name, v in values.items() if section_of(params[name]) == title}
        if not wanted:
            continue
        section = open_section(dialog, title)
        for name, value in wanted.items():
            if isinstance(value, (list, dict)):
                set_json(section, name, value)
            elif params[name]["schema"].get("enum"):
                field(section, name).get_by_role("combobox").click()
                dialog.page.get_by_role("option", name=str(value), exact=True).click()
            else:
                field(section, name).locator("input").first.fill(str(value))


def refused(dialog) -> list[str]:
    """The fields the form marks invalid (any section)."""
    return [el.inner_text() for el in dialog.locator("div.chakra-field__root[data-invalid]").all()]


@pytest.mark.parametrize("dag_id", ["bin_count_data_prep", RETRAIN, "bin_count_batch", DEPLOY, MONITOR])
def test_each_dags_trigger_form_accepts_its_defaults(live, page, dag_id):
    """The form reads in the sections the DAG declares, in their order; every Param renders in its
    section as a field with its description; and the defaults pass the form's own validation: an
    operator can trigger a run without fixing anything first."""
    from playwright.sync_api import expect

    url = live["airflow"].url
    log_in(page, url)
    dialog = open_trigger_form(page, url, dag_id)
    params = live["api"].get(f"/dags/{dag_id}/details")["params"]
    assert section_titles(dialog) == sections(params)
    shot(page, f"form-{dag_id}")
    for n, title in enumerate(sections(params), 1):
        section = open_section(dialog, title)
        for name, spec in params.items():
            if section_of(spec) == title:
                expect(field(section, name)).to_be_visible()
                text = field(section, name).inner_text()
                assert spec["description"] in text, f"{name}: {text!r}"
        shot(page, f"form-{dag_id}-{n}")
    assert not refused(dialog), f"the form refuses its own defaults: {refused(dialog)}"
    assert dialog.get_by_role("button", name="Trigger", exact=True).is_enabled()


def count_through_api(live) -> dict:
    """A photo counted as a client counts it: POST /count on the stand-in's API gateway."""
    answer = requests.post(
        f"{live['standin']}/count",
        data=make_bin_image(2, 7),
        headers={"x-api-key": API_KEY, "Content-Type": "image/jpeg"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for_task(api, dag_id: str, run_id: str, task_id: str, state: str, timeout: float = 900) -> None:
    """Until the run's task is in `state`; the run ending first fails at once, with what failed."""

    def reached() -> bool:
        run = api.get(f"/dags/{dag_id}/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            raise AssertionError(f"{dag_id} {run_id} ended {run['state']}:\n{api.failures(dag_id, run_id)}")
        return api.tasks(dag_id, run_id).get(task_id, {}).get("state") == state

    wait_until(reached, timeout, f"{dag_id}.{task_id} to be {state}")


def succeeded(api, dag_id: str, run_id: str) -> dict[str, dict]:
    """The run, waited for, succeeded; its task instances."""
    finished = api.wait_for_run(dag_id, run_id)
    tasks = api.tasks(dag_id, run_id)
    assert finished["state"] == "success", (
        f"{ {t: ti['state'] for t, ti in tasks.items()} }\n{api.failures(dag_id, run_id)}"
    )
    return tasks


@pytest.mark.skipif(not PUBLISHED_ARCHIVE.is_file(), reason="needs models/bin-counter.tar.gz")
def test_an_operator_retrains_approves_in_the_ui_and_rolls_back_from_the_deploy_form(live, page):
    """The operator's whole loop in the browser: a retrain triggered from its form with manual
    approval; the comparison read and approved on the Required Actions page; bin_count_deploy rolling
    the version out on the registry's asset event; then a rollback to an earlier version from
    bin_count_deploy's form, naming the version and the reason."""
    from playwright.sync_api import expect

    url, api = live["airflow"].url, live["api"]
    sm = boto3.client("sagemaker", endpoint_url=live["standin"], region_name="us-east-1")
    s3 = boto3.client("s3", endpoint_url=live["moto"], region_name="us-east-1")
    # An earlier Approved version to roll back to (the published model, repacked under its own model
    # version, registered as test_deploy_dag's drills register theirs), with the dataset it names.
    earlier = register(sm, s3, "ui-bucket", "ui-earlier")
    upload_dataset(s3, "ui-bucket", "v-test", {"train": 1, "validation": 1, "test": 1})

    log_in(page, url, screenshot="01-login")

    page.goto(f"{url}/dags")
    for dag_id in ("bin_count_data_prep", RETRAIN, DEPLOY):
        page.get_by_role("link", name=dag_id, exact=True).wait_for()
    shot(page, "02-dags")

    # Unpaused first, as docs/infra/README.md tells a user: the trigger form's own unpause (a second
    # write beside the new run's, to SQLite here) can time out on the database lock under load, and
    # then the run waits, queued, for an unpause that never comes. bin_count_deploy, unpaused, runs
    # on the version the retrain announces.
    for dag_id in (RETRAIN, DEPLOY):
        api.patch(f"/dags/{dag_id}", {"is_paused": False})
    page.get_by_role("link", name=RETRAIN, exact=True).click()
    page.wait_for_url(f"{url}/dags/{RETRAIN}")
    dialog = open_trigger_form(page, url, RETRAIN)
    params = api.get(f"/dags/{RETRAIN}/details")["params"]
    changed = {
        "bucket": "ui-bucket",
        "dataset_version": "v-ui",  # not the earlier version's, uploaded after it
        "max_count": 2,
        "epochs_min": 2,
        "epochs_max": 2,
        "batch_sizes": [8],
        "strategy": "Random",
        "max_jobs": 1,
        "max_parallel_jobs": 1,
        "extra_hyperparameters": QUICK,
        "approval": "manual",
        "initial_model": "none",
    }
    fill_form(dialog, params, changed)
    open_section(dialog, "Registration and approval")
    shot(page, "03-trigger-form")
    assert not refused(dialog), f"the form refuses: {refused(dialog)}"
    dialog.get_by_role("button", name="Trigger", exact=True).click()

    wait_until(lambda: api.runs(RETRAIN), 60, "the triggered run")
    run = api.runs(RETRAIN)[0]
    run_id = run["dag_run_id"]
    assert {k: run["conf"][k] for k in changed} == changed, run["conf"]
    page.goto(f"{url}/dags/{RETRAIN}/runs/{run_id}")
    shot(page, "04-run-started")

    # The run waits for a person; the Required Actions page lists it, the task's page shows the
    # comparison and the buttons.
    wait_for_task(api, RETRAIN, run_id, "review", "awaiting_input")
    page.goto(f"{url}/required_actions")
    subject = page.get_by_text(re.compile(r"^Deploy model package version \d+ \(")).first
    subject.wait_for()
    shot(page, "05-required-actions")
    subject.click()
    expect(page).to_have_url(re.compile(r".*/tasks/review/required_actions$"))
    table = page.locator("table").filter(has_text="serving now").first
    table.wait_for()
    assert "accuracy" in table.inner_text() and "candidate" in table.inner_text()
    page.get_by_text("The gate says:").wait_for()
    shot(page, "06-review-comparison")
    wait_until(lambda: parked(live["work"], run_id, "review"), 120, "the scheduler to see the review parked")
    page.get_by_test_id("hitl-option-Approve").click()

    tasks = succeeded(api, RETRAIN, run_id)
    assert tasks["auto_approve"]["state"] == "skipped" and tasks["announce"]["state"] == "success"
    ran = {t: ti for t, ti in tasks.items() if ti["state"] != "skipped"}
    assert all(ti["try_number"] == 1 for ti in ran.values()), {t: ti["try_number"] for t, ti in ran.items()}
    answer = api.get(f"/dags/{RETRAIN}/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails")
    assert answer["chosen_options"] == ["Approve"] and answer["responded_by_user"]["name"] == USER, answer
    versions = sm.list_model_packages(
        ModelPackageGroupName=registry.group_name(ENDPOINT), SortBy="CreationTime", SortOrder="Descending"
    )["ModelPackageSummaryList"]
    new = sm.describe_model_package(ModelPackageName=versions[0]["ModelPackageArn"])
    assert new["ModelPackageVersion"] == earlier["version"] + 1
    assert new["ModelApprovalStatus"] == "Approved", new
    assert USER in new.get("ApprovalDescription", ""), new.get("ApprovalDescription")
    new_model = new["CustomerMetadataProperties"]["model-version"]

    # What the operator sees: the run's state, then the training job's metrics in the retrain task's log.
    page.goto(f"{url}/dags/{RETRAIN}/runs/{run_id}")
    page.get_by_text("Success", exact=True).first.wait_for()
    shot(page, "07-run-succeeded")
    page.goto(f"{url}/dags/{RETRAIN}/runs/{run_id}/tasks/retrain")
    # (The final job trains on train + validation, so its epochs report only the training loss.)
    page.get_by_text(re.compile(r"epoch=2 train_loss=[\d.]+")).first.wait_for(timeout=60_000)
    page.get_by_text(re.compile(r"test_accuracy=[\d.]+")).first.wait_for()
    shot(page, "08-retrain-log")

    # The approved version's asset event runs bin_count_deploy with its Params' defaults: it creates
    # the endpoint (nothing serves yet, so no bake), and the API answers with the new model.
    wait_until(lambda: api.runs(DEPLOY), 120, "bin_count_deploy to run on the asset event")
    deployed = api.runs(DEPLOY)[0]
    assert deployed["run_type"] == "asset_triggered", deployed
    [event] = api.get(f"/dags/{DEPLOY}/dagRuns/{deployed['dag_run_id']}/upstreamAssetEvents")["asset_events"]
    assert (event["source_run_id"], event["extra"]["version"]) == (run_id, new["ModelPackageVersion"]), event
    succeeded(api, DEPLOY, deployed["dag_run_id"])
    assert count_through_api(live)["model_version"] == new_model
    page.goto(f"{url}/dags/{DEPLOY}/runs/{deployed['dag_run_id']}")
    page.get_by_text("Success", exact=True).first.wait_for()
    shot(page, "09-deploy-on-asset-event")

    # On-call rolls back from bin_count_deploy's form: which version, why, and (this machine) a quick
    # rollout: one instance, one worker, a bake of seconds, the old fleet retired at once.
    dialog = open_trigger_form(page, url, DEPLOY)
    params = api.get(f"/dags/{DEPLOY}/details")["params"]
    quick = {k: v for k, v in QUICK_DEPLOY.items() if v != params[k]["value"]}
    rollback = {"model_package": str(earlier["version"]), "reason": "roll back: drill", "bucket": "ui-bucket", **quick}
    fill_form(dialog, params, rollback)
    open_section(dialog, sections(params)[0])
    shot(page, "10-rollback-form")
    assert not refused(dialog), f"the form refuses: {refused(dialog)}"
    dialog.get_by_role("button", name="Trigger", exact=True).click()
    wait_until(lambda: api.runs(DEPLOY)[0]["run_type"] == "manual", 60, "the rollback run")
    run = api.runs(DEPLOY)[0]
    assert {k: run["conf"][k] for k in rollback} == rollback, run["conf"]
    succeeded(api, DEPLOY, run["dag_run_id"])
    assert count_through_api(live)["model_version"] == earlier["model_version"]
    page.goto(f"{url}/dags/{DEPLOY}/runs/{run['dag_run_id']}")
    page.get_by_text("Success", exact=True).first.wait_for()
    shot(page, "11-rolled-back")

    # The monitor's report, opened from its task's "Monitor report" link (a presigned S3 URL) over the
    # last hour of this test's requests. Unpaused first, as above; being hourly, it then starts a
    # scheduled run of its own on the stack's bucket (the Variable's), made here as the stack makes it,
    # so that run ends at once instead of holding the DAG's one active run through its retries.
    s3.create_bucket(Bucket=json.loads(local_stack.STACK.outputs["SageMakerVariable"])["bucket"])
    api.patch(f"/dags/{MONITOR}", {"is_paused": False})
    now = datetime.now(UTC)
    window = {
        "window_start": (now - timedelta(hours=1)).isoformat(),
        "window_end": now.isoformat(),
        "bucket": "ui-bucket",  # where the rollback's endpoint configuration captures to
    }
    monitor_run = api.trigger(MONITOR, window)
    succeeded(api, MONITOR, monitor_run)
    links = api.get(f"/dags/{MONITOR}/dagRuns/{monitor_run}/taskInstances/report/links")["extra_links"]
    assert links["Monitor report"].startswith(live["moto"]), links
    # The task's extra links are on its Details tab.
    page.goto(f"{url}/dags/{MONITOR}/runs/{monitor_run}/tasks/report/details")
    link = page.get_by_role("link", name="Monitor report")
    link.wait_for(timeout=60_000)
    shot(page, "12-monitor-task")
    page.goto(link.get_attribute("href"))
    page.get_by_text("live accuracy").first.wait_for()
    shot(page, "13-monitor-report")


def test_a_scheduler_killed_during_training_comes_back_and_no_job_runs_twice(live):
    api, airflow = live["api"], live["airflow"]
    sm = boto3.client("sagemaker", endpoint_url=live["standin"], region_name="us-east-1")
    conf = quick_retrain(epochs=3)  # the drill is about the training task's retry
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
    # SIGKILL to each process group: the scheduler's task runners die with it. With deferral on (the
    # live stack's airflow_env) the retrain task has usually deferred by now, so no task runner holds
    # the wait: the triggerer that does is killed too, and then nothing that was waiting on the job
    # lives on but the metadata database. The restarted triggerer takes the wait over (one the dead
    # triggerer had taken once that one is past its health threshold, 30 s).
    for component in ("scheduler", "triggerer"):
        airflow.kill(component)
    time.sleep(5)
    for component in ("scheduler", "triggerer"):
        airflow.restart(component)

    finished = api.wait_for_run("bin_count_retrain", run_id)
    tasks = api.tasks("bin_count_retrain", run_id)
    assert finished["state"] == "success", {t: ti["state"] for t, ti in tasks.items()}
    after = {j["TrainingJobName"]: j["CreationTime"] for j in sm.list_training_jobs()["TrainingJobSummaries"]}
    # The task went on with the job already running: the same jobs, each created once, before the kill.
    assert {name: after[name] for name in before} == before
    run_jobs = [name for name in after if name not in before]
    assert run_jobs == [], f"jobs started after the kill: {run_jobs}"
    retrain = tasks["retrain"]
    log = "\n".join(api.task_log("bin_count_retrain", run_id, retrain))
    if retrain["try_number"] >= 2:
        # The kill took down a try that held the wait itself (not yet deferred): its retry attached.
        assert "was started by an earlier try and is" in log and "attaching to it" in log, log
    else:
        # The kill interrupted no try: its deferred wait outlived both components, and resumed.
        assert "on the triggerer" in log and "The last" in log, log
