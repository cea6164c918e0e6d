"""Batch scoring: folders → Parquet through Ray Data, checked row by row against the Predictor."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flowers.config import ConfigError, ScoreConfig
from flowers.data import DataError
from flowers.scoring.batch import Scorer
from flowers.scoring.plan import plan_scoring
from flowers.scoring.schema import SCHEMA
from jobs.score import score_folders

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, size=(80, 60), color=(200, 40, 90), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = (rng.random((size[1], size[0], 3)) * 60 + np.array(color) * 0.7).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, Path]:
    """Good images in several formats, nested, upper-case extensions, and three bad files."""
    root = tmp_path_factory.mktemp("score_in")
    good = {
        "a.jpg": _img(root / "a.jpg", (80, 60)),
        "B.JPG": _img(root / "B.JPG", (64, 96), (20, 200, 40)),
        "c.png": _img(root / "nested" / "c.png", (50, 50), (10, 10, 220)),
        "d.JPEG": _img(root / "nested" / "deeper" / "d.JPEG", (120, 70), fmt="JPEG"),
        "e.webp": _img(root / "nested" / "e.webp", (40, 72), (250, 250, 0)),
        "f.BMP": _img(root / "f.BMP", (33, 47), (90, 90, 90), fmt="BMP"),
    }
    bad = {
        "corrupt.jpg": root / "corrupt.jpg",      # a real JPEG cut in half
        "text.jpg": root / "nested" / "text.jpg",  # text named .jpg
        "empty.png": root / "empty.png",           # 0 bytes
    }
    bad["corrupt.jpg"].write_bytes(_jpeg_bytes((200, 200))[:300])
    bad["text.jpg"].write_text("this is not an image\n")
    bad["empty.png"].write_bytes(b"")
    (root / "notes.txt").write_text("not listed: wrong extension")
    (root / ".hidden.jpg").write_bytes(_jpeg_bytes())  # hidden files are skipped
    return {"root": root, **{k: v.absolute() for k, v in good.items()},
            **{f"bad:{k}": v.absolute() for k, v in bad.items()}}


@pytest.fixture(scope="module")
def scored(folder, trained_checkpoint, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("score_out") / "scores.parquet"
    summary = score_folders([folder["root"]], str(trained_checkpoint), out,
                            ScoreConfig(batch_size=3, workers=2, cpus_per_worker=1, top_k=3, progress=False))
    return summary, out


def _good(folder) -> dict[str, Path]:
    return {k: v for k, v in folder.items() if k != "root" and not k.startswith("bad:")}


def test_every_row_read_back_with_pyarrow(folder, scored):
    summary, out = scored
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(SCHEMA), table.schema
    rows = {r["path"]: r for r in table.to_pylist()}
    good, bad = _good(folder), {k: v for k, v in folder.items() if k.startswith("bad:")}
    assert set(rows) == {str(p) for p in [*good.values(), *bad.values()]}  # no .txt, no hidden file
    assert (summary.scored, summary.errors, summary.rows) == (9, 3, 9)
    assert summary.images_per_s > 0 and not list(out.parent.glob(".*tmp*"))  # temp file renamed away

    for key, p in good.items():
        r = rows[str(p)]
        assert r["error"] is None
        assert (r["width"], r["height"]) == Image.open(p).size
        assert 0 <= r["label"] < 5 and r["name"]
        assert len(r["top_k_labels"]) == len(r["top_k_probs"]) == 3
        assert r["top_k_labels"][0] == r["label"] and r["top_k_probs"][0] == pytest.approx(r["confidence"])
        assert r["top_k_probs"] == sorted(r["top_k_probs"], reverse=True)
        assert 0.0 <= r["entropy"] <= 1.0 and isinstance(r["uncertain"], bool)
        assert r["model_name"] and r["scored_at"] is not None

    for key, p in bad.items():
        r = rows[str(p)]
        assert r["error"] and str(p) in r["error"], r["error"]
        for col in ("width", "height", "label", "name", "confidence", "top_k_labels", "top_k_probs",
                    "entropy", "uncertain"):
            assert r[col] is None, (key, col)
        assert r["model_name"] and r["scored_at"] is not None
    assert "truncated or corrupt" in rows[str(bad["bad:corrupt.jpg"])]["error"]
    assert "not a recognised image" in rows[str(bad["bad:text.jpg"])]["error"]
    assert "empty" in rows[str(bad["bad:empty.png"])]["error"]


def test_parity_with_predictor(folder, scored, trained_checkpoint):
    """Same Predictor as the Serve endpoint: same labels and probabilities for the same files."""
    from flowers.inference.predict import Predictor

    _, out = scored
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    pred = Predictor.from_uri(trained_checkpoint)
    paths = list(_good(folder).values())
    probs = pred.predict_proba(torch.stack([pred.load_image(p) for p in paths]))
    for p, res, row_probs in zip(paths, pred.predict(paths, top_k=3), probs):
        r = rows[str(p)]
        assert r["label"] == res["label"] and r["name"] == res["name"]
        assert r["top_k_labels"] == [t["label"] for t in res["top_k"]]
        np.testing.assert_allclose(r["top_k_probs"], [t["probability"] for t in res["top_k"]], atol=1e-5)
        np.testing.assert_allclose(r["top_k_probs"], np.sort(row_probs)[::-1][:3], atol=1e-5)
        assert r["entropy"] == pytest.approx(res["entropy"], abs=1e-5)
        assert r["uncertain"] == res["uncertain"]
        assert r["model_name"] == pred.model.name


def test_scorer_bytes_rows_without_ray(folder, trained_checkpoint):
    """The actor class on its own: bytes rows, a bytes error names the path, one row out per row in."""
    scorer = Scorer(str(trained_checkpoint), top_k=2, threads=1)
    table = scorer({"path": np.array(["x/one.jpg", "x/bad.jpg", "x/gone.png"], dtype=object),
                    "bytes": np.array([folder["a.jpg"].read_bytes(), b"garbage", None], dtype=object)})
    rows = table.to_pylist()
    assert table.schema.equals(SCHEMA) and [r["path"] for r in rows] == ["x/one.jpg", "x/bad.jpg", "x/gone.png"]
    assert rows[0]["error"] is None and len(rows[0]["top_k_labels"]) == 2 and rows[0]["width"] == 80
    assert "x/bad.jpg" in rows[1]["error"] and rows[1]["label"] is None
    assert "x/gone.png" in rows[2]["error"]  # no bytes and no file: read error row


@pytest.mark.slow
def test_resume_overwrite_and_refusal(folder, trained_checkpoint, ray_session, tmp_path):
    src = tmp_path / "imgs"
    first = [_img(src / f"{i}.jpg", (40 + i, 40)) for i in range(3)]
    out = tmp_path / "out" / "s.parquet"
    s1 = score_folders([src], str(trained_checkpoint), out, ScoreConfig(batch_size=2, workers=1, progress=False))
    assert s1.scored == 3 and s1.errors == 0
    before = {r["path"]: r for r in pq.read_table(out).to_pylist()}

    # an existing output is never replaced silently
    with pytest.raises(ConfigError, match="already exists.*--resume.*--overwrite"):
        score_folders([src], str(trained_checkpoint), out, ScoreConfig(progress=False))
    # a different top-k would mix list lengths in one file
    with pytest.raises(ConfigError, match="top-5"):
        plan_scoring([src], str(trained_checkpoint), out, ScoreConfig(top_k=2, resume=True))

    new = [_img(src / "sub" / f"n{i}.PNG", (30, 30 + i)) for i in range(2)]
    s2 = score_folders([src], str(trained_checkpoint), out,
                       ScoreConfig(batch_size=2, workers=1, resume=True, progress=False))
    assert (s2.scored, s2.skipped, s2.rows) == (2, 3, 5)
    after = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert set(after) == {str(p.absolute()) for p in first + new}
    for p in first:  # kept as they were, not rescored
        assert after[str(p.absolute())]["scored_at"] == before[str(p.absolute())]["scored_at"]

    s3 = score_folders([src], str(trained_checkpoint), out, ScoreConfig(resume=True, progress=False))
    assert s3.scored == 0 and s3.rows == 5  # nothing left to do; output untouched

    s4 = score_folders([src / "sub"], str(trained_checkpoint), out,
                       ScoreConfig(batch_size=8, workers=1, overwrite=True, progress=False))
    assert s4.scored == 2 and pq.read_table(out).num_rows == 2


@pytest.mark.parametrize("make", ["empty", "missing", "only_text"])
def test_empty_or_missing_folder_is_a_clear_error_and_no_output(make, trained_checkpoint, tmp_path):
    d = tmp_path / "in"
    if make != "missing":
        d.mkdir()
    if make == "only_text":
        (d / "readme.txt").write_text("x")
    out = tmp_path / "o.parquet"
    with pytest.raises(DataError, match="no images|folder not found"):
        score_folders([d], str(trained_checkpoint), out)
    assert not out.exists() and list(tmp_path.iterdir()) == ([d] if make != "missing" else [])


def test_cli_errors_are_one_line(folder, trained_checkpoint, tmp_path, capsys):
    from flowers.cli.main import main

    existing = tmp_path / "exists.parquet"
    existing.write_bytes(b"old")
    cases = [
        ([str(tmp_path / "nope"), "--model", str(trained_checkpoint), "--out", str(tmp_path / "a.parquet")],
         "folder not found"),
        ([str(folder["root"]), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "a.parquet")],
         "model not found"),
        ([str(folder["root"]), "--model", str(trained_checkpoint), "--out", str(existing)], "already exists"),
        ([str(folder["root"]), "--model", str(trained_checkpoint), "--out", str(existing), "--resume"],
         "cannot read existing output"),
        ([str(folder["root"]), "--model", str(trained_checkpoint), "--out", str(tmp_path), "--overwrite"],
         "is a folder"),
        ([str(folder["root"]), "--model", str(trained_checkpoint), "--out", str(tmp_path / "a.parquet"),
          "--top-k", "0"], "--top-k must be"),
    ]
    for argv, msg in cases:
        assert main(["score", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err, err
    assert existing.read_bytes() == b"old" and not (tmp_path / "a.parquet").exists()


def test_jobs_entry_point_error_exit(tmp_path):
    from flowers.runtime import worker_runtime_env

    env = {**os.environ, **worker_runtime_env()["env_vars"]}
    proc = subprocess.run([sys.executable, "-m", "jobs.score", str(tmp_path / "missing"), "--model", "x",
                           "--out", str(tmp_path / "o.parquet")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: folder not found: {tmp_path / 'missing'}"], proc.stderr


@pytest.fixture(scope="module")
def other_kinds(trained_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The ensemble and the exported INT8 student, built from the smoke checkpoint."""
    from flowers.training.ensemble import build_ensemble
    from flowers.inference.export import export_student
    from flowers.training.loop import load_checkpoint

    root = tmp_path_factory.mktemp("kinds")
    size = load_checkpoint(trained_checkpoint)["preprocessing"]["image_size"]
    calib = [torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8) for _ in range(2)]
    return {
        "ensemble": build_ensemble([str(trained_checkpoint), str(trained_checkpoint)], root / "ens", weights=[1, 2]),
        "student": export_student(trained_checkpoint, root / "student", calib, calibration_size=8, torchscript=False),
    }


@pytest.mark.parametrize("kind", ["ensemble", "student"])
def test_scorer_parity_for_ensemble_and_student(kind, other_kinds, folder):
    """The actor class gives what Predictor (and so Serve) gives, for every model kind."""
    from flowers.inference.predict import Predictor

    uri = str(other_kinds[kind])
    paths = [folder["a.jpg"], folder["c.png"], folder["bad:text.jpg"]]
    rows = Scorer(uri, top_k=3, threads=1)({"path": np.array([str(p) for p in paths], dtype=object)}).to_pylist()
    ref = Predictor.from_uri(uri).predict(paths, top_k=3)
    assert rows[2]["error"] and "error" in ref[2]
    for r, e in zip(rows[:2], ref[:2]):
        assert r["label"] == e["label"] and r["top_k_labels"] == [t["label"] for t in e["top_k"]]
        np.testing.assert_allclose(r["top_k_probs"], [t["probability"] for t in e["top_k"]], atol=1e-5)


@pytest.mark.parametrize("kind", ["checkpoint", "ensemble", "student"])
def test_plan_reads_metadata_only_and_names_the_model_as_the_scorer_does(kind, other_kinds, trained_checkpoint, folder,
                                                                         tmp_path, monkeypatch):
    """The driver's check loads no weights, and names the model as the actors will (resume relies on it)."""
    import flowers.inference.predict

    uri = str(trained_checkpoint if kind == "checkpoint" else other_kinds[kind])
    scorer = Scorer(uri, top_k=2, threads=1)

    def no_load(*a, **k):
        raise AssertionError("plan_scoring loaded the model")

    monkeypatch.setattr(flowers.inference.predict, "load_model", no_load)
    plan = plan_scoring([folder["root"]], uri, tmp_path / "o.parquet", ScoreConfig(top_k=2))
    assert (plan.model_name, plan.model_version) == (scorer.model_name, scorer.model_version)
    assert plan.model_uri == uri and plan.top_k == 2 and plan.listed == len(plan.todo) == 9


def test_write_scores_is_atomic(folder, trained_checkpoint, tmp_path):
    """Rows stream into a temp file renamed at the end; a failure midway leaves no output and no temp file."""
    from flowers.scoring.sinks import write_scores

    out = tmp_path / "w.parquet"
    plan = plan_scoring([folder["root"]], str(trained_checkpoint), out, ScoreConfig(top_k=2, progress=False))
    scorer = Scorer(plan.model_uri, top_k=plan.top_k, threads=1)
    batches = [scorer({"path": np.array(plan.todo[i:i + 4], dtype=object)}) for i in range(0, len(plan.todo), 4)]

    def failing():
        yield batches[0]
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        write_scores(plan, failing(), progress=False)
    assert list(tmp_path.iterdir()) == []
    summary = write_scores(plan, iter(batches), progress=False)
    table = pq.read_table(out)
    assert (summary.scored, summary.errors, summary.rows, table.num_rows) == (9, 3, 9, 9)
    assert table.schema.metadata[b"flowers.top_k"] == b"2" and list(tmp_path.iterdir()) == [out]


def _rows(path) -> dict[str, dict]:
    """Rows by path, without the per-run timestamp."""
    return {r["path"]: {k: v for k, v in r.items() if k != "scored_at"} for r in pq.read_table(path).to_pylist()}


@pytest.mark.slow
def test_in_process_and_ray_engines_write_the_same_rows(folder, scored, trained_checkpoint, ray_session, tmp_path):
    """A small local job scores in this process (no Ray Data); forced onto Ray Data actors, the same
    inputs give the same rows, the same schema and metadata, and both say where their seconds went."""
    summary, out = scored
    assert summary.extra["engine"] == "local" and summary.extra["phases"]["first_batch_s"] > 0
    assert {"plan_s", "model_load_s", "decode_s", "predict_s", "total_s"} <= set(summary.extra["phases"])
    ray_out = tmp_path / "ray.parquet"
    s = score_folders([folder["root"]], str(trained_checkpoint), ray_out,
                      ScoreConfig(batch_size=3, workers=2, cpus_per_worker=1, top_k=3, progress=False, engine="ray"))
    assert s.extra["engine"] == "ray" and {"connect_s", "first_batch_s"} <= set(s.extra["phases"])
    assert (s.scored, s.errors, s.rows) == (summary.scored, summary.errors, summary.rows)
    mine, theirs = _rows(out), _rows(ray_out)
    assert mine.keys() == theirs.keys()
    for p, r in mine.items():
        for k, v in r.items():
            if isinstance(v, list) and v and isinstance(v[0], float):
                np.testing.assert_allclose(v, theirs[p][k], atol=1e-5)
            elif isinstance(v, float):
                assert v == pytest.approx(theirs[p][k], abs=1e-5), (p, k)
            else:
                assert v == theirs[p][k], (p, k)
    assert pq.read_schema(out).metadata == pq.read_schema(ray_out).metadata


def test_scorer_decodes_before_the_model_loads_and_reports_its_load_error(folder, trained_checkpoint):
    """Given the preprocessing, a Scorer decodes while its model loads; a model that cannot load fails
    the batch's predict step with the loader's error, not the decode step."""
    from flowers.models.checkpoint import ModelLoadError
    from flowers.registry.uris import ModelRef, describe

    pp = describe(str(trained_checkpoint)).preprocessing
    broken = ModelRef(uri="gone", pinned="gone", source=str(folder["root"] / "no-such-model"), kind="checkpoint")
    scorer = Scorer(broken, top_k=2, threads=1, views=[pp])
    decoded = scorer.decode({"path": [str(folder["a.jpg"]), str(folder["bad:text.jpg"])]})
    assert decoded.ok == [0] and "not a recognised image" in decoded.cols["error"][1]
    with pytest.raises(ModelLoadError):
        scorer.predict(decoded)


@pytest.fixture(scope="module")
def registered_champion(trained_run, tmp_path_factory):
    """The smoke model registered as score-once@champion in an embedded store of its own."""
    import mlflow

    from flowers.registry import tracking as T
    from flowers.registry import uris as R

    old = mlflow.get_tracking_uri()
    target = R.embedded_target(tmp_path_factory.mktemp("score-store"))
    try:
        T.configure(target)
        tr = T.StudyTracker("score-once", target)
        run = tr.child("l1", "trial")
        version = tr.log_model_dir(run, trained_run.run_dir, "model", "score-once", alias=R.CHAMPION)
        tr.finish(run)
    finally:
        mlflow.set_tracking_uri(old)
    return target, version


@pytest.mark.slow
def test_models_uri_resolves_once_at_the_edge(folder, registered_champion, ray_session, tmp_path, monkeypatch):
    """`models:/NAME@ALIAS`: one registry lookup and one manifest read for the whole job, in this
    process; Ray Data actors get the resolved reference and need no tracking URI in their environment."""
    import flowers.inference.predict as P
    import flowers.models.checkpoint as C
    from flowers.registry import uris as R
    from flowers.registry.uris import ModelRef

    target, version = registered_champion
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    calls = {"resolve": 0, "lookup": 0, "manifest": 0}

    def counting(name, fn, key, only=None):
        def wrapper(*a, **k):
            if only is None or only(*a):
                calls[key] += 1
            return fn(*a, **k)
        monkeypatch.setattr(*name, wrapper)

    not_ref = lambda uri, *a: not isinstance(uri, ModelRef)  # noqa: E731 - a ModelRef passes straight through
    counting((R, "resolve_ref"), R.resolve_ref, "resolve", not_ref)
    counting((P, "resolve_ref"), P.resolve_ref, "resolve", not_ref)
    counting((R, "_version"), R._version, "lookup")
    counting((R, "read_json"), R.read_json, "manifest")  # the resolver reads the manifest with it
    counting((C, "read_manifest"), C.read_manifest, "manifest")
    uri = "models:/score-once@champion"
    out = tmp_path / "once.parquet"
    s = score_folders([folder["root"]], uri, out, ScoreConfig(top_k=2, progress=False, engine="local"), target=target)
    assert calls == {"resolve": 1, "lookup": 1, "manifest": 1}, calls
    assert s.model_uri == f"models:/score-once/{version}" and (s.scored, s.errors) == (9, 3)
    assert {r["model_version"] for r in pq.read_table(out).to_pylist()} == {version}

    ray_out = tmp_path / "once-ray.parquet"
    s2 = score_folders([folder["root"]], uri, ray_out,
                       ScoreConfig(top_k=2, progress=False, engine="ray", workers=1, cpus_per_worker=1), target=target)
    assert calls["lookup"] == 2 and calls["resolve"] == 2  # the driver's one, for the second job
    assert (s2.scored, s2.errors) == (9, 3) and _rows(ray_out) == _rows(out)


@pytest.mark.parametrize("kind", ["checkpoint", "ensemble", "student"])
def test_manifest_preprocessing_is_the_loaded_models(kind, other_kinds, trained_checkpoint, folder, tmp_path):
    """The scorers decode with the preprocessing the plan read from the manifest before the model
    loaded: it must be the loaded model's, for every kind (else rows would differ from Serve's)."""
    from flowers.inference.predict import Predictor
    from flowers.scoring.batch import Decoder

    uri = str(trained_checkpoint if kind == "checkpoint" else other_kinds[kind])
    plan = plan_scoring([folder["root"]], uri, tmp_path / "o.parquet", ScoreConfig())
    assert Decoder(plan.views).views == Predictor.from_ref(plan.model).model.views


def test_scorer_decodes_again_when_the_manifest_disagrees_with_the_model(folder, trained_checkpoint):
    """A manifest whose preprocessing is not the model's: the batch is decoded again the model's way
    (rows as the Predictor gives them), with one warning, and later batches decode that way at once."""
    from flowers.inference.predict import Predictor
    from flowers.registry.uris import describe

    pp = dict(describe(str(trained_checkpoint)).preprocessing)
    wrong = {**pp, "image_size": pp["image_size"] + 8, "resize_size": pp["resize_size"] + 8}
    scorer = Scorer(str(trained_checkpoint), top_k=2, threads=1, views=[wrong])
    paths = [str(folder["a.jpg"]), str(folder["c.png"])]
    rows = scorer({"path": paths}).to_pylist()
    assert scorer.decoder is None
    ref = Predictor.from_ref(str(trained_checkpoint)).predict(paths, top_k=2)
    for r, e in zip(rows, ref):
        np.testing.assert_allclose(r["top_k_probs"], [t["probability"] for t in e["top_k"]], atol=1e-5)


def test_scorer_sizes_its_onnx_session_without_touching_the_environment(other_kinds, folder, monkeypatch):
    """A 1-thread scorer in a 2-CPU process gets a 1-thread ONNX Runtime session, passed down the
    load path (`load_model(..., threads=)`), with OMP_NUM_THREADS never written: the in-process
    engine loads while its lanes decode, so a process-wide setting would race with them."""
    import os

    import flowers.inference.onnx_models as onnx_models

    sessions, real = [], onnx_models.onnx_session

    def spy(path, threads=None, precise=False):
        sessions.append((threads, os.environ.get("OMP_NUM_THREADS")))
        return real(path, threads, precise)

    monkeypatch.setattr(onnx_models, "onnx_session", spy)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    scorer = Scorer(str(other_kinds["student"]), top_k=2, threads=1, views=None)
    rows = scorer({"path": np.array([str(folder["a.jpg"])], dtype=object)}).to_pylist()
    assert rows[0]["error"] is None and rows[0]["label"] is not None
    assert sessions == [(1, "2")]
