"""The job queue without a cluster: store (SQLite), order and reasons, the dispatcher against a fake
Ray Jobs client (unit level), config and CLI checks. The real-cluster tests are in test_queue_cluster.py."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from flowers.config import ConfigError
from jobs import client as J
from jobs.queue import store as S
from jobs.queue.config import QueueSpec, load_queues, parse_queues
from jobs.queue.dispatcher import Dispatcher
from jobs.queue.order import plan, positions


@pytest.fixture
def store(tmp_path):
    st = S.Store(f"sqlite:///{tmp_path / 'q.db'}")
    yield st
    st.dispose()


def add(store: S.Store, queue: str = "default", priority: int = 0, need: float = 1.0, kind: str = "cmd",
        max_retries: int = 0, entry: str = "python -c pass") -> S.Job:
    n = len(store.jobs())
    return store.add(id=f"{kind}-{n:04d}", queue=queue, priority=priority, state=S.WAITING, kind=kind,
                     label=J.short_label(entry), entrypoint=entry, runtime_env="{}", driver_cpus=0.0,
                     need_cpus=need, max_retries=max_retries, attempt=0, ray_id=None, submitted_at=time.time())


class FakeRay:
    """The four JobSubmissionClient calls the dispatcher makes; jobs end when the test says so."""

    def __init__(self):
        self.jobs: dict[str, SimpleNamespace] = {}
        self.submits: list[str] = []
        self.lock = threading.Lock()

    def submit_job(self, entrypoint, runtime_env, submission_id, entrypoint_num_cpus, metadata):
        with self.lock:
            if submission_id in self.jobs:
                raise RuntimeError(f"Job with submission_id {submission_id} already exists")
            self.submits.append(submission_id)
            self.jobs[submission_id] = SimpleNamespace(status="RUNNING", error_type=None, driver_exit_code=None,
                                                       message="", entrypoint=entrypoint)
        return submission_id

    def get_job_info(self, sid):
        if sid not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return self.jobs[sid]

    def stop_job(self, sid):
        self.jobs[sid].status = "STOPPED"
        return True

    def get_job_logs(self, sid):
        return self.jobs[sid].message

    def end(self, sid, status="SUCCEEDED", **kw):
        self.jobs[sid].status = status
        self.jobs[sid].__dict__.update(kw)


def dispatcher(store, ray: FakeRay, cpus: float = 4.0, owner: str = "d1") -> Dispatcher:
    d = Dispatcher(store, "http://fake:8265", owner=owner)
    d.client = ray
    d.cluster_cpus = lambda: cpus
    return d


def test_queues_config(tmp_path):
    specs = {q.name: q for q in parse_queues({"queues": {"train": {"max_running": 2, "priority": 5}}})}
    assert specs == {"train": QueueSpec("train", 2, 5), "default": QueueSpec("default")}
    for bad, words in [({"queues": {"t": {"max_running": 0}}}, "max_running"),
                       ({"queues": {"t": {"priority": 99999}}}, "priority"),
                       ({"queues": {"t": {"limit": 1}}}, "unknown keys"),
                       ({"queues": {"a b": {}}}, "queue name"), ({"queues": []}, "mapping")]:
        with pytest.raises(ConfigError, match=words):
            parse_queues(bad)
    (tmp_path / "q.yaml").write_text("queues:\n  x: {max_running: 1}\n")
    assert [q.name for q in load_queues(tmp_path / "q.yaml")] == ["x", "default"]
    with pytest.raises(ConfigError, match="not found"):
        load_queues(tmp_path / "missing.yaml")


def test_order_priority_then_arrival_and_reasons(store):
    store.set_queues([QueueSpec("default", 4), QueueSpec("train", 2)])
    a, b, c = add(store, "train"), add(store, "train"), add(store, "train")
    d = add(store, priority=5, need=3)
    e = add(store)
    queued = store.jobs(S.QUEUED)
    assert [j.id for j in sorted(queued, key=lambda j: positions(queued)[j.id])] == [d.id, a.id, b.id, c.id, e.id]
    got = {j.id: r for j, r in plan(queued, [], store.queues(), total_cpus=4)}
    # d (3 CPUs, priority 5) and a fit; b needs 1 more CPU than is free and holds back e; c waits on its queue
    assert got[d.id] is None and got[a.id] is None
    assert got[b.id] == "cluster has 0 free CPUs, job needs 1"
    assert got[c.id] == "behind 1 earlier job"
    assert got[e.id] == "behind 2 earlier jobs"
    running = [store.get(x.id) for x in (a, b)]
    got = {j.id: r for j, r in plan([store.get(c.id), store.get(e.id)], running, store.queues(), total_cpus=4)}
    assert got[c.id] == "queue 'train' full: 2/2 running"
    assert got[e.id] is None  # a job held back by its own queue's limit holds back nobody else
    hi = add(store, priority=9, need=4)
    got = {j.id: r for j, r in plan([store.get(e.id), store.get(hi.id)], running, store.queues(), total_cpus=4)}
    assert got[hi.id] == "cluster has 2 free CPUs, job needs 4"
    assert got[e.id] == "behind 1 job of higher priority"


def test_store_moves_are_exact_and_stop_removes_a_waiting_job(store, monkeypatch):
    from jobs.queue import api

    j = add(store)
    assert store.move(j.id, S.QUEUED, state=S.ADMITTING)
    assert not store.move(j.id, S.QUEUED, state=S.STOPPED)  # already taken: the second mover loses
    w = add(store)
    monkeypatch.setattr(api, "open_store", lambda *a, **k: store)
    assert api.stop(w.id) == "removed from the queue (it never started)"
    assert store.get(w.id).state == S.STOPPED
    ray = FakeRay()
    dispatcher(store, ray).step()
    assert w.id not in ray.submits and ray.submits == [j.id]


def test_lease_one_dispatcher_at_a_time(store):
    assert store.take_lease("a", ttl_s=30)
    assert not store.take_lease("b", ttl_s=30)
    assert store.take_lease("a", ttl_s=0.01)
    time.sleep(0.05)
    assert store.take_lease("b", ttl_s=30)  # a's lease expired (a crash): b takes over
    assert store.lease()[0] == "b" and store.dispatcher_alive()


def test_dispatcher_limits_order_and_restart_reconciles(store):
    store.set_queues([QueueSpec("default", 2)])
    jobs = [add(store) for _ in range(4)]
    ray = FakeRay()
    d = dispatcher(store, ray)
    d.step()
    assert ray.submits == [jobs[0].id, jobs[1].id]
    assert store.get(jobs[2].id).reason == "queue 'default' full: 2/2 running"
    # a dispatcher that died between "ADMITTING" and Ray's answer: the job is in Ray, not yet confirmed
    store.move(jobs[2].id, S.QUEUED, state=S.ADMITTING, ray_id=jobs[2].id)
    ray.submit_job("x", {}, jobs[2].id, None, {})
    ray.end(jobs[0].id)
    d2 = dispatcher(store, ray, owner="d2")
    assert not d2.step()  # d1 still holds the lease
    store.release_lease("d1")
    assert d2.step()
    assert ray.submits.count(jobs[2].id) == 1 and store.get(jobs[2].id).state == S.RUNNING
    assert store.get(jobs[0].id).state == S.SUCCEEDED
    # ADMITTING but never reached Ray: submitted on restart, once
    store.move(jobs[3].id, S.QUEUED, state=S.ADMITTING, ray_id=jobs[3].id)
    d2.step()
    assert ray.submits.count(jobs[3].id) == 1


def test_retry_only_infrastructure_failures(store):
    ray = FakeRay()
    d = dispatcher(store, ray)
    study = add(store, kind="study", max_retries=1, entry="python -m jobs.study --config s.yaml")
    code = add(store, max_retries=3)
    d.step()
    ray.end(study.id, "FAILED", error_type="JOB_ENTRYPOINT_COMMAND_ERROR", driver_exit_code=-9)
    ray.end(code.id, "FAILED", error_type="JOB_ENTRYPOINT_COMMAND_ERROR", driver_exit_code=2,
            message="Traceback...\nerror: data.root /x: no such folder\n")
    d.step()
    s = store.get(study.id)
    assert s.state == S.RUNNING and s.attempt == 1 and s.ray_id == f"{study.id}-r1"
    assert s.entrypoint.endswith("--resume")  # the study continues from its storage
    assert ray.jobs[s.ray_id].entrypoint.endswith("--resume")
    c = store.get(code.id)
    assert c.state == S.FAILED and c.message == "data.root /x: no such folder" and c.attempt == 0
    ray.end(s.ray_id, "FAILED", error_type="JOB_SUPERVISOR_ACTOR_DIED")
    d.step()
    s = store.get(study.id)
    assert s.state == S.FAILED and "no retries left" in s.message
    assert [h["ray_id"] for h in json.loads(s.history)] == [study.id, f"{study.id}-r1"]


def test_a_driver_that_never_started_is_sent_again(store):
    ray = FakeRay()
    d = dispatcher(store, ray)
    j = add(store)
    d.step()
    ray.end(j.id, "FAILED", error_type="RUNTIME_ENV_SETUP_FAILURE",
            message="Failed to download runtime_env file package gcs://_ray_pkg_x.zip")
    d.step()
    assert store.get(j.id).state == S.RUNNING and ray.submits == [j.id, f"{j.id}-r1"]


def test_failure_lines_and_labels():
    info = SimpleNamespace(driver_exit_code=1, message="")
    line = J.explain_failure(info, "Traceback\nModuleNotFoundError: No module named 'torch'\n", "python")
    assert "cannot import 'torch'" in line and "--python" in line and "\n" not in line
    assert "no python" in J.explain_failure(SimpleNamespace(driver_exit_code=127, message=""),
                                            "/bin/sh: 1: python: not found", "python")
    assert J.infrastructure_failure(SimpleNamespace(error_type="JOB_ENTRYPOINT_COMMAND_ERROR", driver_exit_code=137))
    assert J.infrastructure_failure(SimpleNamespace(error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                                                    driver_exit_code=1)) is None
    assert J.short_label("/x/.venv/bin/python -m jobs.study --profile smoke --tracking-uri http://m:5000") == \
        "study --profile smoke"
    assert "\n" not in J.short_label("python -c 'import ray\nray.init()\nprint(1)'")


def test_declared_cpus(tmp_path):
    from jobs.queue.need import declared_cpus

    assert declared_cpus("tune", ["--cpus-per-trial", "0.5", "--max-concurrent", "4", "--samples", "2"]) == 1.0
    assert declared_cpus("score", ["d", "--workers", "3", "--cpus-per-worker", "2"]) == 6.0
    assert declared_cpus("score", ["d"]) == 1.0


def test_submit_bad_input_is_one_line_and_queues_nothing(tmp_path, monkeypatch, capsys):
    from conftest import free_port
    from flowers.cli.main import main

    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "FLOWERS_QUEUE_URL"):
        monkeypatch.delenv(k, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [(["--priority", "5000"], "priority 5000"), (["--max-retries", "-1"], "--max-retries -1"),
             (["--max-retries", "99"], "--max-retries 99"), ([], "cannot reach the Ray Jobs API")]
    for extra, words in cases:
        rc = main(["submit", "score", "--address", dead, *extra, "--", "imgs", "--model", "m", "--out", "o"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / ".flowers" / "queues").exists() or not any((tmp_path / ".flowers" / "queues").iterdir())
    assert main(["jobs", "list", "--json", "--address", dead]) == 2
    out = json.loads(capsys.readouterr().out)
    assert "cannot reach" in out["error"]


def test_queues_command_and_jobs_table(store, monkeypatch, capsys):
    from flowers.cli.main import main
    from flowers.cli.commands.jobs import table
    from jobs.queue import api

    monkeypatch.setenv("FLOWERS_QUEUE_URL", store.url)
    store.set_queues([QueueSpec("default", 4), QueueSpec("train", 2, 3)])
    add(store, "train")
    assert main(["queues", "--json"]) == 0
    rows = {r["queue"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["train"] == {"queue": "train", "max_running": 2, "priority": 3, "running": 0, "waiting": 1}
    assert main(["queues"]) == 0
    assert "train" in capsys.readouterr().out
    job = store.jobs()[0]
    store.set(job.id, reason="queue 'train' full: 2/2 running")
    text = table([api.describe(store.get(job.id), {job.id: 1})])
    head, line = text.splitlines()
    assert head.split()[:5] == ["ID", "QUEUE", "PRI", "POS", "STATE"]
    assert line.split()[:5] == [job.id, "train", "0", "1", "WAITING"]
    assert line.endswith("queue 'train' full: 2/2 running")
