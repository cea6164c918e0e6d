"""Tests for flowers.data: VGG reader, splits, folders, decoding. Tiny synthetic data, no network."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from flowers.data import (
    MAX_IMAGE_PIXELS,
    DataError,
    ImageDecodeError,
    LabeledImages,
    class_names,
    list_images,
    load_image_folder,
    load_split,
    load_vgg,
    make_split,
    open_image,
    resolve_data_root,
    save_split,
    subset_classes,
    verify_report,
    write_synthetic,
)

NUM_CLASSES, PER_CLASS = 4, 9


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "flowers"
    write_synthetic(root, num_classes=NUM_CLASSES, per_class=PER_CLASS, size=48, seed=0)
    return root


@pytest.fixture
def copy_root(synth_root, tmp_path) -> Path:
    """A private, mutable copy of the synthetic dataset."""
    dst = tmp_path / "copy"
    shutil.copytree(synth_root, dst)
    return dst


# ---------------------------------------------------------------- VGG reader / synthetic writer


def test_synthetic_layout_and_load(synth_root):
    n = NUM_CLASSES * PER_CLASS
    assert sorted(p.name for p in (synth_root / "jpg").iterdir()) == [f"image_{i:05d}.jpg" for i in range(1, n + 1)]
    labels = scipy.io.loadmat(synth_root / "imagelabels.mat")["labels"]
    assert labels.shape == (1, n) and labels.min() == 1 and labels.max() == NUM_CLASSES
    setid = scipy.io.loadmat(synth_root / "setid.mat")
    assert all(setid[k].shape[0] == 1 for k in ("trnid", "valid", "tstid"))
    assert not list(synth_root.parent.glob(".tmp-*"))  # built in a temp dir and renamed

    ds = load_vgg(synth_root)
    assert len(ds.paths) == n and ds.paths[0] == synth_root / "jpg" / "image_00001.jpg"
    assert ds.labels.dtype == np.int64 and set(ds.labels.tolist()) == set(range(NUM_CLASSES))
    assert ds.num_classes == NUM_CLASSES and len(ds.class_names) == NUM_CLASSES
    assert ds.class_names[0].startswith("synthetic")
    allids = np.concatenate(list(ds.setid.values()))
    assert sorted(allids.tolist()) == list(range(n))  # covers everything, disjoint
    for part in ("train", "val", "test"):
        assert len(np.unique(ds.labels[ds.setid[part]])) == NUM_CLASSES
    assert len(ds.setid["train"]) == NUM_CLASSES * (PER_CLASS // 3)


def test_synthetic_is_deterministic_and_refuses_nonempty(tmp_path, synth_root):
    ds = write_synthetic(tmp_path / "again", num_classes=NUM_CLASSES, per_class=PER_CLASS, size=48, seed=0)
    assert np.array_equal(ds.labels, load_vgg(synth_root).labels)
    with pytest.raises(DataError, match="not empty"):
        write_synthetic(tmp_path / "again")


def test_synthetic_classes_are_distinguishable(synth_root):
    # mean colour alone should separate classes: a nearest-centroid check on train -> test
    ds = load_vgg(synth_root)
    feats = np.stack([np.asarray(Image.open(p), dtype=np.float32).reshape(-1, 3).mean(0) for p in ds.paths])
    tr, te = ds.setid["train"], ds.setid["test"]
    cent = np.stack([feats[tr][ds.labels[tr] == c].mean(0) for c in range(NUM_CLASSES)])
    pred = np.argmin(((feats[te][:, None] - cent[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.labels[te]).mean() > 0.5  # chance is 0.25


def test_missing_root():
    with pytest.raises(DataError, match="not found"):
        load_vgg("/nonexistent/flowers")


def test_missing_jpg_named(copy_root):
    (copy_root / "jpg" / "image_00003.jpg").unlink()
    with pytest.raises(DataError, match=r"missing.*image_00003\.jpg"):
        load_vgg(copy_root)
    load_vgg(copy_root, check_files=False)  # the file check is what catches it


def test_missing_jpg_folder(copy_root):
    shutil.rmtree(copy_root / "jpg")
    with pytest.raises(DataError, match="jpg"):
        load_vgg(copy_root)


def test_label_count_mismatch(copy_root):
    labels = scipy.io.loadmat(copy_root / "imagelabels.mat")["labels"]
    scipy.io.savemat(copy_root / "imagelabels.mat", {"labels": labels[:, :-1]})
    with pytest.raises(DataError, match=r"imagelabels\.mat has 35 labels.*36 images"):
        load_vgg(copy_root)


@pytest.mark.parametrize("name", ["imagelabels.mat", "setid.mat"])
def test_corrupt_mat(copy_root, name):
    (copy_root / name).write_bytes(b"this is not a MATLAB file" * 10)
    with pytest.raises(DataError, match=rf"{name.replace('.', r'.')}"):
        load_vgg(copy_root)


def test_missing_mat(copy_root):
    (copy_root / "setid.mat").unlink()
    with pytest.raises(DataError, match=r"missing .*setid\.mat"):
        load_vgg(copy_root)


def test_missing_key(copy_root):
    scipy.io.savemat(copy_root / "imagelabels.mat", {"labelz": np.ones((1, 36), np.uint8)})
    with pytest.raises(DataError, match=r"imagelabels\.mat has no 'labels'"):
        load_vgg(copy_root)


@pytest.mark.parametrize(
    "value, match",
    [(0, r"imagelabels\.mat: labels must be >= 1"), (2.5, r"imagelabels\.mat.*non-integer"), (9, r"class_names\.json")],
)
def test_bad_labels(copy_root, value, match):
    labels = scipy.io.loadmat(copy_root / "imagelabels.mat")["labels"].astype(np.float64)
    labels[0, 4] = value
    scipy.io.savemat(copy_root / "imagelabels.mat", {"labels": labels})
    with pytest.raises(DataError, match=match):
        load_vgg(copy_root)


def test_setid_out_of_range_and_overlap(copy_root):
    s = {k: v for k, v in scipy.io.loadmat(copy_root / "setid.mat").items() if not k.startswith("__")}
    bad = dict(s, tstid=np.array([[1, 999]], np.uint16))
    scipy.io.savemat(copy_root / "setid.mat", bad)
    with pytest.raises(DataError, match=r"setid\.mat: 'tstid' has ids outside 1\.\.36"):
        load_vgg(copy_root)
    overlap = dict(s, tstid=s["trnid"])
    scipy.io.savemat(copy_root / "setid.mat", overlap)
    with pytest.raises(DataError, match="overlap"):
        load_vgg(copy_root)


def test_class_names_fallbacks(copy_root):
    (copy_root / "class_names.json").unlink()
    assert load_vgg(copy_root).class_names == [f"class_{i}" for i in range(NUM_CLASSES)]
    (copy_root / "class_names.json").write_text(json.dumps(["a", "b", "c", "d"]))
    assert load_vgg(copy_root).class_names == ["a", "b", "c", "d"]


def test_packaged_class_names():
    names = class_names()
    assert len(names) == 102 and names[0] == "pink primrose" and len(set(names)) == 102


def test_verify_report(synth_root):
    ds = load_vgg(synth_root)
    text = verify_report(ds)
    assert f"images: {NUM_CLASSES * PER_CLASS}" in text and f"classes: {NUM_CLASSES}" in text
    assert "train=12, val=12, test=12" in text and ds.class_names[3] in text
    rnd = make_split(ds.labels, "random", seed=1)
    assert f"train={len(rnd['train'])}" in verify_report(ds, rnd)


def test_resolve_data_root(tmp_path, monkeypatch):
    assert resolve_data_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("FLOWERS_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    monkeypatch.setenv("FLOWERS_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"flowers data download.*FLOWERS_DATA"):
        resolve_data_root(None)
    monkeypatch.delenv("FLOWERS_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"\.cache/flowers/flowers102"):
        resolve_data_root(None)
    (tmp_path / ".cache/flowers/flowers102").mkdir(parents=True)
    assert resolve_data_root(None) == tmp_path / ".cache/flowers/flowers102"


# ---------------------------------------------------------------- splits


@pytest.fixture
def uneven_labels() -> np.ndarray:
    rng = np.random.default_rng(3)
    counts = rng.integers(5, 60, size=12)
    return rng.permutation(np.repeat(np.arange(12), counts))


def test_random_split_sizes_and_stratification(uneven_labels):
    split = make_split(uneven_labels, "random", seed=0)
    n = len(uneven_labels)
    assert set(split) == {"train", "val", "test"}
    assert len(split["val"]) == round(n * 0.1) and len(split["test"]) == round(n * 0.1)
    allids = np.concatenate(list(split.values()))
    assert sorted(allids.tolist()) == list(range(n))
    for part, ids in split.items():
        assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0), part
        assert set(uneven_labels[ids].tolist()) == set(range(12)), part


def test_random_split_seeds(uneven_labels):
    a = make_split(uneven_labels, "random", seed=5)
    b = make_split(uneven_labels, "random", seed=5)
    c = make_split(uneven_labels, "random", seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    assert all(len(a[k]) == len(c[k]) for k in a)  # sizes do not depend on the seed


def test_random_split_small_classes():
    labels = np.repeat(np.arange(3), [3, 4, 30])
    split = make_split(labels, "random")
    for ids in split.values():
        assert set(labels[ids].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="at least 3"):
        make_split(np.repeat(np.arange(2), [2, 30]), "random")


def test_official_split_and_errors(synth_root):
    ds = load_vgg(synth_root)
    split = make_split(ds.labels, "official", setid=ds.setid)
    assert all(np.array_equal(split[k], np.sort(ds.setid[k])) for k in ("train", "val", "test"))
    with pytest.raises(ValueError, match="official.*random"):
        make_split(ds.labels, "kfold")
    with pytest.raises(ValueError, match="setid"):
        make_split(ds.labels, "official")
    with pytest.raises(ValueError, match="fractions"):
        make_split(ds.labels, "random", fractions=(0.5, 0.2, 0.2))


def test_save_load_split(tmp_path, uneven_labels):
    split = make_split(uneven_labels, "random", seed=2)
    path = save_split(split, tmp_path / "sub" / "split.json")
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp files left
    back = load_split(path)
    assert all(np.array_equal(split[k], back[k]) for k in split)
    (tmp_path / "bad.json").write_text('{"train": [1, -2]}')
    with pytest.raises(DataError, match="bad.json"):
        load_split(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "missing.json")


def test_subset_classes(uneven_labels):
    split = make_split(uneven_labels, "random")
    sub, k = subset_classes(uneven_labels, split, 3)
    assert k == 3
    for part in split:
        assert set(uneven_labels[sub[part]].tolist()) == {0, 1, 2}
        assert np.array_equal(sub[part], split[part][uneven_labels[split[part]] < 3])
    full, k = subset_classes(uneven_labels, split, None)
    assert k == 12 and all(np.array_equal(full[p], split[p]) for p in split)


# ---------------------------------------------------------------- folders


def _img(path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (200, 10, 10)).save(path, format=fmt)
    return path


def test_list_images(tmp_path):
    a = _img(tmp_path / "a" / "x.jpg")
    b = _img(tmp_path / "a" / "deep" / "er" / "Y.PNG")
    c = _img(tmp_path / "b" / "z.JpEg", fmt="JPEG")
    (tmp_path / "a" / "notes.txt").write_text("hi")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"junk")
    (tmp_path / "a" / "folder.jpg").mkdir()  # a directory named like an image
    assert list_images([tmp_path / "a", tmp_path / "b"]) == sorted([a, b, c])
    assert list_images([tmp_path / "a"], recursive=False) == [a]
    assert list_images(str(tmp_path / "b")) == [c]
    with pytest.raises(DataError, match="folder not found: .*missing"):
        list_images([tmp_path / "missing"])


def test_load_image_folder(tmp_path):
    _img(tmp_path / "tulip" / "1.jpg")
    _img(tmp_path / "tulip" / "sub" / "2.png")
    _img(tmp_path / "daisy" / "3.jpg")
    (tmp_path / "README.txt").write_text("ignored")
    f = load_image_folder(tmp_path)
    assert f.class_names == ["daisy", "tulip"]
    assert f.labels.tolist() == [0, 1, 1] and len(f.paths) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path / "tulip" / "sub")


def test_labeled_images(synth_root):
    ds = load_vgg(synth_root)

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    d = LabeledImages(ds.paths[:5], ds.labels[:5], to_tensor, draft_size=32)
    x, y, i = d[3]
    assert x.shape == (3, 48, 48) and y == int(ds.labels[3]) and i == 3 and len(d) == 5
    x, y, i = LabeledImages(ds.paths[:5], None, to_tensor)[0]
    assert y == -1 and i == 0
    batch = next(iter(torch.utils.data.DataLoader(d, batch_size=5)))
    assert batch[0].shape == (5, 3, 48, 48) and batch[2].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- decoding


def _jpeg_bytes(w, h, seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def test_draft_mode_decodes_smaller(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg_bytes(1024, 1024))
    full = open_image(path)
    assert full.size == (1024, 1024) and full.mode == "RGB"
    small = open_image(path, draft_size=224)
    assert small.mode == "RGB" and small.size == (256, 256)  # DCT scale 1/4, still >= 224
    wide = open_image(_jpeg_bytes(1024, 700), draft_size=224)
    assert min(wide.size) >= 224 and wide.size[0] < 1024
    # PNGs have no draft mode: decoded at full size
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    assert open_image(buf.getvalue(), draft_size=64).size == (300, 300)


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes(256, 256)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"truncated or corrupt: .*cut\.jpg"):
        open_image(path)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        open_image(data[: len(data) // 2], draft_size=64)


def test_not_an_image_empty_missing(tmp_path):
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        open_image(b"hello, this is text and not an image")
    with pytest.raises(ImageDecodeError, match="empty"):
        open_image(b"")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty.*zero\.jpg"):
        open_image(tmp_path / "zero.jpg")
    with pytest.raises(ImageDecodeError, match=r"not found.*nope\.jpg"):
        open_image(str(tmp_path / "nope.jpg"))
    assert issubclass(ImageDecodeError, DataError)


def _png_declaring(w: int, h: int) -> bytes:
    """A tiny real PNG whose IHDR is patched to claim ``w`` x ``h`` (CRC recomputed)."""
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("w, h", [(60000, 60000), (8000, 8000)])
def test_decompression_bomb(w, h):
    with pytest.raises(ImageDecodeError, match=f"exceeds the {MAX_IMAGE_PIXELS:,} pixel limit"):
        open_image(_png_declaring(w, h))


def test_bomb_message_names_size():
    with pytest.raises(ImageDecodeError, match=r"declared size 8000x8000"):
        open_image(_png_declaring(8000, 8000))


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "CMYK", "I;16"])
def test_modes_to_rgb(tmp_path, mode):
    img = Image.new(mode, (10, 8))
    if mode == "P":
        img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = open_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (10, 8)


def test_open_image_closes_file(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg_bytes(64, 64))
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    for _ in range(20):
        open_image(path, draft_size=32)
    after = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    assert after <= before + 1


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(
    not (os.environ.get("FLOWERS_DATA") and Path(os.environ["FLOWERS_DATA"]).is_dir()),
    reason="set FLOWERS_DATA to a Flowers-102 copy",
)
def test_real_flowers102():
    ds = load_vgg(os.environ["FLOWERS_DATA"])
    assert len(ds.paths) == 8189 and len(ds.labels) == 8189 and ds.num_classes == 102
    assert {k: len(v) for k, v in ds.setid.items()} == {"train": 1020, "val": 1020, "test": 6149}
    assert ds.class_names == class_names()
    for seed in (0, 1):
        split = make_split(ds.labels, "random", seed=seed)
        assert {k: len(v) for k, v in split.items()} == {"train": 6551, "val": 819, "test": 819}
        for ids in split.values():
            assert len(np.unique(ds.labels[ids])) == 102
    official = make_split(ds.labels, "official", setid=ds.setid)
    for ids in official.values():
        assert len(np.unique(ds.labels[ids])) == 102
    img = open_image(ds.paths[0], draft_size=128)
    assert img.mode == "RGB" and min(img.size) >= 128
    sub, k = subset_classes(ds.labels, official, 10)
    assert k == 10 and len(sub["train"]) == 100
