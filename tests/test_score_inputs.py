"""Batch scoring without Ray: inputs (folders, listings, prefixes), output rules, resources, bad input.

The pipeline itself runs in tests/test_score.py (single file), tests/test_score_dataset.py (part
files, S3, MLflow) and tests/test_score_cluster.py (the multi-node cluster, faults)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowers import storage
from flowers.config import ConfigError, ScoreConfig
from flowers.data import DataError
from flowers.scoring.batch import Scorer
from flowers.scoring.plan import ScorePlan, check_cluster_paths, output_state, plan_scoring
from flowers.scoring.reader import read_objects
from flowers.scoring.schema import MANIFEST, error_rows
from flowers.scoring.sources import by_filesystem, list_inputs
from jobs.score_ray import plan_resources


def _img(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(path)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for rel in ("a.jpg", "sub/b.PNG", "sub/deep/c.jpeg", ".hidden.jpg"):
        _img(root / rel)
    (root / "notes.txt").write_text("not an image")
    return root


def test_folders_text_and_parquet_listings(tree, tmp_path):
    """Folders recurse; a text listing names one path per line (relative to the listing, # comments);
    a Parquet listing names them in a column; every input once, sorted."""
    folder = sorted(str(p) for p in [tree / "a.jpg", tree / "sub/b.PNG", tree / "sub/deep/c.jpeg"])
    assert list_inputs([tree]) == folder

    listing = tree / "sub" / "list.txt"
    listing.write_text(f"# my images\n../a.jpg\n\n  deep/c.jpeg  \n{tree / 'a.jpg'}\nnotes-not-listed.bin\n")
    assert list_inputs([listing]) == sorted([str(tree / "a.jpg"), str(tree / "sub/deep/c.jpeg"),
                                             str(tree / "sub/notes-not-listed.bin")])
    # folder + listing: the union, each once
    assert list_inputs([tree, listing]) == sorted(set(folder) | {str(tree / "sub/notes-not-listed.bin")})
    assert list_inputs([tree / "a.jpg"]) == [str(tree / "a.jpg")]  # a single image

    pq.write_table(pa.table({"id": [1, 2], "path": [str(tree / "a.jpg"), "s3://bucket/x/y.jpg"]}),
                   tmp_path / "l.parquet")
    assert list_inputs([tmp_path / "l.parquet"]) == [str(tree / "a.jpg"), "s3://bucket/x/y.jpg"]
    pq.write_table(pa.table({"n": [1], "file": ["z.jpg"]}), tmp_path / "one.parquet")  # its only string column
    assert list_inputs([tmp_path / "one.parquet"]) == [str(tmp_path / "z.jpg")]
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "two.parquet")
    with pytest.raises(DataError, match="no column 'path'.*--path-column"):
        list_inputs([tmp_path / "two.parquet"])
    assert list_inputs([tmp_path / "two.parquet"], path_column="b") == [str(tmp_path / "y")]

    assert by_filesystem(["/a", "s3://b/c", "/d", "gs://e/f"]) == {"": ["/a", "/d"], "s3": ["s3://b/c"],
                                                                    "gs": ["gs://e/f"]}


def test_reader_turns_unreadable_objects_into_error_rows(tree, trained_checkpoint):
    """The read task never fails on one object: a missing file or a folder gets `read_error`, and the
    Scorer makes that an error row; one row out per input in, in order."""
    import pyarrow.fs as pafs

    uris = [str(tree / "a.jpg"), str(tree / "gone.jpg"), str(tree / "sub")]
    t = read_objects(pafs.LocalFileSystem(), uris)
    assert t.column("path").to_pylist() == uris and t.column("bytes")[0].as_py()
    assert t.column("read_error")[0].as_py() is None
    assert [e.startswith(f"cannot read {u}: ") for u, e in zip(uris[1:], t.column("read_error").to_pylist()[1:])] \
        == [True, True]
    rows = Scorer(str(trained_checkpoint), top_k=2, threads=1)(
        {k: np.array(t.column(k).to_pylist(), dtype=object) for k in t.column_names}).to_pylist()
    assert [r["path"] for r in rows] == uris and rows[0]["error"] is None and rows[0]["label"] is not None
    assert rows[1]["error"].startswith(f"cannot read {uris[1]}") and rows[1]["label"] is None
    assert rows[2]["error"].startswith(f"cannot read {uris[2]}")


@pytest.mark.parametrize("case,msg", [
    ("empty_listing", "names no inputs"),
    ("comments_only", "names no inputs"),
    ("missing_listing", "listing file not found"),
    ("missing_folder", "folder not found"),
    ("no_images", "no images"),
    ("binary_listing", "not UTF-8 text"),
    ("no_inputs", "no inputs given"),
])
def test_bad_inputs_are_one_line_errors(case, msg, tmp_path):
    src = {"empty_listing": tmp_path / "e.txt", "comments_only": tmp_path / "c.txt",
           "missing_listing": tmp_path / "gone.txt", "missing_folder": tmp_path / "gone",
           "no_images": tmp_path / "d", "binary_listing": tmp_path / "b.lst", "no_inputs": None}[case]
    if case == "empty_listing":
        src.write_text("")
    elif case == "comments_only":
        src.write_text("# nothing here\n\n")
    elif case == "no_images":
        src.mkdir()
        (src / "x.txt").write_text("x")
    elif case == "binary_listing":
        src.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=msg) as e:
        list_inputs([] if src is None else [src])
    assert "\n" not in str(e.value)


def test_output_rules(tree, tmp_path, trained_checkpoint):
    """Which layout, and when an existing output is refused; planning writes nothing."""
    model = str(trained_checkpoint)
    small = plan_scoring([tree], model, tmp_path / "s.parquet")
    assert small.layout == "file" and small.out == str(tmp_path / "s.parquet") and small.todo == list_inputs([tree])
    big = plan_scoring([tree], model, tmp_path / "big.parquet", ScoreConfig(dataset_threshold=2))
    assert big.layout == "dataset"  # more inputs than the threshold: a folder of part files
    (tmp_path / "empty").mkdir()
    assert plan_scoring([tree], model, tmp_path / "empty").layout == "dataset"
    assert output_state(str(tmp_path / "empty")) == "empty" and output_state(str(tmp_path / "nope")) == "absent"

    # a folder of ours (parts + manifest) is an existing output: refused without --resume/--overwrite
    ours = tmp_path / "ours"
    ours.mkdir()
    pq.write_table(error_rows(["/x.jpg"], "e {path}", "m", "1"), ours / "part-abc-000000-0.parquet")
    (ours / MANIFEST).write_text("{}")
    assert output_state(str(ours)) == "dataset"
    with pytest.raises(ConfigError, match="already exists; pass --resume.*--overwrite"):
        plan_scoring([tree], model, ours)
    (ours / "other.csv").write_text("x")
    with pytest.raises(ConfigError, match="is a folder that holds other files"):
        plan_scoring([tree], model, ours, ScoreConfig(overwrite=True))
    assert sorted(p.name for p in ours.iterdir()) == [MANIFEST, "other.csv", "part-abc-000000-0.parquet"]
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / "big.parquet").exists()


def test_resume_refuses_another_model_or_top_k(tree, tmp_path, trained_checkpoint):
    """Parts scored by another model version, or with another k, are never mixed with new rows."""
    model = str(trained_checkpoint)
    plan = plan_scoring([tree], model, tmp_path / "o", ScoreConfig(dataset_threshold=0))
    out = tmp_path / "o"
    out.mkdir()
    meta = plan.metadata()
    rows = error_rows([plan.todo[0]], "x", plan.model_name, "7", meta)  # same name, another version
    pq.write_table(rows, out / "part-a-000000-0.parquet")
    with pytest.raises(ConfigError, match=r"scored with .* v7, not .*resuming would mix models"):
        plan_scoring([tree], model, out, ScoreConfig(resume=True))
    good = error_rows([plan.todo[0]], "x", plan.model_name, plan.model_version,
                      {**meta, b"flowers.top_k": b"3"})
    pq.write_table(good, out / "part-a-000000-0.parquet")
    with pytest.raises(ConfigError, match="top-3 lists, not top-5"):
        plan_scoring([tree], model, out, ScoreConfig(resume=True))
    # the same model and k: the part is kept, its error row is retried, a partial part is noted for removal
    pq.write_table(error_rows([plan.todo[0]], "x", plan.model_name, plan.model_version, meta),
                   out / "part-a-000000-0.parquet")
    (out / "part-b-000000-0.parquet").write_bytes(b"PAR1 half a file")
    again = plan_scoring([tree], model, out, ScoreConfig(resume=True))
    assert again.broken == ["part-b-000000-0.parquet"] and [p.errors for p in again.parts] == [1]
    assert again.todo == plan.todo and again.layout == "dataset" and not again.committed


def test_resources_gpu_fallback_and_counts():
    """No GPUs in the cluster: CPU with a one-line note; with GPUs: one actor per G GPUs."""
    s = ScoreConfig(gpus_per_worker=1, batch_size=8)
    r = plan_resources(1000, s, {"CPU": 4.0}, [0, 2, 2])
    assert (r.device, r.gpus, r.workers, r.cpus) == ("cpu", 0.0, 4, 1.0)
    assert "no GPUs" in r.note and "scoring on CPU" in r.note and "\n" not in r.note
    r = plan_resources(1000, s, {"CPU": 16.0, "GPU": 2.0}, [16])
    assert (r.device, r.gpus, r.workers, r.cpus, r.note) == ("cuda", 1.0, 2, 1.0, None)
    r = plan_resources(1000, ScoreConfig(gpus_per_worker=0.5, cpus_per_worker=3), {"CPU": 16.0, "GPU": 2.0}, [16])
    assert (r.workers, r.cpus, r.gpus) == (4, 3.0, 0.5)
    assert plan_resources(10, s, {"CPU": 16.0, "GPU": 8.0}, [16]).workers == 2  # at most one per batch
    with pytest.raises(ConfigError, match="more than the 1 GPUs"):
        plan_resources(100, ScoreConfig(gpus_per_worker=2), {"CPU": 4.0, "GPU": 1.0}, [4])
    cpu = plan_resources(1000, ScoreConfig(), {"CPU": 2.0}, [0, 1, 1])  # the test cluster: 0-CPU head + 2 x 1
    assert (cpu.workers, cpu.cpus, cpu.gpus, cpu.note) == (2, 1.0, 0.0, None)


def test_engine_choice(tmp_path, monkeypatch):
    """auto: in-process for local images into one file on this machine; Ray Data for a named cluster,
    object storage, a dataset folder, GPUs or more than --local-max images. --engine forces one."""
    from jobs.score import choose_engine

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plan = ScorePlan([f"/in/{i}.jpg" for i in range(5)], str(tmp_path / "o.parquet"), "m", "m", "1", 5, 5)
    assert choose_engine(plan, ScoreConfig(), None)[0] == "local"
    assert choose_engine(plan, ScoreConfig(engine="ray"), None)[0] == "ray"
    cases = [(dict(address="ray://head:10001"), {}, "cluster was named"),
             ({}, dict(gpus_per_worker=1), "--gpus-per-worker"),
             ({}, dict(local_max=4), "--local-max 4")]
    for call, settings, why in cases:
        engine, reason = choose_engine(plan, ScoreConfig(**settings), call.get("address"))
        assert engine == "ray" and why in reason, reason
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert choose_engine(plan, ScoreConfig(), None)[0] == "ray"
    assert choose_engine(plan, ScoreConfig(engine="local"), None)[0] == "local"  # forced: this process
    monkeypatch.delenv("RAY_ADDRESS")
    for change in (dict(layout="dataset"), dict(todo=["s3://b/x.jpg"])):
        other = ScorePlan(**{**plan.__dict__, **change})
        assert choose_engine(other, ScoreConfig(), None)[0] == "ray"
        with pytest.raises(ConfigError, match="--engine local scores local images into one Parquet file"):
            choose_engine(other, ScoreConfig(engine="local"), None)


def test_driver_local_paths_refused_on_a_multi_node_cluster(tmp_path):
    plan = ScorePlan(["/x.jpg"], str(tmp_path / "o"), "m", "m", "1", 5, 1, layout="dataset",
                     sources=[str(tmp_path / "list.txt")])
    check_cluster_paths(plan, "/model", multi_node=False, shared_fs=False)  # one node: all fine
    check_cluster_paths(plan, "/model", multi_node=True, shared_fs=True)    # every node mounts them
    with pytest.raises(ConfigError, match="input /x.jpg is on the driver's disk.*--shared-fs"):
        check_cluster_paths(plan, "models:/m@champion", multi_node=True, shared_fs=False)
    plan.todo = ["s3://b/in/x.jpg"]  # named by a local listing: the workers read only the URIs
    with pytest.raises(ConfigError, match="--out .* workers write its part files.*s3://"):
        check_cluster_paths(plan, "models:/m@champion", multi_node=True, shared_fs=False)
    plan.layout = "file"  # the driver writes a single file itself
    check_cluster_paths(plan, "models:/m@champion", multi_node=True, shared_fs=False)
    with pytest.raises(ConfigError, match="--model /model is a path on the driver.*models:/"):
        check_cluster_paths(plan, "/model", multi_node=True, shared_fs=False)


def test_unreachable_object_store_is_one_line(tmp_path, monkeypatch, trained_checkpoint):
    """Nothing listens at the endpoint: a one-line StorageError, for inputs and for the output."""
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(storage.StorageError, match="is the object store running") as e:
        list_inputs(["s3://flowers/in"])
    assert "\n" not in str(e.value)
    _img(tmp_path / "in" / "a.jpg")
    with pytest.raises(storage.StorageError, match="is the object store running"):
        plan_scoring([tmp_path / "in"], str(trained_checkpoint), "s3://flowers/out")


def test_cli_bad_input_one_line_exit_2(tree, tmp_path, trained_checkpoint, capsys):
    from flowers.cli.main import main

    (tmp_path / "empty.txt").write_text("")
    model = str(trained_checkpoint)
    cases = [
        ([str(tmp_path / "empty.txt")], "names no inputs"),
        ([str(tree), "--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
        ([str(tree), "--part-rows", "0"], "--part-rows must be >= 1"),
    ]
    for extra, msg in cases:
        assert main(["score", *extra, "--model", model, "--out", str(tmp_path / "o.parquet")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err, err
    assert not (tmp_path / "o.parquet").exists()
