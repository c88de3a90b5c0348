"""Knee X-ray datasets: layouts, patient ids, split protocols, caching, balancing, augmentation.

`scan` reads ``ROOT/<split>/<grade>/*.png`` or ``ROOT/<grade>/*``; `make_splits` forms the protocols
``official``, ``grouped`` and ``paper`` (which leaks, offered only to reproduce the paper).
docs/TRAINING.md (`train.data`) describes them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

import model.contract
import model.decode
import model.preprocess
from model.contract import InputContract
from model.decode import decode_image
from model.preprocess import as_float_image, prepare, to_model_input
from train.framings import random_framing

log = logging.getLogger(__name__)

KNOWN_SPLITS = ("train", "val", "test", "auto_test")
PROTOCOLS = ("official", "grouped", "paper")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}
_PATIENT_RE = re.compile(r"^(\d+)([LR])$", re.IGNORECASE)
PAPER_WARNING = (
    "protocol 'paper' pools every split and splits 8:2 at random, as OA-MEN did: both knees "
    "of a patient, and auto_test re-crops of test knees, land on both sides, so its figures are "
    "optimistic. Use 'official' or 'grouped' for honest numbers."
)


@dataclass(frozen=True)
class Sample:
    """One graded image file."""

    path: Path
    grade: int
    split: str
    patient: str | None

    @property
    def group(self) -> str:
        """Grouping key: the patient id when known, the file itself otherwise."""
        return self.patient if self.patient is not None else str(self.path)


def parse_patient(path: str | Path) -> str | None:
    """Patient id from a name like ``9001695L.png`` (the OAI id), or None."""
    m = _PATIENT_RE.match(Path(path).stem)
    return m.group(1) if m else None


def _scan_grades(folder: Path, split: str, num_classes: int) -> list[Sample]:
    samples = []
    for grade in range(num_classes):
        gdir = folder / str(grade)
        if not gdir.is_dir():
            continue
        for p in sorted(gdir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                samples.append(Sample(p, grade, split, parse_patient(p)))
    return samples


def scan(root: str | Path, num_classes: int = 5) -> list[Sample]:
    """Every graded image under ``root`` (either layout). Raises if none is found."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} is not a folder: expected ROOT/<split>/<grade>/*.png or ROOT/<grade>/*.png"
        )
    splits = [s for s in KNOWN_SPLITS if (root / s).is_dir()]
    if splits:
        samples = [x for s in splits for x in _scan_grades(root / s, s, num_classes)]
    else:
        samples = _scan_grades(root, "all", num_classes)
    if not samples:
        raise FileNotFoundError(
            f"no graded images under {root}: expected ROOT/<split>/<grade>/*.png or ROOT/<grade>/*.png "
            f"with grades 0..{num_classes - 1}"
        )
    return samples


def make_splits(samples: Sequence[Sample], protocol: str = "official", seed: int = 0) -> dict[str, list[Sample]]:
    """Split samples by protocol into ``train``, ``val`` and (when available) ``test``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    by_split: dict[str, list[Sample]] = {}
    for s in samples:
        by_split.setdefault(s.split, []).append(s)
    if protocol == "official":
        if "train" not in by_split or "val" not in by_split:
            raise ValueError(
                f"protocol 'official' needs ROOT/train and ROOT/val; found splits {sorted(by_split)}. "
                "Use --protocol grouped for a plain ROOT/<grade>/ folder."
            )
        out = {"train": by_split["train"], "val": by_split["val"]}
        if "test" in by_split:
            out["test"] = by_split["test"]
        return out
    if protocol == "grouped":
        pool = [s for s in samples if s.split in ("train", "val", "all")]
        labels = np.array([s.grade for s in pool])
        groups = np.array([s.group for s in pool])
        splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
        tr, va = next(splitter.split(np.zeros(len(pool)), labels, groups))
        out = {"train": [pool[i] for i in tr], "val": [pool[i] for i in va]}
        if "test" in by_split:
            out["test"] = by_split["test"]
        return out
    log.warning(PAPER_WARNING)
    pool = list(samples)
    labels = [s.grade for s in pool]
    tr, va = train_test_split(np.arange(len(pool)), test_size=0.2, stratify=labels, random_state=seed)
    return {"train": [pool[i] for i in tr], "val": [pool[i] for i in va]}


def split_tune(samples: Sequence[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(fit, tune): a patient-grouped, grade-stratified ``fraction`` of the training samples held out.

    The tune fold is what post-hoc steps fit on (calibration, decoding cut-points, refusal
    thresholds): data the weights never trained on, and not the validation split, which picks
    and reports models.
    """
    if not 0 < fraction < 0.5:
        raise ValueError(f"tune fraction must be in (0, 0.5), got {fraction}")
    labels = np.array([s.grade for s in samples])
    groups = np.array([s.group for s in samples])
    folds = max(2, round(1 / fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fit_ix, tune_ix = next(splitter.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in fit_ix], [samples[i] for i in tune_ix]


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    c = Counter(s.grade for s in samples)
    return [c.get(k, 0) for k in range(num_classes)]


def preprocessing_fingerprint() -> str:
    """A digest of everything besides the contract that shapes a prepared image.

    The code of decoding and preprocessing (and of the contract that parameterises them) and
    the versions of the libraries they call: after a fix to any of them, training must not
    read images prepared the old way while serving prepares them the new way.
    """
    import importlib.metadata as md

    h = hashlib.sha256()
    for module in (model.contract, model.decode, model.preprocess):
        h.update(Path(module.__file__).read_bytes())
    h.update(f"cv2={cv2.__version__};numpy={np.__version__};".encode())
    for dist in ("pydicom", "pillow"):  # decoders of DICOM and of what OpenCV cannot read; absent on the GPU machine
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            version = "absent"
        h.update(f"{dist}={version};".encode())
    return h.hexdigest()


def _cache_key(samples: Sequence[Sample], contract: InputContract) -> str:
    h = hashlib.sha256()
    h.update(preprocessing_fingerprint().encode())
    h.update(repr((contract.input_size, contract.preprocess, contract.max_pixels)).encode())
    for s in samples:
        h.update(f"{s.path}:{s.path.stat().st_mtime_ns}:{s.path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def prepare_all(
    samples: Sequence[Sample], contract: InputContract, cache_dir: str | Path | None = None, desc: str = "prepare"
) -> np.ndarray:
    """The deterministic preprocessing of every sample: (N, S, S) uint8, cached on disk if asked.

    The cache file name hashes the file list, the preprocessing parameters, the code of
    decoding and preprocessing and the libraries' versions (`preprocessing_fingerprint`), so a
    changed contract, dataset, code or library never reads a stale cache.
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{desc}-{_cache_key(samples, contract)}.npy"
        if cache_file.is_file():
            arr = np.load(cache_file)
            if arr.shape == (len(samples), contract.input_size, contract.input_size):
                return arr

    def one(s: Sample) -> np.ndarray:
        return prepare(decode_image(s.path.read_bytes(), max_pixels=contract.max_pixels), contract)

    size = contract.input_size
    out = np.empty((len(samples), size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:  # OpenCV releases the GIL
        for i, img in enumerate(tqdm(pool.map(one, samples), total=len(samples), desc=desc, leave=False)):
            out[i] = img
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache_file)
    return out


@dataclass(frozen=True)
class Augment:
    """The paper's class-balancing augmentation (random crop, flip, translation), widened for
    crops framed by other hospitals and other scanners.

    Applied to the prepared uint8 image. Geometry is one affine warp: a zoom of 1/crop_scale
    (``crop_scale`` < 1 is a tighter crop, > 1 a wider one), independent x/y scale up to
    ``aspect`` apart, a rotation of up to ``max_rotate`` degrees, a shift of up to
    ``max_translate`` of the side and a mirror with probability ``flip`` (left and right knees
    are mirror images). With probability ``band``, a band of the image is kept (full width and
    ``band_fraction`` of the height, or the transpose) and letterboxed back with black bars,
    as a tight joint crop from another hospital arrives. Then, on intensities: gamma, contrast,
    Gaussian blur and Gaussian noise, each with the probability ``intensity``.
    """

    flip: float = 0.5
    crop_scale: tuple[float, float] = (0.8, 1.15)
    max_translate: float = 0.08
    aspect: float = 0.1
    max_rotate: float = 7.0
    band: float = 0.2
    band_fraction: tuple[float, float] = (0.45, 0.85)
    intensity: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.45)
    contrast: tuple[float, float] = (0.75, 1.25)
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_std: tuple[float, float] = (0.005, 0.03)

    def _geometry(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = image.shape[0]
        zoom = 1.0 / rng.uniform(*self.crop_scale)
        stretch = np.exp(rng.uniform(-self.aspect, self.aspect)) if self.aspect > 0 else 1.0
        zx, zy = zoom * stretch, zoom / stretch
        tx, ty = rng.uniform(-self.max_translate, self.max_translate, size=2) * size
        mirror = rng.random() < self.flip
        theta = np.deg2rad(rng.uniform(-self.max_rotate, self.max_rotate)) if self.max_rotate > 0 else 0.0
        cos, sin = np.cos(theta), np.sin(theta)
        a = np.array([[zx * cos, -zy * sin], [zx * sin, zy * cos]], dtype=np.float64)
        if mirror:
            a[:, 0] *= -1
        c = (size - 1) / 2.0
        offset = np.array([c + tx, c + ty]) - a @ np.array([c, c])
        m = np.hstack([a, offset[:, None]]).astype(np.float32)
        return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)

    def _band(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = image.shape[0]
        keep = max(8, round(size * rng.uniform(*self.band_fraction)))
        start = (size - keep) // 2 + int(rng.integers(-(size - keep) // 4, (size - keep) // 4 + 1))
        start = min(max(start, 0), size - keep)
        out = np.zeros_like(image)  # the letterbox's black bars (contract pad_value 0)
        if rng.random() < 0.75:  # a wide band across the joint line, as most tight crops are
            out[start : start + keep, :] = image[start : start + keep, :]
        else:
            out[:, start : start + keep] = image[:, start : start + keep]
        return out

    def _intensity(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = image.astype(np.float32) / 255.0
        if rng.random() < self.intensity:
            x = x ** rng.uniform(*self.gamma)
        if rng.random() < self.intensity:
            x = (x - 0.5) * rng.uniform(*self.contrast) + 0.5
        if rng.random() < self.intensity:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(*self.blur_sigma))
        if rng.random() < self.intensity:
            x = x + rng.normal(0.0, rng.uniform(*self.noise_std), size=x.shape).astype(np.float32)
        return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = self._geometry(image, rng)
        if self.band > 0 and rng.random() < self.band:
            out = self._band(out, rng)
        if self.intensity > 0:
            out = self._intensity(out, rng)
        return out


@dataclass(frozen=True)
class Framer:
    """Online framings for training (`train.fit --framings`): with probability ``share`` an item is
    the decoded image framed as another site frames knees (`train.framings.random_framing`), then
    put through the contract's preprocessing and mirrored half the time, instead of the cached
    prepared image and its `Augment`. The framing needs the image before preprocessing, so
    ``raw`` holds the decoded images (uint8, about 50 KB a knee)."""

    raw: Sequence[np.ndarray]
    contract: InputContract
    share: float

    @classmethod
    def load(cls, samples: Sequence[Sample], contract: InputContract, share: float) -> Framer:
        def one(s: Sample) -> np.ndarray:
            return decode_image(s.path.read_bytes(), max_pixels=contract.max_pixels)

        with ThreadPoolExecutor() as pool:
            raw = list(tqdm(pool.map(one, samples), total=len(samples), desc="decode for framings", leave=False))
        return cls(raw, contract, share)

    def __call__(self, i: int, rng: np.random.Generator) -> np.ndarray | None:
        """Item ``i`` framed, or None (the cached image then)."""
        if rng.random() >= self.share:
            return None
        out = prepare(random_framing(as_float_image(self.raw[i]), rng), self.contract)
        return out[:, ::-1] if rng.random() < 0.5 else out


class KneeDataset(Dataset):
    """Prepared images + labels -> (C, S, S) float tensors, augmented when ``augment`` is set and
    framed by ``framer`` (`Framer`) for a share of the items."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        contract: InputContract,
        augment: Augment | None = None,
        seed: int = 0,
        framer: Framer | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if framer is not None and len(framer.raw) != len(labels):
            raise ValueError(f"{len(framer.raw)} images to frame but {len(labels)} labels")
        self.framer = framer
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.contract = contract
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._rng = np.random.default_rng(seed)
        self._rng_owner: int | None = None  # DataLoader worker id the generator was seeded for

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation so each epoch (and each rank/worker) draws fresh, reproducible noise."""
        self.epoch = epoch
        self._rng = np.random.default_rng([self.seed, epoch, 0])
        self._rng_owner = None

    def _worker_rng(self) -> np.random.Generator:
        # set_epoch runs in the main process; DataLoader workers hold copies of this dataset made
        # after it, so each worker reseeds on its first item, or all workers would draw the same
        # noise. (Persistent workers keep their stream across epochs, which still differs.)
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else None
        if wid != self._rng_owner:
            self._rng = np.random.default_rng([self.seed, self.epoch, wid])
            self._rng_owner = wid
        return self._rng

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        framed = self.framer(i, self._worker_rng()) if self.framer is not None else None
        if framed is not None:
            img = framed
        elif self.augment is not None:
            img = self.augment(img, self._worker_rng())
        return torch.from_numpy(np.ascontiguousarray(to_model_input(img, self.contract))), int(self.labels[i])


class EpochSampler(Sampler[int]):
    """Indices for one epoch, optionally class-balanced, sharded across distributed ranks.

    Balanced: every class is drawn up to the count of the largest class (all of its own
    images first, then random repeats that the augmentation makes different), as OA-MEN did.
    Every rank builds the same permutation from ``seed + epoch`` and keeps its own stride.
    """

    def __init__(
        self,
        labels: Sequence[int],
        balance: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_items: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels)
        self.balance = balance
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_items = max_items
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.balance:
            per_class = [np.flatnonzero(self.labels == k) for k in np.unique(self.labels)]
            target = max(len(ix) for ix in per_class)
            parts = [np.concatenate([ix, rng.choice(ix, target - len(ix))]) for ix in per_class]
            idx = np.concatenate(parts)
        else:
            idx = np.arange(len(self.labels))
        idx = rng.permutation(idx)
        if self.max_items is not None:
            idx = idx[: self.max_items]
        pad = (-len(idx)) % self.world_size  # every rank gets the same number of steps
        if pad:
            idx = np.concatenate([idx, idx[:pad]])
        return idx[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices())


def samples_from_files(files: list[str], root_samples: list[Sample]) -> list[Sample]:
    """The samples of ``files`` (a run's tune fold: its config.json's ``tune_files``), in that order."""
    by_path = {str(s.path): s for s in root_samples}
    missing = [f for f in files if f not in by_path]
    if missing:
        raise FileNotFoundError(f"{len(missing)} tune files are not in the dataset, e.g. {missing[0]}")
    return [by_path[f] for f in files]
