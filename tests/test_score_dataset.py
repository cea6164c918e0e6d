"""Batch scoring into a dataset folder of part files (local Ray): commit marker written last, resume
after a crash keeps complete parts, object storage in and out, the summary and its MLflow run."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowers.config import ScoreConfig
from flowers.scoring.schema import MANIFEST, SUMMARY
from flowers.scoring.sinks import read_dataset
from jobs.score import score_folders

pytestmark = pytest.mark.slow


def _img(path: Path, i: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(i)
    Image.fromarray((rng.random((40 + i % 7, 48, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _parts(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


def _once(table, expected: list[str]) -> None:
    counts = Counter(table.column("path").to_pylist())
    assert sorted(counts) == sorted(expected) and set(counts.values()) == {1}, counts.most_common(3)


def test_dataset_folder_commit_crash_and_resume(trained_checkpoint, ray_session, tmp_path):
    src = tmp_path / "in"
    imgs = [str(_img(src / f"{i:02d}.jpg", i)) for i in range(14)]
    (src / "bad.jpg").write_text("not an image")
    expected = sorted(imgs + [str(src / "bad.jpg")])
    out = tmp_path / "scores"
    model = str(trained_checkpoint)
    settings = ScoreConfig(batch_size=4, workers=2, cpus_per_worker=1, part_rows=4, dataset_threshold=10,
                           progress=False)
    s1 = score_folders([src], model, out, settings)  # 15 inputs > threshold 10: a folder of parts
    assert s1.layout == "dataset" and (s1.scored, s1.errors, s1.rows) == (15, 1, 15)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == 15 and manifest["errors"] == 1 and manifest["top_k"] == 5
    assert manifest["model_uri"] == model and manifest["schema_version"] == 1
    assert sorted(p["name"] for p in manifest["parts"]) == sorted(_parts(out)) and len(manifest["parts"]) >= 2
    _once(pq.read_table(out), expected)  # pyarrow reads the folder (skips _manifest.json, _summary.json)
    _once(read_dataset(str(out)), expected)
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["rows"] == 15 and summary["errors"] == 1 and summary["images_per_s"] > 0
    assert 0 <= summary["uncertain_share"] <= 1 and summary["layout"] == "dataset"

    # a crash: the manifest never written, one part cut short mid-write, one never written; new images came
    parts = sorted(_parts(out))
    (out / MANIFEST).unlink()
    cut = out / parts[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    lost = set(pq.read_table(out / parts[1]).column("path").to_pylist())
    (out / parts[1]).unlink()
    new = [str(_img(src / "more" / f"n{i}.png", 100 + i)) for i in range(3)]
    expected = sorted(expected + new)
    kept = {n: t for n, t in _parts(out).items() if n != parts[0]}
    kept_rows = {r["path"]: r["scored_at"] for n in kept for r in pq.read_table(out / n).to_pylist()}
    bad_part = next(n for n in kept if "bad.jpg" in str(pq.read_table(out / n).column("path").to_pylist()))

    s2 = score_folders([src], model, out, ScoreConfig(**{**settings.__dict__, "resume": True}))
    table = pq.read_table(out)
    _once(table, expected)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == len(expected) == s2.rows and s2.skipped == len(kept_rows) - 1
    # complete parts stay as they were (the one holding the error row is rewritten without it)
    for name in kept:
        assert name in {p["name"] for p in manifest["parts"]} or name == bad_part
        if name != bad_part:
            assert _parts(out)[name] == kept[name]
    rows = {r["path"]: r for r in table.to_pylist()}
    for p, when in kept_rows.items():
        if p != str(src / "bad.jpg"):
            assert rows[p]["scored_at"] == when  # not scored again
    assert lost <= set(rows) and all(rows[p]["error"] is None for p in new)
    assert rows[str(src / "bad.jpg")]["error"]  # retried, still an error row, still once
    assert not cut.exists() or cut.name in {p["name"] for p in manifest["parts"]}

    # again: only the error row is tried again; every other part is left alone
    before = _parts(out)
    s3 = score_folders([src], model, out, ScoreConfig(**{**settings.__dict__, "resume": True}))
    assert (s3.scored, s3.errors, s3.rows, s3.skipped) == (1, 1, len(expected), len(expected) - 1)
    _once(pq.read_table(out), expected)
    after = _parts(out)
    assert sum(before[n] == after.get(n) for n in before) >= len(before) - 1


def test_object_storage_in_and_out_with_summary_run(trained_checkpoint, ray_session, s3_server, tmp_path):
    """s3:// prefix + a listing (with a missing entry) + a local folder → an s3:// dataset; the summary
    sits next to it and is logged as a run of the flowers-scoring experiment."""
    import boto3
    from mlflow import MlflowClient

    from flowers import storage
    from flowers.registry.uris import resolve_target

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL_S3"])
    remote = []
    for i in range(6):
        p = _img(tmp_path / "up" / f"r{i}.jpg", 200 + i)
        s3.put_object(Bucket="flowers", Key=f"score-in/{p.name}", Body=p.read_bytes())
        remote.append(f"s3://flowers/score-in/{p.name}")
    s3.put_object(Bucket="flowers", Key="score-in/broken.png", Body=b"\x89PNG\r\n\x1a\n truncated")
    remote.append("s3://flowers/score-in/broken.png")
    s3.put_object(Bucket="flowers", Key="lists/extra.txt",
                  Body=b"# relative to the listing\n../score-in/r0.jpg\ns3://flowers/nowhere/gone.jpg\n")
    local = [str(_img(tmp_path / "loc" / f"l{i}.jpg", 300 + i)) for i in range(2)]
    tracking = resolve_target(f"sqlite:///{tmp_path / 'mlflow.db'}")

    out = "s3://flowers/scores/run1"
    s = score_folders(["s3://flowers/score-in", "s3://flowers/lists/extra.txt", str(tmp_path / "loc")],
                      str(trained_checkpoint), out,
                      ScoreConfig(batch_size=4, workers=2, cpus_per_worker=1, part_rows=4, progress=False),
                      tracking=tracking)
    expected = sorted(remote + local + ["s3://flowers/nowhere/gone.jpg"])
    assert s.layout == "dataset" and (s.scored, s.errors) == (10, 2)
    table = read_dataset(out)
    _once(table, expected)
    fs, path = storage.filesystem(out)
    _once(pq.read_table(path, filesystem=fs), expected)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows["s3://flowers/nowhere/gone.jpg"]["error"].startswith("cannot read s3://flowers/nowhere/gone.jpg: ")
    assert "s3://flowers/score-in/broken.png" in rows["s3://flowers/score-in/broken.png"]["error"]
    assert all(rows[p]["error"] is None for p in remote[:-1] + local)
    summary = json.loads(storage.read_bytes(f"{out}/{SUMMARY}"))
    assert summary["rows"] == 9 + 1 and summary["errors"] == 2 and summary["scored"] == 10

    c = MlflowClient(tracking.tracking_uri)
    run = c.get_run(s.extra["mlflow_run_id"])
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "flowers-scoring" and run.info.status == "FINISHED"
    assert run.data.metrics["rows"] == 10 and run.data.metrics["errors"] == 2
    assert run.data.metrics["uncertain_share"] == pytest.approx(summary["uncertain_share"])
    assert run.data.metrics["images_per_s"] > 0 and run.data.params["output"] == out
    assert run.data.params["model_uri"] == str(trained_checkpoint) and run.data.tags["flowers.role"] == "scoring"

    # bad input on object storage: one-line errors, nothing written
    from flowers.config import ConfigError
    from flowers.data import DataError
    from flowers.scoring.sources import list_inputs

    s3.put_object(Bucket="flowers", Key="lists/empty.txt", Body=b"# nothing\n")
    for src, msg in [("s3://flowers/no-such-prefix", "nothing at s3://flowers/no-such-prefix"),
                     ("s3://flowers/lists/empty.txt", "names no inputs"),
                     ("s3://no-such-bucket/x", "nothing at s3://no-such-bucket/x|create the bucket")]:
        with pytest.raises((DataError, storage.StorageError), match=msg):
            list_inputs([src])
    with pytest.raises(ConfigError, match="is an object"):
        score_folders(["s3://flowers/score-in"], str(trained_checkpoint), "s3://flowers/lists/empty.txt")

    # an existing prefix is refused without --resume/--overwrite; --overwrite replaces it

    with pytest.raises(ConfigError, match="already exists"):
        score_folders(["s3://flowers/score-in"], str(trained_checkpoint), out, ScoreConfig(progress=False))
    s2 = score_folders(["s3://flowers/score-in"], str(trained_checkpoint), out,
                       ScoreConfig(batch_size=8, workers=1, overwrite=True, progress=False))
    _once(read_dataset(out), sorted(remote))
    assert s2.rows == 7
