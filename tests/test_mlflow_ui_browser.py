"""The MLflow UI as a person uses it: `make mlflow-ui` on the demo's store, opened in Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them when missing). The
screenshots are kept in build/test-artifacts/mlflow-ui/."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from train_harness import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "build" / "test-artifacts" / "mlflow-ui"


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium is not installed: `sudo apt-get install chromium chromium-driver` "
                    "(.ci/run installs them when missing)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # headless, and nothing that reaches outside this machine (its connections would be refused)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1800,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _serve(db: str, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`make mlflow-ui` on ``db``; returns the process and the training-runs address it printed."""
    out = open(log, "w+")
    proc = subprocess.Popen(["make", "-s", "mlflow-ui", f"MLFLOW_DB={db}", f"MLFLOW_PORT={port}"], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log.read_text()
        found = re.search(r"training runs of aov-demo: (\S+)", text)
        if found:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return proc, found.group(1)
            except OSError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"make mlflow-ui exited with {proc.returncode}:\n{text}")
        time.sleep(0.3)
    raise AssertionError(f"make mlflow-ui did not serve within 180 s:\n{log.read_text()}")


def _wait_text(browser, needles: list[str], shot: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = browser.find_element("tag name", "body").text
        if all(n in text for n in needles):
            break
        time.sleep(0.5)
    browser.save_screenshot(str(SHOTS / shot))
    missing = [n for n in needles if n not in text]
    assert not missing, f"not on the page (screenshot {SHOTS / shot}): {missing}\n{text[:3000]}"
    return text


def test_make_mlflow_ui_opens_on_both_stages_with_their_dataset_and_the_metrics(reduced_demo, tmp_path):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.run_info import training_runs_url

    browser = _browser()
    SHOTS.mkdir(parents=True, exist_ok=True)
    summary = reduced_demo.summary
    db = summary.tracking_uri[len("sqlite:///"):]
    client = MlflowClient(summary.tracking_uri)
    runs = {s: client.get_run(r) for s, r in (("stage1", summary.stage1.run_id), ("stage2", summary.stage2.run_id))}
    port = free_port()
    proc, url = _serve(db, port, tmp_path / "mlflow-ui.log")
    try:
        exp_id = runs["stage1"].info.experiment_id
        assert url == training_runs_url(f"http://127.0.0.1:{port}", exp_id)
        browser.get(url)
        digest = runs["stage1"].inputs.dataset_inputs[0].dataset.digest
        text = _wait_text(browser, [runs["stage1"].info.run_name, runs["stage2"].info.run_name,
                                    f"synthetic ({digest})", "Dataset"], "runs_table.png")
        # the training view: MLflow did not switch to its GenAI overview (it rewrites the address then)
        assert "workflowType=machine_learning" in browser.current_url and "/runs" in browser.current_url
        assert text.count(f"synthetic ({digest})") >= 2  # both stages read the same data

        run = runs["stage2"]
        browser.get(f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{run.info.run_id}/model-metrics"
                    f"?workflowType=machine_learning")
        _wait_text(browser, ["Model metrics", "eval/detection/class_mean", "accuracy"], "run_eval_metrics.png")
        search = browser.find_element("css selector", "input[placeholder='Search metric charts']")
        search.send_keys("loss")  # as a person finds one chart among many
        _wait_text(browser, ["loss", "Step"], "run_loss.png")

        ids = ",".join(f'"{r.info.run_id}"' for r in runs.values())
        browser.get(f"http://127.0.0.1:{port}/#/compare-runs?runs=[{ids}]&experiments=[\"{exp_id}\"]"
                    f"&workflowType=machine_learning")
        _wait_text(browser, [runs["stage1"].info.run_name, runs["stage2"].info.run_name, "stage.name"],
                   "compare_runs.png")
    finally:
        browser.quit()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
