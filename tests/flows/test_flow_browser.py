"""Browser: Debian's Chromium, driven by Playwright, does what a newcomer does in the UIs.

It starts the local services (`ssr services start`: Prefect server, process worker, MLflow
UI), triggers a custom run of ssr/reproduce-fewshot-tiny from the Prefect UI with one
parameter changed in the form, waits for the run page to say Completed, and finds the
registered model (alias `champion`) and the run's plots in the MLflow UI. Screenshots go to
test-artifacts/browser/ (docs/ui-tour.md uses a few of them). It waits on what the pages show
(Playwright's waits; two 1 s pauses let dialogs and a table settle: the UIs poll, so never go
network-idle). While the run trains it reads the run's state from the API and parks the page;
the worker polls its pool every 2 s (PREFECT_WORKER_QUERY_SECONDS) instead of 10.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("SSR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ROOT / "test-artifacts" / "browser"
DEPLOYMENT = "reproduce-fewshot-tiny"
RUN_TIMEOUT_S = 600
UI_TIMEOUT_MS = 90_000  # single-page apps on a busy 2-core machine
POLL_MS = 2_000  # one wait for a page change; the interval between two reads of a run's state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.services,
    pytest.mark.browser,
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="the playwright package is not installed"
    ),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"Chromium not found at {CHROMIUM}: install Debian's `chromium` "
        "package (scripts/test.sh does it with apt-get when it can)",
    ),
]


def flow_run_facts(env: dict, flow_run_id: str) -> dict:
    """State, parameters, subflow runs and artifact keys of a flow run, read with the Prefect client."""
    code = (
        "import json, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,\n"
        "                                           FlowRunFilterParentFlowRunId)\n"
        "with get_client(sync_client=True) as c:\n"
        "    run = c.read_flow_run(sys.argv[1])\n"
        "    subs = c.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))\n"
        "    ids = {str(run.id)} | {str(s.id) for s in subs}\n"
        "    keys = sorted({a.key for a in c.read_artifacts() if a.key and str(a.flow_run_id) in ids})\n"
        "    n_runs = len(c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[run.deployment_id]))))\n"
        "    print(json.dumps({'state': run.state.type.value, 'state_name': run.state.name, 'parameters': run.parameters,\n"
        "                      'subflow_ids': sorted(str(s.id) for s in subs), 'artifact_keys': keys,\n"
        "                      'deployment_runs': n_runs}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, flow_run_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def chromium_page():
    """A page of Debian's Chromium (headless), driven by Playwright; no browser is downloaded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield page
        finally:
            browser.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def flow_run_state(api_url: str, flow_run_id: str) -> str:
    """The state type of a flow run (a plain REST read: cheaper than a client per poll)."""
    with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=30) as resp:
        return json.load(resp)["state"]["type"]


def wait_completed_in_ui(page, env: dict, flow_run_id: str) -> None:
    """Waits for the run to end, then for its page to show Completed; fails early when the run
    ends otherwise. While the run trains the page is parked on about:blank: a live run page
    keeps headless Chromium's software renderer busy (about half a core, measured with ps),
    which the flow run needs on 2 cores. The API state is read every POLL_MS."""
    run_url = page.url
    page.goto("about:blank")
    deadline = time.time() + RUN_TIMEOUT_S
    state = None
    while time.time() < deadline:
        state = flow_run_state(env["PREFECT_API_URL"], flow_run_id)
        if state in ("FAILED", "CRASHED", "CANCELLED"):
            log = Path(env["SSR_HOME"]) / "services" / "prefect-worker.log"
            pytest.fail(f"flow run {flow_run_id} ended {state}; worker log: {log.read_text()[-3000:]}")
        if state == "COMPLETED":
            page.goto(run_url)
            page.get_by_text("Completed", exact=True).first.wait_for()
            return
        time.sleep(POLL_MS / 1000)
    pytest.fail(f"flow run {flow_run_id} not Completed within {RUN_TIMEOUT_S} s (API state: {state})")


def flow_run_count(api_url: str) -> int:
    """How many flow runs the server holds (a plain REST read)."""
    req = urllib.request.Request(
        f"{api_url}/flow_runs/count", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return int(json.load(resp))


def trigger_custom_run(page, prefect_ui: str, api_url: str) -> str:
    """Deployments page -> ssr / reproduce-fewshot-tiny -> Run -> Custom run, n_test_episodes 20 -> 10."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(f"{prefect_ui}/deployments")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=DEPLOYMENT, exact=True))
    page.get_by_role("link", name=DEPLOYMENT, exact=True).wait_for()
    assert "ssr" in row.inner_text().split(), row.inner_text()  # the flow name under the deployment name
    deadline = time.time() + 180  # "Not Ready" until the worker has polled the pool once
    while True:
        try:
            row.get_by_text("Ready", exact=True).wait_for(timeout=5 * POLL_MS)
            break
        except PlaywrightTimeout:
            assert time.time() < deadline, f"deployment not Ready (no worker polling?): {row.inner_text()}"
            page.reload()
            row.wait_for()
    shot(page, "01-prefect-deployments")

    page.get_by_role("link", name=DEPLOYMENT, exact=True).click()
    page.wait_for_url("**/deployments/deployment/**")
    page.get_by_role("button", name="Run", exact=True).click()
    shot(page, "02-prefect-run-menu")
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url("**/run**")

    # The `fewshot` group is a pydantic model, rendered as a nested form; each number field
    # follows its label (the labels are not tied to the inputs, so get_by_label cannot be used).
    n_test = page.get_by_text("N Test Episodes (Optional)", exact=True).locator("xpath=following::input[1]")
    n_test.wait_for()
    assert n_test.input_value() == "20", "the form should start from the deployment's parameters"
    page.get_by_text("fewshot (Optional)", exact=True).scroll_into_view_if_needed()
    shot(page, "03-prefect-custom-run-form")
    n_test.fill("10")
    n_test.press("Tab")
    n_test.scroll_into_view_if_needed()
    shot(page, "04-prefect-custom-run-edited")

    # The toast "<name> scheduled to start now". Prefect 3.9 stacks two identical toasts for
    # the one run; the last one is on top (the other is covered and does not take clicks).
    view_run = page.get_by_role("button", name="View run").last
    for attempt in range(2):
        page.get_by_role("button", name="Submit", exact=True).click()
        try:
            view_run.wait_for(timeout=30_000)
            break
        except PlaywrightTimeout:
            # once on CI the form took the click and created no run (no toast, no flow run on the
            # server): the click is repeated once, never when a run exists (one run is asserted later)
            runs = flow_run_count(api_url)
            assert attempt == 0 and runs == 0, f"no 'View run' toast after Submit ({runs} flow runs on the server)"
            shot(page, "04b-prefect-submit-again")
    view_run.click()
    page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]{36}.*"))
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)


def check_results_artifact(page, subflow_id: str) -> None:
    """Run page -> Subflow Runs -> the ssr-fewshot run -> Artifacts: the results table."""
    page.get_by_role("tablist").get_by_text("Subflow Runs", exact=True).click()
    page.locator(f"a[href$='/runs/flow-run/{subflow_id}']").first.click()  # the run's name
    page.wait_for_url(f"**/runs/flow-run/{subflow_id}**")
    page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
    page.get_by_text("fewshot-results").first.wait_for()
    shot(page, "06-prefect-subflow-artifacts")
    page.get_by_text("fewshot-results").first.click()
    page.get_by_text("SSR").first.wait_for()
    time.sleep(1)  # the whole table drawn before the screenshot (the page polls: never network-idle)
    shot(page, "07-prefect-results-table")


def dismiss_mlflow_popups(page) -> None:
    """The MLflow 3.17 UI opens a 'new model registry' dialog and an assistant panel."""
    page.keyboard.press("Escape")
    close = page.get_by_role("button", name="Close")
    for i in range(close.count()):
        if close.nth(i).is_visible():
            close.nth(i).click()


def check_mlflow(page, mlflow_ui: str, flow_run_ids: list[str]) -> None:
    """Models page -> ssr-fewshot-tiny shows `champion`; experiment ssr-fewshot -> latest run -> plots."""
    page.goto(f"{mlflow_ui}/#/models")
    page.get_by_role("link", name="ssr-fewshot-tiny", exact=True).wait_for()
    time.sleep(1)  # the dialogs open a moment after the list (the UI polls: never network-idle)
    dismiss_mlflow_popups(page)
    shot(page, "08-mlflow-registered-models")
    page.get_by_role("link", name="ssr-fewshot-tiny", exact=True).click()
    page.wait_for_url("**/models/ssr-fewshot-tiny")
    champion = page.get_by_text(re.compile(r"^@\s*champion$"))
    champion.first.wait_for()
    dismiss_mlflow_popups(page)
    shot(page, "09-mlflow-model-champion")

    page.goto(f"{mlflow_ui}/#/experiments")
    training = page.get_by_role("button", name="Model training")  # the UI opens in GenAI mode
    if training.count():
        training.first.click()
    page.get_by_role("link", name="ssr-fewshot", exact=True).click()
    runs = page.get_by_role("link", name="fewshot-glyphs-conv4-64")
    runs.first.wait_for()
    dismiss_mlflow_popups(page)
    page.get_by_text("Sort: Created").wait_for()  # newest first
    shot(page, "10-mlflow-experiment-runs")
    runs.first.click()  # the latest parent run
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f]{32}.*"))
    page.get_by_text("prefect_flow_run_id").first.wait_for()
    body = page.inner_text("body")
    assert any(i in body for i in flow_run_ids), f"the latest MLflow run is not tagged with any of {flow_run_ids}"
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("plots", exact=True).click()
    page.get_by_text("training_curves.png", exact=True).wait_for()
    page.get_by_text("accuracy_by_step.png", exact=True).click()
    preview = page.get_by_role("img", name="plots/accuracy_by_step.png")  # the preview pane
    preview.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview.element_handle())
    shot(page, "11-mlflow-run-plots")


def test_custom_run_from_the_prefect_ui_then_mlflow_ui(services_env, chromium_page):
    page = chromium_page
    home, env = services_env
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # the worker takes the run within 2 s
    ssr_bin = str(Path(sys.executable).parent / "ssr")
    try:
        t0 = time.time()
        started = subprocess.run([ssr_bin, "services", "start"], env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-3000:]
        addrs = dict(line.split(": ", 1) for line in started.stdout.strip().splitlines())
        env["PREFECT_API_URL"] = addrs["prefect_api"]
        print(f"\nservices started in {time.time() - t0:.0f} s: {addrs}")

        t0 = time.time()
        flow_run_id = trigger_custom_run(page, addrs["prefect_ui"], addrs["prefect_api"])
        print(f"custom run {flow_run_id} submitted from the UI in {time.time() - t0:.0f} s")
        t0 = time.time()
        wait_completed_in_ui(page, env, flow_run_id)
        shot(page, "05-prefect-flow-run-completed")
        print(f"flow run Completed in the UI after {time.time() - t0:.0f} s")

        facts = flow_run_facts(env, flow_run_id)
        assert facts["state"] == "COMPLETED", facts
        assert facts["parameters"]["fewshot"]["evaluation"]["n_test_episodes"] == 10, facts["parameters"]
        assert facts["parameters"]["fewshot"]["model_name"] == "ssr-fewshot-tiny", facts["parameters"]
        assert {"fewshot-results", "fewshot-report"} <= set(facts["artifact_keys"]), facts
        assert facts["deployment_runs"] == 1, f"the form should have started exactly one run: {facts}"
        check_results_artifact(page, facts["subflow_ids"][0])

        t0 = time.time()
        check_mlflow(page, addrs["mlflow_ui"], [flow_run_id, *facts["subflow_ids"]])
        print(f"MLflow UI checked in {time.time() - t0:.0f} s; screenshots in {SHOTS}")
    finally:
        subprocess.run([ssr_bin, "services", "stop"], env=env, capture_output=True, timeout=120)
