"""The study: grid config, concurrent trials logged to MLflow, registry, resume after killing the driver."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_small_study
from flowers import config as C
from flowers.registry.uris import logged_model
from flowers.study.plan import build_trials, load_study


def test_study_grid_shares_l1_and_l2_and_keeps_the_comparison_controlled():
    """Without a grid budget, L1 and L2 are grid points and train once: 8 grid points + L3."""
    study, d = load_study(REPO / "configs/study.yaml", "cpu")
    trials = build_trials(study, d)
    keys = [t.key for t in trials]
    assert len(trials) == 9 and len(set(keys)) == 9  # 8 grid points + L3; L1 and L2 train once
    by_key = {t.key: t for t in trials}
    assert by_key["l1"].roles == ["l1", "ablation"]
    assert by_key["l1"].axes == {"augment": "light", "regularization": "none", "schedule": "constant"}
    assert by_key["l2"].axes == {"augment": "strong", "regularization": "ls_wd", "schedule": "cosine"}
    grid = [t for t in trials if "ablation" in t.roles]
    assert len(grid) == 8
    assert {tuple(sorted(t.axes.items())) for t in grid}.__len__() == 8
    # same split, seed, epochs and backbone everywhere: only the axes differ
    for field in ("data.split", "data.seed", "train.seed", "train.epochs", "model.arch", "data.image_size"):
        assert len({C.to_flat_dict(t.cfg)[field] for t in trials}) == 1, field
    assert {t.cfg.model.attention for t in trials} == {False, True}


def test_study_cpu_grid_runs_at_its_own_smaller_budget():
    """study-cpu's `grid:` section gives the 8 grid points 2 epochs and the levels 8: 3 levels + 8 grid
    points, every grid point at the same budget, split and seed; the levels are not grid points."""
    study, d = load_study(REPO / "configs/study.yaml", "study-cpu")
    trials = build_trials(study, d)
    by_key = {t.key: t for t in trials}
    assert len(trials) == 11 and {"l1", "l2", "l3"} <= set(by_key)
    assert by_key["l1"].roles == ["l1"] and by_key["l2"].roles == ["l2"]
    grid = [t for t in trials if "ablation" in t.roles]
    assert len(grid) == 8 and all(t.roles == ["ablation"] for t in grid)
    assert {t.cfg.train.epochs for t in grid} == {2}
    assert {by_key[k].cfg.train.epochs for k in ("l1", "l2", "l3")} == {8}
    for field in ("data.split", "data.seed", "train.seed", "model.arch", "data.image_size", "data.feature_cache",
                  "model.trainable_units", "data.cache_views"):
        assert len({C.to_flat_dict(t.cfg)[field] for t in trials}) == 1, field
    # the grid point with L1's axes differs from L1 only by the budget
    twin = next(t for t in grid if t.axes == {"augment": "light", "regularization": "none", "schedule": "constant"})
    diff = {k for k, v in C.to_flat_dict(twin.cfg).items() if C.to_flat_dict(by_key["l1"].cfg)[k] != v}
    assert diff == {"train.epochs", "level"}
    # a profile's grid section never reaches a plain trial config
    assert C.load_config(REPO / "configs/level1.yaml", "study-cpu").train.epochs == 8


def test_study_cpu_robust_is_study_cpu_plus_shift_views_and_one_more_unit():
    """study-cpu-robust (docs/robustness.md) changes exactly two values of every trial and of the student:
    two shift views per image and a third trainable unit; the grid, budgets, split and trunk are study-cpu's."""
    plain, d = load_study(REPO / "configs/study.yaml", "study-cpu")
    robust, _ = load_study(REPO / "configs/study.yaml", "study-cpu-robust")
    a, b = build_trials(plain, d), build_trials(robust, d)
    assert [t.key for t in a] == [t.key for t in b] and len(b) == 11
    for ta, tb in zip(a, b):
        fa, fb = C.to_flat_dict(ta.cfg), C.to_flat_dict(tb.cfg)
        assert {k for k in fa if fa[k] != fb[k]} == {"data.shift_views", "model.trainable_units"}, ta.key
        assert (fb["data.shift_views"], fb["model.trainable_units"]) == (2, 3)
    student = C.load_config(REPO / "configs/level5.yaml", "study-cpu-robust")
    assert (student.data.shift_views, student.model.trainable_units, student.model.arch) == (2, 3, "efficientnet_lite0")


def test_study_overrides_split_between_study_and_trials(tmp_path):
    study, _ = load_study(REPO / "configs/study.yaml", None, ["study.name=x", "study.resources.max_concurrent=3",
                                                                "train.epochs=1"])
    assert (study.name, study.resources.max_concurrent, study.overrides) == ("x", 3, ["train.epochs=1"])
    with pytest.raises(C.ConfigError, match="stages"):
        load_study(REPO / "configs/study.yaml", None, ["study.stages=[tune,bogus]"])
    with pytest.raises(C.ConfigError, match="unknown config key"):
        load_study(REPO / "configs/study.yaml", None, ["study.nope=1"])


@pytest.mark.slow
def test_concurrent_trials_log_to_sqlite_and_register_levels(small_study):
    from mlflow import MlflowClient

    study, outcome = small_study
    assert outcome.failed_trials == []
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([outcome.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("flowers.role") == "trial"]
    # 4 grid points (L1 shared) + L3, all ran 4-at-a-time and all landed, finished, with per-epoch metrics
    assert sorted(r.data.tags["flowers.key"] for r in trials) == sorted(
        ["l1", "l3", "abl-light-cosine", "abl-strong-constant", "abl-strong-cosine"])
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert {"val/acc", "train/loss", "test/acc", "val/best_acc", "perf/images_per_s"} <= set(r.data.metrics)
        assert r.data.params["data.split"] == "official"
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"curves.png", "test_confusion.png", "test_per_class.csv", "split.json", "config.yaml"} <= arts
        assert logged_model(client, r.info.run_id) is not None  # the model: an MLflow logged model of the run
    mv = client.get_model_version_by_alias("flowers-l1", "champion")
    assert client.get_run(mv.run_id).data.tags["flowers.key"] == "l1"
    assert client.get_registered_model("flowers-l1").tags["flowers.study.plan"] == "small"
    assert set(outcome.registered) >= {"l1", "l3"}
    # registered as challengers, made champion by the gate (first versions), with lineage; real MLflow Models
    assert mv.tags["gate.decision"] == "first" and mv.tags["lineage.study"] == "small"
    assert mv.tags["lineage.split_hash"] and mv.tags["lineage.data_checksum"] and mv.tags["lineage.config_hash"]
    logged = logged_model(client, mv.run_id)  # an MLflow logged model of the run, the version's source
    assert mv.source == f"models:/{logged.model_id}"
    assert {"MLmodel", "model_card.md"} <= {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    ens = client.get_model_version_by_alias("flowers-ensemble", "champion")
    assert ens.tags["gate.decision"] == "first"
    assert sorted(ens.tags["lineage.parents"].split(",")) == ["flowers-l1/1", "flowers-l3/1"]


@pytest.mark.slow
def test_registered_level_loads_in_fresh_process_and_reproduces_test_accuracy(small_study):
    from mlflow import MlflowClient

    _, outcome = small_study
    client = MlflowClient(outcome.tracking_uri)
    mv = client.get_model_version_by_alias("flowers-l1", "champion")
    logged = client.get_run(mv.run_id).data.metrics["test/acc"]
    code = REPRO
    env = {**os.environ, "MLFLOW_TRACKING_URI": outcome.tracking_uri}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["top1"] == pytest.approx(logged, abs=1e-9)
    assert got["name"] == "flowers-l1"


@pytest.mark.slow
def test_distill_stage_registers_the_student_and_serve_answers_from_the_registry(small_study, synth_root, monkeypatch):
    """The study's L5 stage ran (smoke profile), registered flowers-student (champion through the gate),
    and Serve loads it and the ensemble from the registry by alias and answers over HTTP."""
    import httpx
    from mlflow import MlflowClient
    from ray import serve

    from conftest import free_port
    from serve.app import make_app

    _, outcome = small_study
    assert outcome.registered["distill"] == "models:/flowers-student@champion" and "distill" not in outcome.skipped
    client = MlflowClient(outcome.tracking_uri)
    mv = client.get_model_version_by_alias("flowers-student", "champion")
    assert mv.tags["gate.decision"] == "first" and mv.tags["flowers.kind"] == "onnx"
    assert mv.tags["lineage.parents"] == "flowers-ensemble/1"
    run = client.get_run(mv.run_id)
    assert run.data.tags["flowers.key"] == "l5-distill" and run.data.tags["int8_recipe"] == "u8s8_7bit_bc"
    assert {"test/acc_int8", "test/acc_fp32", "test/acc", "latency/int8_p50_ms"} <= set(run.data.metrics)
    assert "artifacts/test_per_image_fp32.json" in {a.path for a in client.list_artifacts(mv.run_id, "artifacts")}

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    opts = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    try:
        serve.run(make_app({"ensemble_uri": "models:/flowers-ensemble@champion",
                             "student_uri": "models:/flowers-student@champion",
                             "tracking_uri": outcome.tracking_uri}, {"Ensemble": opts, "Student": opts}),
                  name="study-student", route_prefix="/")
        image = sorted((synth_root / "jpg").glob("*.jpg"))[0].read_bytes()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            r = http.post("/v1/predict/student", content=image, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "flowers-student" and str(body["version"]) == str(mv.version)
            assert body["top_k"] and 0 <= body["top_k"][0]["probability"] <= 1
            student = next(m for m in http.get("/v1/models").json()["models"] if m["route"] == "student")
            assert student["uri"] == "models:/flowers-student@champion" and student["kind"] == "onnx"
            # the replica reports the file's INT8 check and its load-time warning for this CPU (none where the
            # weights cannot saturate or the CPU has VNNI; one line for 8-bit weights on a CPU without it)
            from flowers.inference.predict import load_model
            monkeypatch.setenv("MLFLOW_TRACKING_URI", outcome.tracking_uri)
            local = load_model("models:/flowers-student@champion")
            assert student["int8_check"] == local.meta["int8_check"] and student["int8_check"]["int8"] is True
            assert student["warnings"] == local.meta.get("warnings", [])
    finally:
        serve.delete("study-student")
        serve.shutdown()


# evaluate a registered model on its own test split (config inside the checkpoint) in a fresh interpreter
REPRO = """
import json
from flowers.config import build, DataConfig
from flowers.data.bundle import build_data
from flowers.evaluation.metrics import compute_metrics
from flowers.inference.predict import load_model, predict_dataset
m = load_model('models:/flowers-l1@champion')
dc = build(DataConfig, m.meta['config']['data'])
data = build_data(dc, m.preprocessing)
probs, labels = predict_dataset(m.predict_proba, data.test, batch_size=dc.eval_batch_size)
met = compute_metrics(probs, labels)
print(json.dumps({'top1': met['top1'], 'name': m.name}))
"""


def _run_study_proc(path: Path, log: Path, resume: bool = False) -> subprocess.Popen:
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "jobs.study", "--config", str(path)] + (["--resume"] if resume else [])
    # own session: killing the group takes the driver and the local Ray it started, nothing else
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


RESUME_EPOCHS = 30  # long enough that l3 is still mid-run when the driver is killed 2.5 s after its first checkpoint (12 was not, once)


@pytest.mark.slow
def test_resume_after_killing_the_driver(synth_root, tmp_path):
    from mlflow import MlflowClient

    path = write_small_study(tmp_path, synth_root, "resume", ablation=None, stages=["tune"],
                             levels={"l1": str(REPO / "configs/level1.yaml"), "l3": str(REPO / "configs/level3.yaml")},
                             overrides=[f"data.root={synth_root}", "data.split=official", f"train.epochs={RESUME_EPOCHS}"],
                             resources={"cpus_per_trial": 1, "max_concurrent": 1, "num_cpus": 1})
    runs = tmp_path / "home/tune/resume-runs"
    proc = _run_study_proc(path, tmp_path / "first.log")
    try:
        deadline = time.time() + 150
        # wait until l1 is done and l3 has checkpointed at least one epoch, then kill the driver mid-run
        while time.time() < deadline:
            if (runs / "l1/metrics.json").is_file() and (runs / "l3/last.pt").is_file():
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("study did not reach l3 in time: " + (tmp_path / "first.log").read_text()[-3000:])
        time.sleep(2.5)  # let Tune persist the experiment state that names l3's checkpoint
        l1_done = (runs / "l1/metrics.json").stat().st_mtime_ns
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (runs / "l3/metrics.json").exists(), "l3 finished before the kill; the test needs it mid-run"

    proc = _run_study_proc(path, tmp_path / "second.log", resume=True)
    try:
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text()
    assert rc == 0, log[-3000:]
    # the finished trial was not rerun; the unfinished one continued from its checkpoint, not epoch 1
    assert (runs / "l1/metrics.json").stat().st_mtime_ns == l1_done
    hist = json.loads((runs / "l3/metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == list(range(1, RESUME_EPOCHS + 1))
    client = MlflowClient(f"sqlite:///{tmp_path / 'home/mlflow.db'}")
    exp = client.get_experiment_by_name("resume")
    l3 = client.search_runs([exp.experiment_id], "tags.`flowers.key` = 'l3'")
    assert len(l3) == 1 and l3[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(l3[0].info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, RESUME_EPOCHS + 1)) and steps.count(1) == 1, steps
    assert client.get_model_version_by_alias("flowers-l3", "champion").run_id == l3[0].info.run_id


def test_search_space_parsing():
    from ray import tune

    from jobs.tune import parse_space

    space = parse_space(["optim.lr=loguniform:1e-4:1e-2", "data.augment=choice:light,strong", "train.epochs=randint:1:3"])
    assert set(space) == {"optim.lr", "data.augment", "train.epochs"}
    assert isinstance(space["data.augment"], tune.search.sample.Categorical)
    assert space["data.augment"].categories == ["light", "strong"]
    with pytest.raises(C.ConfigError, match="--param 'optim.lr=normal:0:1'"):
        parse_space(["optim.lr=normal:0:1"])


def test_the_plan_reads_every_config_file_once(monkeypatch):
    """`plan_study` resolves the levels, the grid, the student and the data with each YAML file
    (the profile above all) parsed once, and the steps get the plan instead of re-reading."""
    from collections import Counter

    from flowers.study.plan import plan_study

    study, d = load_study(REPO / "configs/study.yaml", "study-cpu")
    reads: Counter = Counter()
    real = Path.read_text

    def counted(self, *a, **k):
        if self.suffix in (".yaml", ".yml"):
            reads[self.resolve().name] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", counted)
    plan = plan_study(study, d)
    assert reads["study-cpu.yaml"] == 1 and max(reads.values()) == 1, reads
    assert plan.trials == build_trials(study, d)  # the same trials as reading each one on its own
    assert plan.student is not None and plan.student.task == "distill"
    assert plan.data == plan.trials[0].cfg.data
    assert [t.key for t in plan.trials][:3] == list(study.levels)
