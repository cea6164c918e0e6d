"""Real-photo OOD evaluation and the robustness step's pieces, on a smoke model and synthetic data
(the Flowers-102 figures come from `make run`; docs/robustness.md)."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flowers.evaluation import ood as O
from flowers.evaluation import ood_sources as S


def _rcc(files: dict[str, bytes], compress: set[str] = frozenset()) -> bytes:
    """A version-2 Qt resource bundle with one folder, written as rcc does (for the parser test)."""
    names, payload, entries = b"", b"", []

    def name(s: str) -> int:
        nonlocal names
        off = len(names)
        names += struct.pack(">HI", len(s), 0) + s.encode("utf-16-be")
        return off

    root_name, dir_name = 0, name("dir")
    kids = []
    for fname, data in files.items():
        flags = 0
        if fname in compress:
            data, flags = struct.pack(">I", len(data)) + zlib.compress(data), 1
        kids.append((name(fname), flags, len(payload)))
        payload += struct.pack(">I", len(data)) + data
    entries.append(struct.pack(">IHII", root_name, 2, 1, 1) + b"\0" * 8)
    entries.append(struct.pack(">IHII", dir_name, 2, len(kids), 2) + b"\0" * 8)
    for noff, flags, doff in kids:
        entries.append(struct.pack(">IHHHI", noff, flags, 0, 0, doff) + b"\0" * 8)
    tree = b"".join(entries)
    header = 20
    return b"qres" + struct.pack(">IIII", 2, header, header + len(tree), header + len(tree) + len(payload)) \
        + tree + payload + names


def test_rcc_parser_reads_plain_and_zlib_entries():
    blob = _rcc({"a.webp": b"hello", "b.txt": b"x" * 100}, compress={"b.txt"})
    assert S.rcc_files(blob) == {"dir/a.webp": b"hello", "dir/b.txt": b"x" * 100}
    with pytest.raises(ValueError, match="qres"):
        S.rcc_files(b"nope" + b"\0" * 20)


def test_copyright_stanzas_last_match_wins_and_webp_matches_jpg():
    text = ("Files: *\nCopyright: Team\nLicense: GPL-3+\n\n"
            "Files: src/a/dog.jpg\nCopyright: Ann\nLicense: CC-BY-SA-3.0\nComment: https://example/dog\n")
    st = S.copyright_stanzas(text)
    assert S.licence_of("src/a/dog.webp", st) == {"copyright": "Ann", "license": "CC-BY-SA-3.0",
                                                   "origin": "https://example/dog"}
    assert S.licence_of("src/a/cat.webp", st)["license"] == "GPL-3+"
    assert S.EXCLUDE_NAMES.search("butterfly.webp") and S.EXCLUDE_NAMES.search("sunflower2.webp")
    assert not S.EXCLUDE_NAMES.search("hammer1.webp")


def test_ood_folder_errors_are_one_line(tmp_path):
    from flowers.data import DataError

    with pytest.raises(DataError, match="folder not found"):
        O.ood_paths(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds 0 images"):
        O.ood_paths(tmp_path / "empty")


def test_score_table_separates_and_flags_at_the_rate():
    rng = np.random.default_rng(0)
    k = 10
    sure = np.full((200, k), 0.01)
    sure[np.arange(200), rng.integers(0, k, 200)] = 0.91
    flat = rng.dirichlet(np.ones(k) * 5, 50)
    t = O.score_table(O.Outputs(sure), O.Outputs(flat), threshold=0.5)
    assert t["entropy_auroc"] == pytest.approx(1.0) and t["msp_auroc"] == pytest.approx(1.0)
    assert "energy_auroc" not in t  # probabilities only: no energy
    assert t["entropy_in_flagged"] <= 0.05 and t["entropy_ood_flagged"] == 1.0
    z_in, z_out = rng.normal(0, 1, (200, k)) + 8 * np.eye(k)[rng.integers(0, k, 200)], rng.normal(0, 1, (50, k))
    p = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    both = O.score_table(O.Outputs(p(z_in), z_in), O.Outputs(p(z_out), z_out), threshold=0.5)
    assert both["energy_auroc"] > 0.95
    vote = O.mean_outputs([O.Outputs(p(z_in), z_in), O.Outputs(p(z_in), z_in)], [1.0, 1.0])
    from flowers.inference.uncertainty import uncertainty_score

    np.testing.assert_allclose(uncertainty_score(vote.probs, "energy", vote.logits),
                               uncertainty_score(p(z_in), "energy", z_in), rtol=1e-6)


@pytest.mark.slow
def test_shift_suite_and_ood_on_a_checkpoint_make_the_report_section(trained_checkpoint, smoke_config, tmp_path):
    from flowers.evaluation.robustness import run_shift_suite
    from flowers.evaluation.shifts import parse_shifts
    from flowers.study.robustness_step import flat_metrics, report_lines

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):  # stand-ins for the real photos (the real set: ood_sources, docs/robustness.md)
        Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    uris = {"m": str(trained_checkpoint)}
    suite = run_shift_suite(uris, parse_shifts("jpeg10,grayscale"), smoke_config.data, tmp_path / "out", per_class=2)
    ood = O.run_ood(uris, smoke_config.data, photos, tmp_path / "out")
    assert suite.images == 10 and set(suite.tables) == {"m"}
    t = ood.tables["m"]
    assert 0 <= t["entropy_auroc"] <= 1 and "energy_auroc" in t  # a torch checkpoint has logits
    assert json.loads((tmp_path / "out" / "ood.json").read_text())["m"]["stored_threshold"] == t["stored_threshold"]
    metrics, tags = flat_metrics(suite.tables, ood.tables, {"shift_suite": 1.0, "ood": 2.0})
    assert {"m.clean.top1", "m.jpeg10.flagged", "m.mean.top1", "m.worst.top1", "m.ood.msp_auroc"} <= set(metrics)
    text = "\n".join(report_lines({"metrics": metrics, "params": {"test_images": 10, "per_class": 2,
                                                                   "ood_photos": 6}, "tags": tags}))
    assert "| clean |" in text and "| worst |" in text and f"({tags['m.worst_shift']})" in text
    assert "Non-flower photos (6" in text


@pytest.mark.slow
def test_an_ensemble_is_scored_through_its_members(trained_checkpoint, smoke_config, tmp_path):
    """One pass gives each member (the levels) and the soft vote, equal to the ensemble's own predict_proba."""
    from flowers.training.ensemble import build_ensemble
    from flowers.evaluation.robustness import run_shift_suite, suite_models
    from flowers.evaluation.shifts import parse_shifts
    from flowers.inference.predict import load_model

    folder = build_ensemble([str(trained_checkpoint), str(trained_checkpoint)], tmp_path / "ens", [1.0, 3.0],
                            member_names=["a", "b"])
    models, ensembles, rules = suite_models("ensemble", str(folder))
    assert [m.name for m in models] == ["ensemble/a", "ensemble/b"]
    assert ensembles == {"ensemble": (["ensemble/a", "ensemble/b"], [1.0, 3.0])} and set(rules) == {
        "ensemble", "ensemble/a", "ensemble/b"}
    suite = run_shift_suite({"ensemble": str(folder)}, parse_shifts("small64"), smoke_config.data, tmp_path / "o",
                            per_class=1)
    assert set(suite.tables) == {"ensemble", "ensemble/a", "ensemble/b"}
    assert suite.tables["ensemble"][0]["top1"] == suite.tables["ensemble/a"][0]["top1"]  # same network twice
    ens = load_model(str(folder))
    photos = tmp_path / "p"
    photos.mkdir()
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(photos / "x.png")
    direct = O.run_model(ens, O.ood_paths(photos)).probs
    members = [O.run_model(m.model, O.ood_paths(photos)) for m in models]
    np.testing.assert_allclose(O.mean_outputs(members, [1.0, 3.0]).probs, direct, atol=1e-5)
