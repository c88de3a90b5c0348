"""Tests of train.data: layouts, patient ids, split protocols, sampling, augmentation, caching.

Every dataset here is a handful of tiny PNGs written into ``tmp_path``, so the whole file runs
in a few seconds.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import train.data as D
from model.contract import InputContract
from train.data import (
    PAPER_WARNING,
    Augment,
    EpochSampler,
    Framer,
    KneeDataset,
    make_splits,
    parse_patient,
    prepare_all,
    scan,
)

SIZE = 32
CONTRACT = InputContract(input_size=SIZE)


def _png(path: Path, seed: int, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def _split_layout(root: Path, per: int = 2) -> Path:
    """ROOT/<split>/<grade>/<pid><L|R>.png, every split and grade, distinct patients per split."""
    n = 0
    for si, split in enumerate(("train", "val", "test", "auto_test")):
        for g in range(5):
            for i in range(per):
                n += 1
                _png(root / split / str(g) / f"{9000000 + 1000 * si + 10 * g + i}L.png", n)
    return root


def _paired_plain_layout(root: Path, patients_per_grade: int = 12) -> Path:
    """ROOT/<grade>/<pid><L|R>.png: every patient has both knees, sometimes of different grades."""
    n = 0
    for g in range(5):
        for i in range(patients_per_grade):
            pid = 9100000 + 100 * g + i
            other = g if i % 3 else (g + 1) % 5  # a third of the patients have knees of two grades
            for side, grade in (("L", g), ("R", other)):
                n += 1
                _png(root / str(grade) / f"{pid}{side}.png", n)
    return root


# --------------------------------------------------------------------------- scan / parse_patient
def test_scan_split_layout(tmp_path: Path) -> None:
    root = _split_layout(tmp_path / "koa")
    (root / "train" / "0" / "notes.txt").write_text("not an image")
    (root / "train" / "0" / "sub.png").mkdir()  # a folder with an image suffix is not a file
    _png(root / "train" / "7" / "1L.png", 0)  # grade folders outside 0..K-1 are not read
    samples = scan(root)
    assert len(samples) == 4 * 5 * 2
    assert Counter(s.split for s in samples) == {"train": 10, "val": 10, "test": 10, "auto_test": 10}
    assert all(s.path.suffix == ".png" for s in samples)
    for s in samples:
        assert s.grade == int(s.path.parent.name)
        assert s.split == s.path.parent.parent.name
        assert s.patient == s.path.stem[:-1]
        assert s.group == s.patient


def test_scan_plain_layout(tmp_path: Path) -> None:
    for g in range(5):
        for i in range(3):
            _png(tmp_path / str(g) / f"img{g}_{i}.png", 10 * g + i)
    (tmp_path / "README.md").write_text("credit")
    (tmp_path / "2" / "Thumbs.db").write_bytes(b"\0")
    samples = scan(tmp_path)
    assert len(samples) == 15
    assert {s.split for s in samples} == {"all"}
    assert Counter(s.grade for s in samples) == dict.fromkeys(range(5), 3)
    assert all(s.patient is None and s.group == str(s.path) for s in samples)


def test_scan_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope is not a folder: expected ROOT/<split>/<grade>/\*\.png"):
        scan(tmp_path / "nope")


def test_scan_empty_root_says_which_layout(tmp_path: Path) -> None:
    (tmp_path / "train" / "0").mkdir(parents=True)
    (tmp_path / "train" / "0" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"ROOT/<split>/<grade>/\*\.png"):
        scan(tmp_path)
    with pytest.raises(FileNotFoundError, match="no graded images"):
        scan(tmp_path / "train" / "0")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("9001695L.png", "9001695"), ("9001695r.png", "9001695"), ("dir/9001695R.jpg", "9001695"), ("abc.png", None)],
)
def test_parse_patient(name: str, expected: str | None) -> None:
    assert parse_patient(name) == expected


def test_parse_patient_needs_a_side() -> None:
    assert parse_patient("9001695.png") is None
    assert parse_patient("9001695L_1.png") is None


# --------------------------------------------------------------------------- make_splits
def test_official_keeps_splits_apart(tmp_path: Path) -> None:
    samples = scan(_split_layout(tmp_path))
    out = make_splits(samples, "official")
    assert set(out) == {"train", "val", "test"}
    for name in ("train", "val", "test"):
        assert out[name] == [s for s in samples if s.split == name]
    assert not any(s.split == "auto_test" for part in out.values() for s in part)


def test_official_needs_split_layout(tmp_path: Path) -> None:
    samples = scan(_paired_plain_layout(tmp_path, 2))
    with pytest.raises(ValueError, match="--protocol grouped"):
        make_splits(samples, "official")


def test_unknown_protocol(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="official"):
        make_splits(scan(_split_layout(tmp_path, 1)), "random")


def test_grouped_keeps_patients_together_and_stratifies(tmp_path: Path) -> None:
    samples = scan(_paired_plain_layout(tmp_path))
    assert len({s.patient for s in samples}) == 60 and len(samples) == 120
    out = make_splits(samples, "grouped", seed=3)
    train, val = out["train"], out["val"]
    assert "test" not in out
    assert sorted(map(str, (s.path for s in train + val))) == sorted(str(s.path) for s in samples)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert 0.15 <= len(val) / len(samples) <= 0.25
    assert {s.grade for s in train} == {s.grade for s in val} == set(range(5))
    assert make_splits(samples, "grouped", seed=3) == out  # reproducible


def test_grouped_on_split_layout_keeps_test_out(tmp_path: Path) -> None:
    samples = scan(_split_layout(tmp_path, per=6))
    out = make_splits(samples, "grouped")
    pooled = out["train"] + out["val"]
    assert {s.split for s in pooled} == {"train", "val"}
    assert len(pooled) == 60
    assert out["test"] == [s for s in samples if s.split == "test"]


def test_paper_pools_everything_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = scan(_split_layout(tmp_path, per=4))
    with caplog.at_level(logging.WARNING, logger="train.data"):
        out = make_splits(samples, "paper")
    assert PAPER_WARNING in caplog.text
    assert set(out) == {"train", "val"}
    pooled = out["train"] + out["val"]
    assert sorted(str(s.path) for s in pooled) == sorted(str(s.path) for s in samples)
    assert {s.split for s in pooled} == {"train", "val", "test", "auto_test"}
    assert len(out["val"]) == len(samples) // 5


def test_other_protocols_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = scan(_split_layout(tmp_path, per=6))
    with caplog.at_level(logging.WARNING, logger="train.data"):
        make_splits(samples, "official")
        make_splits(samples, "grouped")
    assert "leak" not in caplog.text and PAPER_WARNING not in caplog.text


# --------------------------------------------------------------------------- EpochSampler
LABELS = [0] * 7 + [1] * 3 + [2] * 1 + [4] * 4  # grade 3 absent


def test_balanced_epoch_draws_every_class_to_the_max() -> None:
    s = EpochSampler(LABELS, balance=True, seed=1)
    idx = list(s)
    assert len(idx) == len(s) == 4 * 7
    counts = Counter(LABELS[i] for i in idx)
    assert counts == {0: 7, 1: 7, 2: 7, 4: 7}
    # every image of a class is drawn before any is repeated
    assert Counter(i for i in idx if LABELS[i] == 0) == dict.fromkeys(range(7), 1)
    assert set(idx) == set(range(len(LABELS)))


def test_unbalanced_epoch_is_a_permutation() -> None:
    s = EpochSampler(LABELS, balance=False, seed=1)
    idx = list(s)
    assert sorted(idx) == list(range(len(LABELS)))
    assert idx != sorted(idx)


@pytest.mark.parametrize("balance", [False, True])
def test_ranks_shard_the_epoch(balance: bool) -> None:
    full = list(EpochSampler(LABELS, balance, seed=5))
    ranks = [EpochSampler(LABELS, balance, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    a, b = (list(r) for r in ranks)
    assert len(a) == len(b) == len(ranks[0]) == -(-len(full) // 2)
    # disjoint positions of one shared permutation, covering the whole epoch
    interleaved = [x for pair in zip(a, b) for x in pair]
    assert interleaved[: len(full)] == full
    assert Counter(a) + Counter(b) >= Counter(full)


@pytest.mark.parametrize("balance", [False, True])
def test_sampler_epochs_differ_and_reproduce(balance: bool) -> None:
    s = EpochSampler(LABELS, balance, seed=2)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    again = EpochSampler(LABELS, balance, seed=2)
    again.set_epoch(1)
    assert list(again) == e1
    other_seed = EpochSampler(LABELS, balance, seed=3)
    other_seed.set_epoch(1)
    assert list(other_seed) != e1


def test_sampler_max_items() -> None:
    s = EpochSampler(LABELS, balance=True, seed=0, max_items=5)
    assert len(list(s)) == len(s) == 5


# --------------------------------------------------------------------------- Augment / KneeDataset
def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), (5, 5), 0)
    img[:, :6] = 255  # a bright left edge makes any mirror or shift obvious
    return img


def test_augment_keeps_shape_and_dtype() -> None:
    out = Augment()(_image(), np.random.default_rng(0))
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8


def test_augment_flip_alone_is_a_mirror() -> None:
    img = _image()
    still = {"crop_scale": (1.0, 1.0), "max_translate": 0.0, "aspect": 0.0, "max_rotate": 0.0, "band": 0.0}
    aug = Augment(flip=1.0, intensity=0.0, **still)
    out = aug(img, np.random.default_rng(0))
    assert np.abs(out.astype(int) - np.fliplr(img).astype(int)).max() <= 1
    ident = Augment(flip=0.0, intensity=0.0, **still)(img, np.random.default_rng(0))
    assert np.abs(ident.astype(int) - img.astype(int)).max() <= 1


def test_augment_band_letterboxes_a_tight_crop() -> None:
    img = np.full((SIZE, SIZE), 200, np.uint8)
    still = {"crop_scale": (1.0, 1.0), "max_translate": 0.0, "aspect": 0.0, "max_rotate": 0.0, "flip": 0.0}
    aug = Augment(band=1.0, band_fraction=(0.5, 0.5), intensity=0.0, **still)
    shapes = set()
    for seed in range(12):
        out = aug(img, np.random.default_rng(seed))
        rows, cols = np.flatnonzero(out.max(1) > 0), np.flatnonzero(out.max(0) > 0)
        kept = (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert sorted(kept) == [SIZE // 2, SIZE] and (out == 0).mean() == pytest.approx(0.5, abs=0.01)
        shapes.add(kept)
    assert shapes == {(SIZE // 2, SIZE), (SIZE, SIZE // 2)}  # wide and tall bands both occur


def test_augment_intensity_changes_gray_levels_not_geometry() -> None:
    img = _image()
    still = {"crop_scale": (1.0, 1.0), "max_translate": 0.0, "aspect": 0.0, "max_rotate": 0.0, "band": 0.0}
    out = Augment(flip=0.0, intensity=1.0, blur_sigma=(0.3, 0.3), **still)(img, np.random.default_rng(1))
    assert not np.array_equal(out, img)
    # still the same picture: strongly correlated with the original
    assert np.corrcoef(out.ravel().astype(float), img.ravel().astype(float))[0, 1] > 0.8


def test_split_tune_holds_out_whole_patients() -> None:
    samples = [
        D.Sample(Path(f"{p:07d}{side}.png"), (p + i) % 5, "train", f"{p:07d}")
        for p in range(200)
        for i, side in enumerate("LR")
    ]
    fit, tune = D.split_tune(samples, 0.1, seed=0)
    assert len(fit) + len(tune) == len(samples) and 0.07 < len(tune) / len(samples) < 0.13
    assert not {s.patient for s in fit} & {s.patient for s in tune}
    assert set(D.class_counts(tune, 5)) != {0}
    with pytest.raises(ValueError, match="tune fraction"):
        D.split_tune(samples, 0.6)


def test_augment_is_random_but_seeded() -> None:
    img, aug = _image(), Augment()
    rng = np.random.default_rng(0)
    a, b = aug(img, rng), aug(img, rng)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(aug(img, np.random.default_rng(0)), a)


def test_dataset_items_follow_the_contract() -> None:
    images = np.stack([_image()] * 3)
    ds = KneeDataset(images, [0, 1, 2], CONTRACT, Augment(), seed=1)
    x, y = ds[1]
    assert x.shape == (1, SIZE, SIZE) and x.dtype == torch.float32 and y == 1
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        KneeDataset(images, [0, 1], CONTRACT)


def test_dataset_workers_draw_different_augmentations(monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader workers get copies of the dataset; each must draw its own noise."""
    ds = KneeDataset(np.stack([_image()]), [0], CONTRACT, Augment(), seed=1)
    ds.set_epoch(0)  # called in the main process, before the workers copy the dataset
    workers = [copy.deepcopy(ds), copy.deepcopy(ds)]
    draws = []
    for wid, w in enumerate(workers):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda wid=wid: SimpleNamespace(id=wid))
        draws.append(w[0][0])
    assert not torch.equal(draws[0], draws[1])


def test_framer_frames_its_share_from_the_decoded_image(tmp_path: Path) -> None:
    """`train.fit --framings`: a share of the items is the decoded image framed and prepared by the
    contract; the rest are the cached image (here all zeros, so the two are told apart)."""
    samples = scan(_split_layout(tmp_path / "koa", per=4))[:20]
    framer = Framer.load(samples, CONTRACT, 0.5)
    assert len(framer.raw) == 20 and framer.raw[0].shape == (SIZE, SIZE)
    ds = KneeDataset(np.zeros((20, SIZE, SIZE), np.uint8), [s.grade for s in samples], CONTRACT, None, framer=framer)
    ds.set_epoch(0)
    cached = KneeDataset(np.zeros((1, SIZE, SIZE), np.uint8), [0], CONTRACT)[0][0]
    framed = [not torch.equal(ds[i % 20][0], cached) for i in range(400)]
    assert 0.4 < np.mean(framed) < 0.6
    always = Framer(framer.raw, CONTRACT, 1.0)(0, np.random.default_rng(0))
    assert always.shape == (SIZE, SIZE) and always.dtype == np.uint8 and always.any()
    assert Framer(framer.raw, CONTRACT, 0.0)(0, np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="20 images to frame but 3 labels"):
        KneeDataset(np.zeros((3, SIZE, SIZE), np.uint8), [0, 1, 2], CONTRACT, framer=framer)


# --------------------------------------------------------------------------- prepare_all cache
def test_prepare_all_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = scan(_split_layout(tmp_path / "koa", per=1))[:6]
    cache = tmp_path / "cache"
    first = prepare_all(samples, CONTRACT, cache, "train")
    assert first.shape == (6, SIZE, SIZE) and first.dtype == np.uint8
    files = sorted(cache.glob("train-*.npy"))
    assert len(files) == 1 and not list(cache.glob("*.tmp*"))
    assert prepare_all(samples, CONTRACT, None).tolist() == first.tolist()  # same as uncached

    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache holds these images")

    monkeypatch.setattr(D, "decode_image", no_decode)
    np.testing.assert_array_equal(prepare_all(samples, CONTRACT, cache, "train"), first)
    with pytest.raises(AssertionError, match="decoded again"):  # a changed contract misses the cache
        prepare_all(samples, CONTRACT.replace(preprocess={"equalization": "clahe"}), cache, "train")
    monkeypatch.undo()

    clahe = prepare_all(samples, CONTRACT.replace(preprocess={"equalization": "clahe"}), cache, "train")
    bigger = prepare_all(samples, CONTRACT.replace(input_size=48), cache, "train")
    assert bigger.shape == (6, 48, 48) and not np.array_equal(clahe, first)
    assert len(set(cache.glob("train-*.npy"))) == 3
    prepare_all(samples[:5], CONTRACT, cache, "train")  # a changed file list too
    assert len(set(cache.glob("train-*.npy"))) == 4


def test_prepare_all_cache_misses_when_code_or_library_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = scan(_split_layout(tmp_path / "koa", per=1))[:3]
    cache = tmp_path / "cache"
    prepare_all(samples, CONTRACT, cache, "train")
    before = D.preprocessing_fingerprint()
    monkeypatch.setattr(D.cv2, "__version__", "0.0.0-other")  # another OpenCV
    assert D.preprocessing_fingerprint() != before
    prepare_all(samples, CONTRACT, cache, "train")
    assert len(set(cache.glob("train-*.npy"))) == 2
    monkeypatch.undo()
    edited = tmp_path / "preprocess.py"  # the same module with one line of code changed
    edited.write_text(Path(D.model.preprocess.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(D.model.preprocess, "__file__", str(edited))
    assert D.preprocessing_fingerprint() != before
    prepare_all(samples, CONTRACT, cache, "train")
    assert len(set(cache.glob("train-*.npy"))) == 3


def test_the_cache_key_does_without_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU machine has no pydicom: the fingerprint says so instead of failing, and differs."""
    import importlib.metadata as md

    from train.data import preprocessing_fingerprint

    here = preprocessing_fingerprint()
    real = md.version

    def version(dist: str) -> str:
        if dist == "pydicom":
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(md, "version", version)
    assert preprocessing_fingerprint() != here
