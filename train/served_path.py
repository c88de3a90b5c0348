"""The server's request path for one image, run in-process from `model/` alone, for measuring.

`ServedPath` does what `handler.service` does with an image's bytes (decode, find the joints, decide,
cut each knee, preprocess, grade with its mirror and the knee gate) without TorchServe, so that
evaluations (`train.eval_finder`, `train.eval_framings`) measure what the server answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import model_from_checkpoint
from model.decode import decode_image
from model.localize import WHOLE, FinderConfig, Plan, crop_joint, crop_view, find_joints, plan
from model.postprocess import finish
from model.precision import compiled
from model.preprocess import prepare, to_model_input


@dataclass(frozen=True)
class Served:
    """One image's answer: ``outcome`` is ``crop`` or ``film`` when a knee was graded, else the
    refusal (``not_a_knee``, ``unsupported_view``, ``resolution_too_low``); ``grades`` of the knees
    graded, left to right."""

    outcome: str
    grades: tuple[int, ...]
    seconds: float


class RequestPath:
    """The grader and the finder as the server holds them, and the server's steps before the grader:
    find the joints, decide (`model.localize.plan`), cut each knee, prepare.

    The grader runs as the server runs it (`model.precision.compiled`) in ``dtype``; ``finder`` is
    given in the form and format to measure (the server's: `model.localize.serving_finder` in the same
    dtype), or None: every image is then graded as a joint crop."""

    def __init__(
        self, weights: str, finder: tuple[torch.nn.Module, FinderConfig] | None, dtype: torch.dtype = torch.float32
    ) -> None:
        net, self.contract = model_from_checkpoint(weights)
        c = self.contract
        self.net = compiled(net.eval(), torch.zeros(1, c.channels, c.input_size, c.input_size), dtype)
        self.gated = hasattr(self.net, "forward_with_gate")
        self.finder = finder

    def plans(self, images: list[np.ndarray]) -> list[Plan | None]:
        """What the server decides for each image, in one finder pass (None each without a finder)."""
        if self.finder is None:
            return [None] * len(images)
        net, cfg = self.finder
        return [plan(js, im.shape, cfg) for js, im in zip(find_joints(net, cfg, images), images, strict=True)]

    @staticmethod
    def knees(image: np.ndarray, p: Plan | None, reading: str = WHOLE) -> list[np.ndarray]:
        """The gray images to grade: each knee cut out of a film, else the image itself (a joint crop, read
        as ``reading`` says: `model.localize.crop_view`)."""
        if p is not None and p.kind == "film":
            return [crop_joint(image, j) for j in p.joints]
        return [crop_view(image, p, reading)] if p is not None else [image]

    def prepared(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Each crop prepared as the contract says (`model.preprocess.prepare`)."""
        return [prepare(g, self.contract) for g in crops]

    def model_input(self, prepared: list[np.ndarray]) -> torch.Tensor:
        """(N, C, S, S) the grader's input of prepared crops."""
        return torch.from_numpy(np.stack([to_model_input(p, self.contract) for p in prepared]))


class ServedPath(RequestPath):
    """What the server answers for one image's bytes, from `model/` alone (as `handler.service`):
    decode, find the joints, decide, cut each knee, preprocess, grade with the knee gate (``finder``
    required)."""

    @torch.inference_mode()
    def __call__(self, data: bytes) -> Served:
        """What the server answers for one image's bytes (`Served`)."""
        t0 = time.perf_counter()
        c = self.contract
        image = decode_image(data, max_pixels=c.max_pixels, knee_only=True)
        p = self.plans([image])[0]
        if p.kind == "refuse":
            return Served(p.error or "not_a_knee", (), time.perf_counter() - t0)
        crops = self.knees(image, p)
        x = self.model_input(self.prepared(crops))
        n = len(crops)
        if c.postprocess.flip_tta:  # the images and their mirrors in one pass, as handler.service does
            x = torch.cat([x, torch.flip(x, dims=[3])])
        out = self.net.forward_with_gate(x.contiguous(memory_format=torch.channels_last)).float().numpy()
        flipped = out[n:] if c.postprocess.flip_tta else None
        arrays = finish(out[:n], c.postprocess, c.num_classes, flipped)
        refused = arrays["refused"] if arrays["refused"] is not None else np.zeros(n, bool)
        grades = tuple(int(g) for g, r in zip(arrays["grades"], refused, strict=True) if not r)
        return Served(p.kind if grades else "not_a_knee", grades, time.perf_counter() - t0)


@torch.inference_mode()
def served_outcomes(path: ServedPath, files: list[Path]) -> dict[str, Any]:
    """The share of each outcome over ``files`` and the median and worst seconds per image."""
    path(files[0].read_bytes())  # warm up
    counts: dict[str, int] = {}
    times = []
    for f in files:
        served = path(f.read_bytes())
        counts[served.outcome] = counts.get(served.outcome, 0) + 1
        times.append(served.seconds)
    n = len(files)
    return {
        "n": n,
        "outcomes": counts,
        "graded_share": (counts.get("crop", 0) + counts.get("film", 0)) / n,
        "seconds_median": float(np.median(times)),
        "seconds_max": float(np.max(times)),
    }
