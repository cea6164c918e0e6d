"""The MLflow UI as the study's dashboard: generated descriptions, names, one metric vocabulary, datasets,
logged models, tables, images and the HTML report in the store; a real browser on `flowers ui`."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port
from flowers import config as C
from flowers.registry import run_notes as N
from flowers.study.plan import build_trials, load_study

SHOTS = Path(os.environ.get("FLOWERS_UI_SHOTS", tempfile.gettempdir())) / "flowers-ui-shots"


def test_descriptions_are_generated_from_the_config_each_run_used():
    """study-cpu trains EfficientNet-Lite0 at lr 1e-3: the descriptions say so (not the seed's ResNet-50 text)."""
    study, d = load_study(REPO / "configs/study.yaml", "study-cpu")
    trials = build_trials(study, d)
    names = [N.run_name(t.key, t.roles, t.axes) for t in trials]
    assert len(set(names)) == len(names) and {"L1 baseline", "L2 regularized", "L3 attention"} <= set(names)
    assert "grid strong/ls_wd/cosine" in names  # the ablation point's settings in full
    by = {t.key: t for t in trials}
    l1 = N.describe_trial(C.to_flat_dict(by["l1"].cfg), by["l1"].roles, by["l1"].axes)
    assert "efficientnet_lite0" in l1 and "lr 0.001" in l1 and "ResNet" not in l1 and "unknown" not in l1
    assert "224 px" in l1 and "8 epochs" in l1 and "Augmentation: light" in l1
    l3 = N.describe_trial(C.to_flat_dict(by["l3"].cfg), by["l3"].roles)
    assert "efficientnet_lite0 + attention pooling" in l3
    grid = next(t for t in trials if t.axes == {"augment": "strong", "regularization": "ls_wd", "schedule": "cosine"})
    text = N.describe_trial(C.to_flat_dict(grid.cfg), grid.roles, grid.axes)
    assert "augment=strong, regularization=ls_wd, schedule=cosine" in text and "2 epochs" in text
    student = C.load_config(REPO / "configs/level5.yaml", "study-cpu")
    text = N.describe_student(C.to_flat_dict(student))
    assert "efficientnet_lite0" in text and "MobileNet" not in text and "temperature 4.0" in text
    assert "models:/flowers-ensemble@champion" in text
    assert not any("description" in C.read_yaml(p) for p in (REPO / "configs").glob("level*.yaml"))


def test_missing_fields_read_unknown():
    text = N.describe_trial({"model.arch": "resnet50", "optim.lr": None}, ["l1"])
    assert "resnet50" in text and "lr unknown" in text and "Pretrained weights: unknown" in text
    assert "AdamW lr unknown" in text and "unknown epochs" in text
    assert "Teacher: unknown" in N.describe_student({})
    assert "Members: unknown" in N.describe_ensemble({})


def test_one_metric_vocabulary_and_int8_named_apart():
    trial = N.mlflow_metrics({"epoch": 3, "val_acc": 0.5, "train_loss": 1.0, "best_val_acc": 0.6, "test_top1": 0.4,
                              "images_per_s": 9.0, "lr": 1e-3})
    assert trial == {"val/acc": 0.5, "train/loss": 1.0, "val/best_acc": 0.6, "test/acc": 0.4,
                     "perf/images_per_s": 9.0, "train/lr": 1e-3}
    ens = N.mlflow_metrics({"val_top1": 0.9, "test_top1": 0.8, "member_l1_test_top1": 0.7, "mean_disagreement": 0.1,
                            "uncertainty_threshold": 0.3}, "ensemble")
    assert ens == {"val/acc": 0.9, "test/acc": 0.8, "members/l1/test_acc": 0.7, "diversity/mean_disagreement": 0.1,
                   "uncertainty/uncertainty_threshold": 0.3}
    st = N.mlflow_metrics({"val_top1": 0.9, "test_top1": 0.85, "int8_test_top1": 0.84, "teacher_test_top1": 0.9,
                           "latency_int8_p50_ms": 3.0}, "student")
    # the deployed model is INT8: `test/acc` compares what each level serves; fp32 and INT8 named apart;
    # val_top1 is already the per-epoch `val/best_acc` series (no second, step-0 point)
    assert st == {"test/acc_fp32": 0.85, "test/acc_int8": 0.84, "test/acc": 0.84, "teacher/test_acc": 0.9,
                  "latency/int8_p50_ms": 3.0}


# ----------------------------------------------------------------------------- the small study's store


def _runs(outcome):
    from mlflow import MlflowClient

    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([outcome.experiment_id], max_results=200)
    return client, {r.data.tags["flowers.key"]: r for r in runs}, runs


@pytest.mark.slow
def test_the_study_store_reads_well_in_the_ui(small_study):
    from flowers.registry.uris import logged_model

    _, outcome = small_study
    client, by_key, runs = _runs(outcome)
    exp = client.get_experiment(outcome.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "report/report.html" in exp.tags["mlflow.note.content"]
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == len(names), names
    assert {by_key[k].info.run_name for k in ("l1", "l3", "l4-ensemble", "l5-distill")} == {
        "L1 baseline", "L3 attention", "L4 ensemble", "L5 student"}
    assert by_key["abl-strong-cosine"].info.run_name == "grid strong/cosine"
    levels = {k: r.data.tags.get("flowers.level") for k, r in by_key.items()}
    assert levels == {"small": "study", "l1": "l1", "l3": "l3", "abl-light-cosine": "grid", "abl-strong-constant": "grid",
                      "abl-strong-cosine": "grid", "l4-ensemble": "l4", "l5-distill": "l5"}
    notes = {k: r.data.tags.get("mlflow.note.content", "") for k, r in by_key.items()}
    assert all(notes.values()) and not any("description" in r.data.params for r in runs)
    assert "mobilenet_v3_small" in notes["l1"] and "lr 0.003" in notes["l1"] and "1 epochs" in notes["l1"]
    assert "Members: l1 (models:/flowers-l1@champion v1), l3" in notes["l4-ensemble"]
    assert "KD weight alpha 0.7" in notes["l5-distill"]
    for key in ("l1", "l3", "abl-strong-cosine", "l4-ensemble", "l5-distill"):
        r = by_key[key]
        assert all("/" in m for m in r.data.metrics), (key, sorted(r.data.metrics))
        assert "test/acc" in r.data.metrics, key
        contexts = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
        assert set(contexts) == {"train", "val", "test"}, key
        assert contexts["test"].name == "flowers-test" and len(contexts["test"].digest) == 33
    for key in ("l1", "l3", "l5-distill"):  # per-epoch series start at epoch 1: no step-0 point
        steps = [m.step for m in client.get_metric_history(by_key[key].info.run_id, "val/best_acc")]
        assert steps and 0 not in steps, (key, steps)
    assert "val/best_acc" not in by_key["l4-ensemble"].data.metrics  # nothing trained there
    st = by_key["l5-distill"].data.metrics
    assert st["test/acc"] == st["test/acc_int8"] and "test/acc_fp32" in st

    mv = client.get_model_version_by_alias("flowers-l1", "champion")
    lm = logged_model(client, mv.run_id)
    assert mv.source == f"models:/{lm.model_id}" and lm.source_run_id == by_key["l1"].info.run_id
    assert json.loads(lm.tags["mlflow.modelVersions"]) == [{"name": "flowers-l1", "version": str(mv.version)}]
    test_digest = {i.tags[0].value: i.dataset.digest for i in by_key["l1"].inputs.dataset_inputs}["test"]
    assert test_digest.endswith(mv.tags["lineage.split_hash"]) and test_digest.startswith(mv.tags["lineage.data_checksum"])
    assert mv.description.startswith("# Model card: flowers-l1") and "## Gate decision" in mv.description
    assert "split hash" in mv.description and "first" in mv.description
    for name in ("flowers-l1", "flowers-ensemble", "flowers-student"):
        assert "champion" in client.get_registered_model(name).description
    arts = {a.path for a in client.list_artifacts(by_key["l1"].info.run_id, "tables")}
    assert {"tables/test_per_class_accuracy.json", "tables/test_most_confused.json"} <= arts
    images = [a.path for a in client.list_artifacts(by_key["l1"].info.run_id, "images")]
    assert any("test~confusion+step+1+" in p for p in images) and any("gradcam~sample" in p for p in images)
    assert any("gradcam~" in a.path for a in client.list_artifacts(by_key["l5-distill"].info.run_id, "images"))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(client.download_artifacts(outcome.parent_run_id, "report/report.html", tmp)).read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "![" not in page


# ----------------------------------------------------------------------------- a real browser


def _ui(home: Path, port: int, log: Path) -> subprocess.Popen:
    """`flowers ui` on the study's embedded store, in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "flowers.cli.main", "ui", "--home", str(home), "--port", str(port),
                             "--study", "small"],
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": ""})


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tempfile.mkdtemp(prefix='flowers-chromium-')}", "--window-size=1600,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def _wait(driver, cond, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if got := cond():
                return got
        except Exception:  # the React app re-renders under our feet
            pass
        time.sleep(0.5)
    _shot(driver, "timeout")
    raise AssertionError(f"timed out waiting for {what}; page text: {driver.find_element('tag name', 'body').text[:1500]}")


def _shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"mlflow-{name}.png"
    driver.save_screenshot(str(path))
    return path


@pytest.mark.slow
def test_browser_lands_on_the_runs_with_descriptions_and_test_accuracy(small_study):
    """`flowers ui` on the small study's store, driven by headless Chromium: the link it prints lands on the
    runs table (not MLflow's GenAI overview) with L1..L5 first; each level's row shows its generated
    description; the test/acc column can be shown; the run page and the student's registry page render."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    study, outcome = small_study
    _, by_key, _ = _runs(outcome)
    home = Path(study.home)
    port = free_port()
    log = SHOTS.parent / f"flowers-ui-{port}.log"
    SHOTS.mkdir(parents=True, exist_ok=True)
    proc = _ui(home, port, log)
    driver = None
    try:
        url = _wait_for_line(proc, log, "runs table with L1..L5 first: ")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
        driver = _browser()
        driver.get(url)
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        _wait(driver, lambda: "L1 baseline" in body() and "Run Name" in body(), "the runs table")
        text = body()
        assert "Token Usage" not in text and "Sort: Run Name" in text  # the runs table, not the GenAI overview
        order = [n for n in ("L1 baseline", "L3 attention", "L4 ensemble", "L5 student", "grid light/cosine")]
        assert [text.index(n) for n in order] == sorted(text.index(n) for n in order)  # levels first, in order
        for b in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):  # the assistant panel
            b.click()
        driver.set_window_size(2200, 1000)  # room for the columns below (the grid renders visible ones only)
        driver.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
        for label in ("test/acc", "Description"):
            _wait(driver, lambda: driver.find_elements(By.XPATH, f"//span[normalize-space(text())='{label}']"),
                  f"the column choice {label}")[-1].click()
            time.sleep(0.5)
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        headers = lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[role='columnheader']")]  # noqa: E731
        _wait(driver, lambda: {"test/acc", "Description"} <= set(headers()), "the test/acc and Description columns")
        text = body()
        for key in ("l1", "l3", "l4-ensemble", "l5-distill"):  # each level's row shows its description's first line
            first = by_key[key].data.tags["mlflow.note.content"].splitlines()[0]
            assert first[:40] in text, (key, first)
        _shot(driver, "runs")

        # a level run's page: its description and charts
        l1 = by_key["l1"].info.run_id
        driver.get(f"http://127.0.0.1:{port}/#/experiments/{outcome.experiment_id}/runs/{l1}?workflowType=machine_learning")
        _wait(driver, lambda: "This level: the transfer baseline" in body(), "L1's description on its run page")
        _shot(driver, "run-l1")
        # the student's registry page: the family's description and its champion
        driver.get(f"http://127.0.0.1:{port}/#/models/flowers-student?workflowType=machine_learning")
        _wait(driver, lambda: "L5 distilled student" in body() and "champion" in body(), "the student's registry page")
        _shot(driver, "registry-student")
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_for_line(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 120) -> str:
    """What follows `marker` on the line `flowers ui` prints about the study."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in log.read_text().splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"flowers ui printed no study link: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_a_resumed_study_duplicates_no_runs_inputs_or_versions(small_study):
    """Running the finished small study again with --resume adds no run, dataset input, logged model or version."""
    import mlflow

    from jobs.study import run_study

    study, outcome = small_study
    client, _, _ = _runs(outcome)

    def census():
        runs = client.search_runs([outcome.experiment_id], max_results=200)
        models = client.search_logged_models(experiment_ids=[outcome.experiment_id], max_results=500)
        versions = {n: len(client.search_model_versions(f"name='{n}'"))
                    for n in ("flowers-l1", "flowers-l3", "flowers-ensemble", "flowers-student")}
        return (sorted(r.info.run_name for r in runs), sum(len(r.inputs.dataset_inputs) for r in runs),
                len(models), versions)

    before = census()
    old_env, old_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    try:
        # the same store as the first run, named: not whatever an earlier fixture left in the environment
        again = run_study(dataclasses.replace(study, tracking_uri=outcome.tracking_uri), Path(study.home).parent,
                          resume=True)
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
    assert again.parent_run_id == outcome.parent_run_id and again.failed_trials == []
    assert census() == before
