"""The job queue on the local multi-node cluster (tests/cluster_fixture.py): real Ray Jobs, the
queue's state in the cluster's PostgreSQL, the dispatcher that `up` started. Limits, order,
priority, stop, a dispatcher crash, a killed driver retried, and fifty submissions at once."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

QUEUES = {"default": {"max_running": 4}, "train": {"max_running": 2}, "solo": {"max_running": 1},
          "bulk": {"max_running": 4}}


@pytest.fixture(scope="module")
def store(cluster_env):
    """The queue store with this module's queues (what the dispatcher's --queues file writes)."""
    from jobs.queue import store as S
    from jobs.queue.config import parse_queues

    st = S.Store(cluster_env["FLOWERS_QUEUE_URL"])
    st.set_queues(parse_queues({"queues": QUEUES}))
    yield st
    st.set_queues(parse_queues({}))
    st.dispose()


def _enqueue(queue: str, code: str, **kw):
    """A trivial job through the queue's Python API (the same checks and rows as `flowers submit`)."""
    from jobs.queue import api

    return api.enqueue("cmd", [], queue=queue, entrypoint=f"{sys.executable} -c {shlex.quote(code)}",
                       num_cpus=kw.pop("num_cpus", 0), start_dispatcher=False, **kw)


def _wait_final(store, ids: list[str], timeout: float = 900) -> dict:
    from jobs.queue import store as S

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {i: store.get(i) for i in ids}
        if all(j.state in S.FINAL for j in jobs.values()):
            return jobs
        time.sleep(1)
    raise AssertionError(f"not finished: {[(i, j.state, j.reason) for i, j in jobs.items() if j.state not in S.FINAL]}")


def _ray_ids(cluster_env) -> list[str]:
    from jobs import client as J

    return [j["submission_id"] for j in J.list_jobs(cluster_env["RAY_API_SERVER_ADDRESS"]) if j["submission_id"]]


def test_stop_priority_and_a_dispatcher_crash(test_cluster, cluster_env, store, tmp_path):
    """Queue `solo` (1 at a time): a stopped waiting job never starts, the priority job submitted last
    starts first, and with the dispatcher killed and restarted while jobs wait, every job runs once."""
    from jobs.queue import api

    flag = tmp_path / "go"  # the first job holds the queue's one slot until the test creates this file
    hold = f"import os, time; [time.sleep(0.2) for _ in iter(lambda: os.path.exists({str(flag)!r}), True)]"
    first = _enqueue("solo", hold)
    deadline = time.monotonic() + 300
    while store.get(first.id).state != "RUNNING":  # it holds the queue's one slot from now on
        assert time.monotonic() < deadline, store.get(first.id)
        time.sleep(0.5)
    waiting = [_enqueue("solo", "pass") for _ in range(3)]
    urgent = _enqueue("solo", "pass", priority=5)
    assert api.stop(waiting[1].id) == "removed from the queue (it never started)"
    test_cluster.kill_dispatcher()
    time.sleep(3)
    test_cluster.start_dispatcher()
    flag.write_text("go")
    ids = [first.id, *[w.id for w in waiting], urgent.id]
    jobs = _wait_final(store, ids)
    assert jobs[waiting[1].id].state == "STOPPED"
    assert all(jobs[i].state == "SUCCEEDED" for i in ids if i != waiting[1].id), \
        [(j.id, j.state, j.message) for j in jobs.values()]
    started = sorted((jobs[i].admitted_at, i) for i in ids if i != waiting[1].id)
    assert [i for _, i in started] == [first.id, urgent.id, waiting[0].id, waiting[2].id]
    ray = _ray_ids(cluster_env)
    assert waiting[1].id not in ray  # never reached Ray
    for i in ids:  # every other job's driver ran exactly once: any earlier attempt never started
        if i != waiting[1].id:
            attempts = [r for r in ray if r == i or r.startswith(f"{i}-r")]
            history = json.loads(jobs[i].history)
            assert len(attempts) == len(history) == jobs[i].attempt + 1, (attempts, history)
            assert all(h["cause"] == "start" for h in history[:-1]), history


def test_fifty_small_jobs_all_finish_and_the_head_answers(cluster_env, store):
    from jobs import client as J

    ids = [_enqueue("bulk", "pass").id for _ in range(50)]
    answered = 0
    deadline = time.monotonic() + 1200
    from jobs.queue import store as S
    while time.monotonic() < deadline:
        J.list_jobs(cluster_env["RAY_API_SERVER_ADDRESS"])  # the head keeps answering its Jobs API
        answered += 1
        if all(store.get(i).state in S.FINAL for i in ids):
            break
        time.sleep(5)
    jobs = _wait_final(store, ids, timeout=60)
    assert {j.state for j in jobs.values()} == {"SUCCEEDED"}, [(j.id, j.message) for j in jobs.values()
                                                              if j.state != "SUCCEEDED"]
    assert answered >= 1


# ----------------------------------------------------------------------------- real studies


@pytest.fixture(scope="module")
def dataset_uri(cluster_env, tmp_path_factory):
    from flowers.data import write_synthetic
    from flowers.data.remote import publish

    root = write_synthetic(tmp_path_factory.mktemp("qdata") / "flowers", num_classes=4, per_class=12, size=64).root
    uri = "s3://flowers/datasets/queue-synth"
    publish(root, uri)
    return uri


def _study(tmp: Path, name: str, data_uri: str, levels=("l1",), epochs: int = 1) -> Path:
    data = {"name": name, "ablation": None, "profile": str(REPO / "configs/profiles/smoke.yaml"),
            "levels": {lv: str(REPO / f"configs/level{lv[1]}.yaml") for lv in levels},
            "overrides": [f"data.root={data_uri}", "data.split=official", f"train.epochs={epochs}"],
            "stages": ["tune"], "resources": {"cpus_per_trial": 0.5, "max_concurrent": 1},
            "max_failures": 1, "home": str(tmp / "home"), "storage_path": f"s3://flowers/tune/{name}"}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _submit(env: dict, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "flowers.cli.main", "submit", *args], capture_output=True, text=True,
                       cwd=REPO, timeout=600, env={**os.environ, **env})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout.split()[1].rstrip(":")


def _trial_runs(mc, name: str) -> list:
    exp = mc.get_experiment_by_name(name)
    return [] if exp is None else mc.search_runs([exp.experiment_id], "tags.`flowers.role` = 'trial'")


def test_three_at_once_with_a_limit_of_two(cluster_env, store, dataset_uri, trained_run, synth_root, tmp_path):
    """Two smoke studies and a scoring job submitted at the same moment to queue `train` (limit 2):
    all SUCCEED, never more than 2 run at once, they start in submission order; one run per trial,
    none left RUNNING, and each study's registered version comes from its own runs."""
    import boto3
    from mlflow import MlflowClient

    from flowers.registry import uris as R
    from flowers.registry import tracking as T
    from jobs.queue import store as S

    env = cluster_env
    target = T.configure(R.resolve_target(env["MLFLOW_TRACKING_URI"]))
    tr = T.StudyTracker("queue-score-models", target)
    run = tr.child("model", "trial")
    tr.log_model_dir(run, trained_run.run_dir, "model", "flowers-queue-score", alias=R.CHAMPION)
    tr.finish(run)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
    for p in sorted((synth_root / "jpg").glob("*.jpg"))[:16]:
        s3.upload_file(str(p), "flowers", f"queue-score/in/{p.name}")
    names = ["q-study-a", "q-study-b"]
    cmds = [["study", "--queue", "train", "--", "--config", str(_study(tmp_path / n, n, dataset_uri)),
             "--tracking-uri", env["MLFLOW_TRACKING_URI"]] for n in names]
    cmds.append(["score", "--queue", "train", "--", "s3://flowers/queue-score/in", "--model",
                 "models:/flowers-queue-score@champion", "--out", "s3://flowers/queue-score/out", "--workers", "1",
                 "--cpus-per-worker", "1", "--tracking-uri", env["MLFLOW_TRACKING_URI"]])
    ids: list[str | None] = [None] * 3

    def submit(i: int) -> None:
        ids[i] = _submit(env, *cmds[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(ids), ids
    # what a user sees meanwhile: two running, the third waiting with its reason
    deadline, table = time.monotonic() + 300, ""
    while time.monotonic() < deadline:
        r = subprocess.run([sys.executable, "-m", "flowers.cli.main", "jobs", "list"], capture_output=True, text=True,
                           cwd=REPO, timeout=300, env={**os.environ, **env})
        table = r.stdout
        if any("WAITING" in ln and "queue 'train' full: 2/2 running" in ln for ln in table.splitlines()):
            break
        time.sleep(2)
    print(table)
    assert "queue 'train' full: 2/2 running" in table, table
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            n = sum(1 for j in store.jobs(S.ACTIVE) if j.queue == "train")
            peak[0] = max(peak[0], n)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        jobs = _wait_final(store, ids, timeout=1500)
    finally:
        stop.set()
        sampler.join(5)
    assert {j.state for j in jobs.values()} == {"SUCCEEDED"}, [(j.id, j.state, j.message) for j in jobs.values()]
    assert 1 <= peak[0] <= 2, peak
    by_arrival = [j.id for j in sorted(jobs.values(), key=lambda j: j.seq)]
    assert [j.id for j in sorted(jobs.values(), key=lambda j: j.admitted_at)] == by_arrival
    mc = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = {n: _trial_runs(mc, n) for n in names}
    for n, rs in runs.items():
        assert len(rs) == 1 and rs[0].info.status == "FINISHED", (n, [(r.info.run_id, r.info.status) for r in rs])
    versions = mc.search_model_versions("name='flowers-l1'")
    mine = {n: [v for v in versions if v.run_id in {r.info.run_id for r in rs}] for n, rs in runs.items()}
    assert all(len(v) == 1 for v in mine.values()), mine
    assert mine[names[0]][0].version != mine[names[1]][0].version


def test_a_killed_driver_is_retried_and_the_study_resumes(cluster_env, store, dataset_uri, tmp_path):
    """`--max-retries 1`: the study's driver is SIGKILLed once a trial has finished; the queue sends it
    again with --resume, the finished trial is not trained again, and the job SUCCEEDS."""
    from mlflow import MlflowClient

    env = cluster_env
    name = "q-retry"
    path = _study(tmp_path, name, dataset_uri, levels=("l1", "l3"), epochs=2)
    jid = _submit(env, "study", "--max-retries", "1", "--", "--config", str(path),
                  "--tracking-uri", env["MLFLOW_TRACKING_URI"])
    mc = MlflowClient(env["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 900
    done = []
    while time.monotonic() < deadline and not done:
        assert store.get(jid).state in ("WAITING", "ADMITTING", "RUNNING"), store.get(jid).message
        done = [r for r in _trial_runs(mc, name) if r.info.status == "FINISHED"]
        time.sleep(1)
    assert done, "no trial finished"
    steps = {r.info.run_id: sorted(m.step for m in mc.get_metric_history(r.info.run_id, "val_acc")) for r in done}
    drivers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_driver(int(p), str(path))]
    assert drivers, "the study's driver process was not found"
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    job = _wait_final(store, [jid], timeout=900)[jid]
    assert job.state == "SUCCEEDED", (job.message, json.loads(job.history))
    history = json.loads(job.history)
    assert job.attempt == 1 and history[0]["cause"] == "infra" and "killed" in history[0]["message"], history
    for run_id, before in steps.items():
        after = sorted(m.step for m in mc.get_metric_history(run_id, "val_acc"))
        assert after == before, "a finished trial was trained again"
    runs = _trial_runs(mc, name)
    keys = [r.data.tags["flowers.key"] for r in runs]
    assert len(keys) == len(set(keys)) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def _is_driver(pid: int, config: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [c.decode(errors="replace") for c in cmd]
    return "jobs.study" in words and config in words and not words[0].endswith("sh")
