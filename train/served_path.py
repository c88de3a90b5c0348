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
from model.localize import FinderConfig, crop_joint, find_joints, plan
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


class ServedPath:
    """What the server does with one image's bytes, from `model/` alone (as `handler.service`):
    decode, find the joints, decide, cut each knee, preprocess, grade with the knee gate.

    The grader runs as the server runs it (`model.precision.compiled`) in ``dtype``; ``finder`` is
    given in the form and format to measure (the server's: `model.localize.serving_finder` in the same
    dtype)."""

    def __init__(
        self, weights: str, finder: tuple[torch.nn.Module, FinderConfig], dtype: torch.dtype = torch.float32
    ) -> None:
        net, self.contract = model_from_checkpoint(weights)
        c = self.contract
        self.net = compiled(net.eval(), torch.zeros(1, c.channels, c.input_size, c.input_size), dtype)
        self.finder = finder

    @torch.inference_mode()
    def __call__(self, data: bytes) -> Served:
        """What the server answers for one image's bytes (`Served`)."""
        t0 = time.perf_counter()
        c = self.contract
        image = decode_image(data, max_pixels=c.max_pixels, knee_only=True)
        net, cfg = self.finder
        p = plan(find_joints(net, cfg, [image])[0], image.shape, cfg)
        if p.kind == "refuse":
            return Served(p.error or "not_a_knee", (), time.perf_counter() - t0)
        crops = [image] if p.kind == "crop" else [crop_joint(image, j) for j in p.joints]
        x = torch.from_numpy(np.stack([to_model_input(prepare(g, c), c) for g in crops]))
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
