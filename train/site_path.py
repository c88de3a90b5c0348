"""A site's knees through the served request path, in-process: what the server would answer, and why.

`ServedSitePath` runs the request path of `train.served_path` in batches and keeps, for every file, its
outcome and its logits before calibration (`KneeRecord`): the raw material of a site check and of a
site calibration. docs/SITES.md (`train.site_path`) says why a refused file is graded all the same.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.contract import InputContract
from model.decode import DecodeError, decode_image
from model.localize import WHOLE, FinderConfig, load_serving_finder
from model.postprocess import refused, split_outputs
from model.precision import serving_dtype
from train.served_path import RequestPath

log = logging.getLogger(__name__)

ANSWERED = ("crop", "film")


def sha256(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256: which weights a check or a reference was made with."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class KneeRecord:
    """One file through the served path.

    Attributes:
        file: the file's path.
        outcome: ``crop`` or ``film`` when answered; else the refusal (``not_a_knee``,
            ``resolution_too_low``, ``unsupported_view``, ``invalid_image``).
        refused_by: ``finder``, ``gate`` or ``decode`` for a refusal; None when answered.
        message: why, in words, for a refusal.
        logits: (V, K) uncalibrated logits of the knee answered (V = 2 with the mirrored view,
            else 1); for a film with several knees graded, their mean. None when refused.
        fallback_logits: when refused, the logits the model gave all the same (the image graded whole
            as a crop when the finder refused it; the crops when the knee gate did): what a calibration
            may be fitted on. None when answered or unreadable.
        gate_score: the knee gate's score of the answered knee (of the crop when refused by the
            finder), None without a gate or when the file could not be read.
        knees: knees graded in the file (a film can hold two).
        stats: image statistics of the prepared model input (mean, sd), for the distance from training.
    """

    file: str
    outcome: str
    refused_by: str | None = None
    message: str = ""
    logits: np.ndarray | None = None
    fallback_logits: np.ndarray | None = None
    gate_score: float | None = None
    knees: int = 0
    stats: tuple[float, float] | None = None

    @property
    def answered(self) -> bool:
        return self.outcome in ANSWERED

    @property
    def fit_logits(self) -> np.ndarray | None:
        """The logits a calibration is fitted on: the answered knee's, else the crop's."""
        return self.logits if self.logits is not None else self.fallback_logits


@dataclass
class ServedSitePath(RequestPath):
    """The served steps from the shipped weights and finder files (`weights/` on main by default), in
    batches, keeping each file's uncalibrated logits (`KneeRecord`)."""

    weights: str = "weights/oamen.ckpt"
    finder_weights: str = "weights/finder.pt"
    dtype: str | None = None  # None: the server's choice (model.precision.serving_dtype)
    reading: str = WHOLE  # how a joint crop is read (model.localize.crop_view), as a site profile may say
    contract: InputContract = field(init=False)

    def __post_init__(self) -> None:
        if not Path(self.weights).is_file():
            raise FileNotFoundError(
                f"no weights at {self.weights}: pass --weights (the shipped ones are weights/oamen.ckpt)"
            )
        self.torch_dtype = serving_dtype(torch.device("cpu"), self.dtype)
        finder: tuple[torch.nn.Module, FinderConfig] | None = load_serving_finder(
            self.finder_weights, "cpu", self.torch_dtype
        )
        super().__init__(self.weights, finder, self.torch_dtype)
        if self.finder is None:
            log.warning("no finder at %s: every image is graded as a joint crop", self.finder_weights)

    @torch.inference_mode()
    def grade(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, list[tuple[float, float]]]:
        """Gray crops -> ((N, V, K) logits, (N,) gate scores or None, (mean, sd) of each model input)."""
        c = self.contract
        prepared = self.prepared(crops)
        x = self.model_input(prepared)
        stats = [(float(p.mean()), float(p.std())) for p in prepared]
        run = self.net.forward_with_gate if self.gated else self.net
        views = [x] + ([torch.flip(x, dims=[3])] if c.postprocess.flip_tta else [])
        outs = [run(v.contiguous(memory_format=torch.channels_last)).float().numpy() for v in views]
        logits, gate = split_outputs(outs[0], c.num_classes)
        per_view = [logits] + [split_outputs(o, c.num_classes)[0] for o in outs[1:]]
        return np.stack(per_view, axis=1), gate, stats

    def read(self, path: Path) -> np.ndarray | KneeRecord:
        """The decoded gray image, or the refusal record of a file that cannot be read."""
        try:
            return decode_image(path.read_bytes(), max_pixels=self.contract.max_pixels, knee_only=True)
        except (DecodeError, OSError) as exc:
            kind = getattr(exc, "kind", "invalid_image")
            return KneeRecord(str(path), kind, "decode", f"{type(exc).__name__}: {exc}")

    def batch(self, paths: list[Path]) -> list[KneeRecord]:
        """The records of a few files, with one finder pass and one grader pass for all of them (as the
        server batches requests); never raises for a bad image (it becomes an ``invalid_image`` refusal)."""
        c = self.contract
        read = [self.read(p) for p in paths]
        images = [(i, im) for i, im in enumerate(read) if isinstance(im, np.ndarray)]
        plans = self.plans([im for _, im in images])
        crops: list[np.ndarray] = []
        spans: list[tuple[int, int]] = []
        for (_, im), pl in zip(images, plans, strict=True):
            pieces = self.knees(im, pl, self.reading)
            spans.append((len(crops), len(crops) + len(pieces)))
            crops.extend(pieces)
        logits, gate, stats = self.grade(crops) if crops else (None, None, [])
        gone = refused(gate, c.postprocess) if crops else None
        out: list[KneeRecord] = [r if isinstance(r, KneeRecord) else None for r in read]  # type: ignore[misc]
        for (i, _), pl, (a, b) in zip(images, plans, spans, strict=True):
            lg, g = logits[a:b], None if gate is None else gate[a:b]
            keep = np.ones(b - a, bool) if gone is None else ~gone[a:b]
            path = str(paths[i])
            if pl is not None and pl.kind == "refuse":
                out[i] = KneeRecord(
                    path, pl.error or "not_a_knee", "finder", pl.message or "no knee joint was found",
                    fallback_logits=lg[0], gate_score=None if g is None else float(g[0]), stats=stats[a],
                )  # fmt: skip
            elif not keep.any():
                out[i] = KneeRecord(
                    path, "not_a_knee", "gate", "the knee gate did not accept this crop",
                    fallback_logits=lg.mean(axis=0), gate_score=float(g.min()), stats=stats[a],
                )  # fmt: skip
            else:
                out[i] = KneeRecord(
                    path, "crop" if pl is None else pl.kind, logits=lg[keep].mean(axis=0), knees=int(keep.sum()),
                    gate_score=None if g is None else float(g[keep].max()), stats=stats[a + int(np.argmax(keep))],
                )  # fmt: skip
        return out

    def run(self, files: list[Path], progress: bool = True, batch_size: int = 8) -> list[KneeRecord]:
        """Every file's record, in order, in batches of ``batch_size`` files, with a progress bar."""
        records: list[KneeRecord] = []
        with tqdm(total=len(files), desc="served path", unit="knee", disable=not progress) as bar:
            for i in range(0, len(files), batch_size):
                chunk = files[i : i + batch_size]
                records.extend(self.batch(chunk))
                bar.update(len(chunk))
        return records


def records_of(path: ServedSitePath, files: list[Path], cache: Path, name: str) -> list[KneeRecord]:
    """The served path's records of ``files``, from the cache when the same weights and files were run in the
    same number format and reading."""
    names = hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()[:12]
    key = sha256(path.weights) + sha256(path.finder_weights) + names
    kind = str(path.torch_dtype).removeprefix("torch.") + ("" if path.reading == WHOLE else "-" + path.reading)
    f = cache / f"{name}-{key}-{kind}.pkl"
    if f.is_file():
        return pickle.loads(f.read_bytes())
    records = path.run(files)
    cache.mkdir(parents=True, exist_ok=True)
    f.write_bytes(pickle.dumps(records))
    return records


def arrays(records: list[KneeRecord], grades: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (N, V, K) logits a calibration may be fitted on, their grades and whether each was answered, of the
    records with logits."""
    keep = [i for i, r in enumerate(records) if r.fit_logits is not None]
    logits = np.stack([records[i].fit_logits for i in keep])
    return logits, np.asarray(grades)[keep], np.array([records[i].answered for i in keep])
