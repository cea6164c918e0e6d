"""The shift suite: each named shift on a decoded image, the spec parser, the suite runner and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flowers.evaluation import shifts as S
from flowers.evaluation.suite import CLEAN, markdown_table, stratified_subset, summarize


def _photo(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    """A smooth colourful test image with detail (an edge and a bright disc off-centre)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, 128 + 60 * np.sin(xx / 7.0)], -1)
    a[(xx - 0.3 * w) ** 2 + (yy - 0.4 * h) ** 2 < (0.15 * h) ** 2] = (250, 240, 30)
    a += rng.normal(0, 3, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


IMG = _photo()


# ---------------------------------------------------------------- every shift: pure, seeded, RGB, does something


@pytest.mark.parametrize("shift", S.SUITE, ids=lambda s: s.name)
def test_each_shift_is_pure_seeded_and_changes_the_image(shift):
    before = _arr(IMG).copy()
    a = S.apply_shift(IMG, shift, seed=(0, 3))
    b = S.apply_shift(IMG, shift, seed=(0, 3))
    assert np.array_equal(_arr(IMG), before), "the input image must not change"
    assert a.mode == "RGB" and np.array_equal(_arr(a), _arr(b)), "same seed, same pixels"
    if a.size == IMG.size:
        assert np.abs(_arr(a) - before).mean() > 0.5, f"{shift.name} left the image as it was"


def test_small_loses_detail_but_keeps_size():
    out = S.apply_shift(IMG, S.SHIFTS["small64"])
    assert out.size == IMG.size
    hf = lambda x: np.abs(np.diff(_arr(x), axis=1)).mean()  # noqa: E731 - high-frequency energy
    assert hf(out) < 0.8 * hf(IMG)
    assert hf(S.apply_shift(IMG, S.SHIFTS["small64"])) < hf(S.apply_shift(IMG, S.SHIFTS["small160"]))


def test_geometry_shifts_sizes():
    assert S.apply_shift(IMG, S.SHIFTS["upsample2x"]).size == (640, 480)
    assert S.apply_shift(IMG, S.SHIFTS["squash"]).size == (240, 240)
    w, h = S.apply_shift(IMG, S.SHIFTS["crop_center"]).size
    assert abs(w * h / (320 * 240) - 0.5) < 0.02
    assert S.apply_shift(IMG, S.SHIFTS["rotate90"]).size == (240, 320)
    w, h = S.apply_shift(IMG, S.SHIFTS["rotate15"]).size
    assert w < 320 and h < 240 and abs(w / h - 320 / 240) < 0.05  # cropped, same aspect, no empty corners
    zoom = _arr(S.apply_shift(IMG, S.SHIFTS["zoom_out"]))
    assert zoom.shape[:2] == (240, 320) and np.ptp(zoom[:20, :20].reshape(-1, 3), 0).max() == 0  # flat frame


def test_offcenter_crop_corner_follows_the_seed():
    corners = {S.apply_shift(IMG, S.SHIFTS["crop_offcenter"], seed=s).tobytes() for s in range(12)}
    assert 2 <= len(corners) <= 4


def test_photometric_shifts_directions():
    m = _arr(IMG).mean()
    assert _arr(S.apply_shift(IMG, S.SHIFTS["dark"])).mean() < 0.7 * m
    assert _arr(S.apply_shift(IMG, S.SHIFTS["bright"])).mean() > 1.1 * m
    assert _arr(S.apply_shift(IMG, S.SHIFTS["low_contrast"])).std() < 0.5 * _arr(IMG).std()
    warm, cool = _arr(S.apply_shift(IMG, S.SHIFTS["warm"])), _arr(S.apply_shift(IMG, S.SHIFTS["cool"]))
    assert warm[..., 0].mean() > cool[..., 0].mean() and warm[..., 2].mean() < cool[..., 2].mean()
    g = _arr(S.apply_shift(IMG, S.SHIFTS["grayscale"]))
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    noisy = S.apply_shift(IMG, S.SHIFTS["noise"], seed=1)
    assert 10 < np.abs(_arr(noisy) - _arr(IMG)).mean() < 30
    assert not np.array_equal(_arr(noisy), _arr(S.apply_shift(IMG, S.SHIFTS["noise"], seed=2)))
    blurred = S.apply_shift(IMG, S.SHIFTS["blur"])
    assert np.abs(np.diff(_arr(blurred), axis=1)).mean() < np.abs(np.diff(_arr(IMG), axis=1)).mean()
    assert np.abs(_arr(S.apply_shift(IMG, S.SHIFTS["jpeg10"])) - _arr(IMG)).mean() > \
        np.abs(_arr(S.apply_shift(IMG, S.SHIFTS["jpeg30"])) - _arr(IMG)).mean()


# ---------------------------------------------------------------- the spec


def test_parse_all_names_values_and_errors():
    assert [s.name for s in S.parse_shifts("all")] == [s.name for s in S.SUITE]
    two = S.parse_shifts("jpeg10, rotate15=30")
    assert [s.label for s in two] == ["jpeg10", "rotate15=30"] and two[1].value == 30
    assert len(S.parse_shifts("all,jpeg10")) == len(S.SUITE)
    with pytest.raises(S.ShiftError, match="unknown shift 'fog'"):
        S.parse_shifts("jpeg10,fog")
    with pytest.raises(S.ShiftError, match=r"jpeg10.*out of range \[1, 95\]"):
        S.parse_shifts("jpeg10=0")
    with pytest.raises(S.ShiftError, match="not a number"):
        S.parse_shifts("blur=big")
    with pytest.raises(S.ShiftError, match="no shift"):
        S.parse_shifts(" , ")


# ---------------------------------------------------------------- the table


def test_summarize_mean_worst_and_flags():
    labels = np.array([0, 1, 0, 1])
    sure = np.array([[0.99, 0.01], [0.01, 0.99], [0.99, 0.01], [0.01, 0.99]])
    unsure = np.array([[0.5, 0.5], [0.4, 0.6], [0.45, 0.55], [0.6, 0.4]])
    rows = summarize({CLEAN: sure, "a": sure, "b": unsure}, labels, threshold=0.5)
    by = {r["shift"]: r for r in rows}
    assert by[CLEAN]["top1"] == 1.0 and by[CLEAN]["flagged"] == 0.0
    assert by["b"]["top1"] == 0.5 and by["b"]["flagged"] == 1.0
    assert by["mean"]["top1"] == pytest.approx(0.75)
    assert rows[-1]["shift"] == "worst (b)" and rows[-1]["drop"] == pytest.approx(0.5)
    md = markdown_table({"m": rows})
    assert "| worst | 50.0 (b) | 100.0 |" in md


def test_stratified_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(4), 10)
    idx = stratified_subset(labels, 3, seed=1)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3, 3]
    assert np.array_equal(idx, stratified_subset(labels, 3, seed=1))
    assert len(stratified_subset(labels, None)) == 40


# ---------------------------------------------------------------- end to end on a smoke model


@pytest.mark.slow
def test_cli_shift_suite_on_a_checkpoint_logs_once(trained_checkpoint, synth_root, tmp_path, capsys, monkeypatch):
    from flowers.cli.main import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(trained_checkpoint), "--data", str(synth_root), "--shifts",
               "jpeg10,small64,grayscale", "--out", str(out), "--experiment", "robust-test"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| clean |" in text and "| jpeg10 |" in text and "| worst |" in text
    rows = json.loads(next(out.glob("shifts_*.json")).read_text())
    assert [r["shift"] for r in rows][:4] == [CLEAN, "jpeg10", "small64", "grayscale"]
    assert all(0 <= r["top1"] <= 1 and 0 <= r["flagged"] <= 1 for r in rows)
    assert next(out.glob("shifts_*.png")).stat().st_size > 5000
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("robust-test")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and any(k.endswith("shift_mean_top1") for k in runs[0].data.metrics)


@pytest.mark.parametrize("spec,msg", [("fog", "unknown shift 'fog'"), ("jpeg10=500", "out of range")])
def test_cli_bad_shift_one_line_exit_2_nothing_logged(spec, msg, tmp_path, capsys, monkeypatch):
    from flowers.cli.main import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rc = main(["evaluate", "--model", str(tmp_path / "nowhere"), "--shifts", spec, "--out", str(tmp_path / "o"),
               "--experiment", "robust-test"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "o").exists()


def test_the_robustness_run_describes_itself():
    from flowers.registry.run_notes import describe_robustness, study_note

    text = describe_robustness(["blur", "jpeg10"], 204, {"ensemble": "models:/flowers-ensemble/1"}, 238)
    assert "ensemble (models:/flowers-ensemble/1)" in text and "blur, jpeg10" in text and "204" in text
    assert "unknown" in describe_robustness([], 0, {}, 0)  # missing facts are said, not invented
    note = study_note("s", ["l1"], ["tune", "ensemble", "distill"])
    assert "Stages after the trials: ensemble, distill" in note
