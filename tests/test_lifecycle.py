"""Live model lifecycle over real HTTP: a running app follows the registry with zero failed requests.

One Serve app for the module on the session's Ray, its student route started on
`models:/<name>@champion` in a real MLflow server (the ensemble route on a file: not followed).
The tests run in file order, each moving the registry on from where the last left it:
promote v2 under load → a broken v3 under load (v2 keeps serving) → canary v1 at 30 % → shadow v1 →
rollback under load. Every smoke version is the session's smoke checkpoint; v1's last layer is
perturbed so a shadow comparison has something to measure.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import uuid

import httpx
import pytest
import torch
from conftest import free_port

from flowers.cli.main import main as cli
from flowers.models.checkpoint import load_checkpoint, write_checkpoint_folder
from flowers.registry import governance as G
from flowers.registry import tracking as T
from flowers.registry import uris as R

APP = "flowers-lifecycle"
CLIENTS = 4
OPTS = {"num_replicas": 1, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.5},
        "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}}


@pytest.fixture(scope="module")
def registry(mlflow_server, trained_checkpoint, tmp_path_factory):
    """`name` with v1 (champion, perturbed), v2 (challenger), v3 (weights corrupted after the manifest)."""
    import mlflow

    old_uri = mlflow.get_tracking_uri()
    target = R.resolve_target(mlflow_server)
    T.configure(target)
    tr = T.StudyTracker("lifecycle-tests", target)
    name = f"lc-{uuid.uuid4().hex[:6]}"
    tmp = tmp_path_factory.mktemp("lc")
    base = load_checkpoint(trained_checkpoint)

    def version(ckpt: dict, corrupt: bool = False, name: str = name) -> str:
        folder = write_checkpoint_folder(ckpt, tmp / uuid.uuid4().hex[:8] / "model")
        run = tr.child(uuid.uuid4().hex[:8], "trial")
        v = tr.log_model_dir(run, folder, "model", name)
        tr.finish(run)
        if corrupt:  # in the server's artifact store, after registration: the manifest's checksum no longer fits
            source = R.client(mlflow_server).get_model_version_download_uri(name, v).split(":/", 1)[1]
            stores = list(tmp_path_factory.getbasetemp().glob("mlflow*/artifacts"))
            weights = [w for st in stores for w in (st / source).rglob("model.safetensors")]
            assert weights, (source, stores)
            for w in weights:
                w.write_bytes(b"\0" * 64 + w.read_bytes()[64:])
        return v

    state = dict(base["model"])
    last = [k for k, t in state.items() if t.dtype.is_floating_point][-2]  # the classifier's weight
    state[last] = state[last] + 0.5 * torch.randn_like(state[last], generator=torch.Generator().manual_seed(0))
    v1 = version({**base, "model": state})
    G.decide(name, v1, mlflow_server)  # first: champion
    v2, v3 = version(base), version(base, corrupt=True)
    first = f"lc-first-{uuid.uuid4().hex[:6]}"  # one version, champion: it replaced nothing
    G.decide(first, version(base, name=first), mlflow_server)
    mlflow.set_tracking_uri(old_uri)
    yield {"name": name, "v1": v1, "v2": v2, "v3": v3, "first": first, "uri": mlflow_server,
           "client": R.client(mlflow_server)}


@pytest.fixture(scope="module")
def app(ray_session, registry, trained_checkpoint):
    from ray import serve

    from serve.app import make_app

    port = free_port()
    args = {"ensemble_uri": str(trained_checkpoint), "student_uri": f"models:/{registry['name']}@champion",
            "tracking_uri": registry["uri"], "follow_interval_s": 0.5}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(args, {"Ensemble": OPTS, "Student": OPTS}), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def jpeg(synth_root) -> bytes:
    return sorted((synth_root / "jpg").glob("*.jpg"))[0].read_bytes()


def _predict(client: httpx.Client, jpeg: bytes) -> httpx.Response:
    return client.post("/v1/predict/student", content=jpeg, headers={"content-type": "image/jpeg"})


def _rollout(client: httpx.Client) -> dict:
    return client.get("/v1/models").json()["models"][1]["rollout"]


def _wait(what, timeout: float = 90.0, every: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {getattr(what, '__name__', what)}")


class Load:
    """CLIENTS closed-loop clients on /v1/predict/student until stopped: (time, status, version, alias) each."""

    def __init__(self, client: httpx.Client, jpeg: bytes) -> None:
        self.client, self.jpeg, self.stop = client, jpeg, threading.Event()
        self.seen: list[tuple[float, int, str | None, str | None]] = []
        self.pool = cf.ThreadPoolExecutor(CLIENTS)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                r = _predict(self.client, self.jpeg)
                body = r.json() if r.status_code == 200 else {}
                self.seen.append((time.time(), r.status_code, body.get("version"), body.get("alias")))
            except httpx.HTTPError as e:  # a refused or dropped connection is a failed request too
                self.seen.append((time.time(), -1, type(e).__name__, None))

    def __enter__(self) -> "Load":
        self.futures = [self.pool.submit(self._loop) for _ in range(CLIENTS)]
        time.sleep(1.0)  # some answers before the change
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()

    def versions_after(self, t: float) -> set:
        return {v for ts, _, v, _ in self.seen if ts > t}


def _switch_under_load(app, jpeg, move, old: str, new: str) -> Load:
    """Run `move()` (an alias change) under load; return the load once answers are on `new` for 2 s."""
    with Load(app, jpeg) as load:
        moved_at = time.time()
        move()
        first_new = _wait(lambda: next((ts for ts, _, v, _ in load.seen if v == new), None))
        time.sleep(2.0)
    bad = [s for s in load.seen if s[1] != 200]
    assert not bad, f"{len(bad)} failed requests of {len(load.seen)}: {bad[:5]}"
    assert {v for _, _, v, _ in load.seen} <= {old, new}
    # a request that picked the old version just before the switch may finish just after the first new answer
    assert load.versions_after(first_new + 1.0) == {new}, load.seen[-20:]
    assert len(load.seen) > 20 and first_new > moved_at
    return load


@pytest.mark.slow
def test_promotion_reaches_the_running_app_with_zero_failed_requests(app, registry, jpeg, capsys):
    name, v1, v2 = registry["name"], registry["v1"], registry["v2"]
    first = _predict(app, jpeg).json()
    assert (first["model"], first["version"], first["alias"]) == (name, v1, "champion")
    r = _rollout(app)
    assert (r["following"], r["serving_version"], r["target_version"], r["replicas"]) == ("champion", v1, None,
                                                                                          {v1: 1})

    def promote():
        assert cli(["models", "promote", name, v2, "--tracking-uri", registry["uri"]]) == 0

    _switch_under_load(app, jpeg, promote, v1, v2)
    r = _wait(lambda: (lambda x: x if x["replicas"] == {v2: 1} else None)(_rollout(app)))
    assert (r["serving_version"], r["target_version"], r["state"]) == (v2, None, "steady")
    assert r["last_switch"]["from"] == v1 and r["last_switch"]["to"] == v2
    assert app.get("/v1/models").json()["models"][1]["loaded_versions"] == [v2]  # the old one was dropped


@pytest.mark.slow
def test_broken_version_is_not_rolled_out_and_the_old_keeps_serving(app, registry, jpeg):
    name, v2, v3, c = registry["name"], registry["v2"], registry["v3"], registry["client"]
    with Load(app, jpeg) as load:
        c.set_registered_model_alias(name, R.CHAMPION, v3)  # as a forced promotion would
        r = _wait(lambda: (lambda x: x if v3 in x["failed"] else None)(_rollout(app)))
        time.sleep(1.0)
    assert all(s[1] == 200 for s in load.seen), [s for s in load.seen if s[1] != 200][:5]
    assert {v for _, _, v, _ in load.seen} == {v2}
    assert r["serving_version"] == v2 and r["target_version"] is None
    assert r["failed"][v3]["reason"], r["failed"]
    c.set_registered_model_alias(name, R.CHAMPION, v2)  # put the champion back for the next tests
    _wait(lambda: _rollout(app)["target_version"] is None)


@pytest.mark.slow
def test_canary_share_is_honoured_then_aborted(app, registry, jpeg, capsys):
    name, v1, v2, uri = registry["name"], registry["v1"], registry["v2"], registry["uri"]
    assert cli(["models", "canary", name, v1, "--percent", "30", "--tracking-uri", uri]) == 0
    _wait(lambda: (_rollout(app)["canary"] or {}).get("version") == v1)
    time.sleep(1.5)  # the replica holds the canary once it has loaded it
    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        answers = [r.json() for r in pool.map(lambda _: _predict(app, jpeg), range(400))]
    share = sum(a["version"] == v1 for a in answers) / len(answers)
    assert abs(share - 0.30) <= 0.05, share
    assert {(a["version"], a["alias"]) for a in answers} == {(v1, "canary"), (v2, "champion")}
    assert cli(["models", "abort", name, "--only", "canary", "--tracking-uri", uri]) == 0
    _wait(lambda: _rollout(app)["canary"] is None)
    time.sleep(1.5)
    assert {_predict(app, jpeg).json()["version"] for _ in range(20)} == {v2}


@pytest.mark.slow
def test_shadow_gets_copies_and_never_answers(app, registry, jpeg, synth_root):
    name, v1, v2, uri = registry["name"], registry["v1"], registry["v2"], registry["uri"]
    assert cli(["models", "shadow", name, v1, "--tracking-uri", uri]) == 0
    _wait(lambda: (_rollout(app)["shadow"] or {}).get("version") == v1)
    images = [p.read_bytes() for p in sorted((synth_root / "jpg").glob("*.jpg"))[:30]]

    def pairs():
        p = (_rollout(app)["shadow"] or {}).get("pairs", {}).get(f"{v2}->{v1}")
        return p if p and p["requests"] + p["skipped"] >= len(images) else None

    # copies start once the replica holds v1 beside v2 (it loads and warms it up after the Follower says so,
    # seconds on a loaded machine): keep sending until the replicas have reported a full round of copies
    answers, deadline = [], time.time() + 120
    while not pairs() and time.time() < deadline:
        answers += [_predict(app, im).json() for im in images]
        time.sleep(1.0)
    assert answers and {a["version"] for a in answers} == {v2}  # the shadow never answers
    p = _wait(pairs, timeout=30)
    assert p["requests"] >= len(images) // 2
    assert 0.0 <= p["top1_agreement"] <= 1.0 and p["mean_abs_prob_diff"] > 0  # v1's last layer differs
    assert p["primary_ms_mean"] > 0 and p["shadow_ms_mean"] > 0
    assert cli(["models", "abort", name, "--tracking-uri", uri]) == 0
    _wait(lambda: _rollout(app)["shadow"] is None or not _rollout(app)["shadow"].get("version"))


@pytest.mark.slow
def test_rollback_under_load_zero_failed_requests(app, registry, jpeg, capsys):
    name, v1, v2, uri = registry["name"], registry["v1"], registry["v2"], registry["uri"]

    def rollback():
        assert cli(["models", "rollback", name, "--reason", "test", "--tracking-uri", uri]) == 0

    _switch_under_load(app, jpeg, rollback, v2, v1)
    tags = registry["client"].get_model_version(name, v2).tags
    assert tags["rollback.to"] == v1 and tags["rollback.reason"] == "test" and tags["rollback.by"]
    assert _wait(lambda: _rollout(app)["serving_version"] == v1)


@pytest.mark.parametrize("argv, needle", [
    (["canary", "{name}", "99", "--percent", "10"], "has no version 99"),
    (["canary", "{name}", "{v2}", "--percent", "150"], "--percent must be in (0, 100]"),
    (["canary", "no-such-model", "1", "--percent", "10"], "no registered model 'no-such-model'"),
    (["shadow", "{name}", "x"], "version must be a number"),
    (["abort", "{name}"], "has no canary or shadow to abort"),
])
def test_bad_lifecycle_input_one_line_exit_2_nothing_moves(registry, capsys, argv, needle):
    c, name = registry["client"], registry["name"]
    before = (c.get_registered_model(name).aliases, c.get_registered_model(name).tags)
    capsys.readouterr()
    argv = [a.format(**registry) for a in argv]
    assert cli(["models", *argv, "--tracking-uri", registry["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert (c.get_registered_model(name).aliases, c.get_registered_model(name).tags) == before


def test_rollback_with_no_previous_champion_is_refused(registry, capsys):
    """A first champion replaced nothing: one line, exit 2, champion unchanged."""
    c, uri, name = registry["client"], registry["uri"], registry["first"]
    before = c.get_registered_model(name).aliases
    capsys.readouterr()
    assert cli(["models", "rollback", name, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert "no previous champion" in err and len(err.splitlines()) == 1, err
    assert c.get_registered_model(name).aliases == before == {R.CHAMPION: "1"}
