"""What the server would answer for prepared images, and the images evaluations grade.

The answer is rebuilt from the contract stored with the weights (`model.postprocess.finish`), as the
server builds it. Shared by `train.evaluate`, `train.resolution`, `train.gate_study`,
`train.ensemble_probe` and the precision benchmark (`ops.bench.precision`).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import load_torchscript, model_from_checkpoint
from model.contract import InputContract
from model.decode import decode_image
from model.postprocess import finish
from model.preprocess import as_float_image, prepare, to_model_input
from train.data import Sample, make_splits
from train.framings import Framing


# The same knees framed as other hospitals frame them, applied to the decoded image before the
# preprocessing (`train.framings.Framing`).
def _band(image: np.ndarray, share: float = 0.55) -> np.ndarray:
    h = image.shape[0]
    keep = max(1, round(h * share))
    top = (h - keep) // 2
    return image[top : top + keep, :]


def _zoom(image: np.ndarray, share: float = 0.85) -> np.ndarray:
    h, w = image.shape
    kh, kw = max(1, round(h * share)), max(1, round(w * share))
    top, left = (h - kh) // 2, (w - kw) // 2
    return image[top : top + kh, left : left + kw]


FRAMINGS: tuple[Framing, ...] = (
    Framing("original", "the dataset's crop", lambda im: im),
    Framing("joint_band_55", "full width, the central 55% of the height (a wide image, letterboxed)", _band),
    Framing("zoom_85", "the central 85% of each side, enlarged back", _zoom),
    Framing("gamma_0.7", "brightness curve gamma 0.7", lambda im: np.power(im, 0.7)),
    Framing("gamma_1.4", "brightness curve gamma 1.4", lambda im: np.power(im, 1.4)),
)


def load_model(checkpoint: str | None, torchscript: str | None) -> tuple[torch.nn.Module, InputContract, str]:
    """The model in eval mode, its contract, and a description of what was loaded."""
    if torchscript:
        net, contract = load_torchscript(torchscript)
        return net, contract, f"torchscript:{torchscript}"
    net, contract = model_from_checkpoint(checkpoint)
    return net, contract, f"checkpoint:{checkpoint}"


def select_split(samples: list[Sample], split: str, protocol: str, seed: int) -> list[Sample]:
    if protocol == "official":
        chosen = [s for s in samples if s.split == split]
    else:
        chosen = make_splits(samples, protocol, seed).get(split, [])
    if not chosen:
        found = sorted({s.split for s in samples})
        raise ValueError(f"split {split!r} has no images under protocol {protocol!r}; splits found: {found}")
    return chosen


@torch.inference_mode()
def model_outputs(
    net: torch.nn.Module, images: np.ndarray, contract: InputContract, flip: bool = False, batch_size: int = 32
) -> np.ndarray:
    """(N, S, S) prepared uint8 images -> (N, K) logits, or (N, K + 1) with the knee gate's score."""
    gated = hasattr(net, "forward_with_gate")
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="evaluate", leave=False, dynamic_ncols=True):
        chunk = images[i : i + batch_size]
        if flip:
            chunk = chunk[:, :, ::-1]
        x = torch.from_numpy(np.stack([to_model_input(np.ascontiguousarray(im), contract) for im in chunk]))
        x = x.contiguous(memory_format=torch.channels_last)
        out.append((net.forward_with_gate(x) if gated else net(x)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, contract.num_classes), np.float32)


def answer_arrays(
    net: torch.nn.Module, contract: InputContract, images: np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray | None]:
    """The answers the server would give for prepared images (`model.postprocess.finish`)."""
    outputs = model_outputs(net, images, contract, batch_size=batch_size)
    flipped = model_outputs(net, images, contract, True, batch_size) if contract.postprocess.flip_tta else None
    return finish(outputs, contract.postprocess, contract.num_classes, flipped)


def prepare_files(paths: list[Path], contract: InputContract, transform=None) -> np.ndarray:
    """Decode and prepare image files (optionally transformed first, on the [0, 1] float image)."""
    out = []
    for p in paths:
        image = as_float_image(decode_image(p.read_bytes(), max_pixels=contract.max_pixels))
        out.append(prepare(transform(image) if transform else image, contract))
    return np.stack(out)


def made_up_negatives(knees: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Prepared images that are not knee crops, made from what is at hand (no file needed).

    knees upside down; the femur shaft only (the top 40% of a knee crop, the joint cut off);
    uniform and smoothed noise; a page of text; flat gray.
    """
    rng = np.random.default_rng(seed)
    size = knees.shape[1]
    noise = rng.integers(0, 256, (40, size, size), dtype=np.uint8)
    smooth = np.stack([cv2.GaussianBlur(n, (0, 0), 6) for n in noise[:20]])
    page = np.full((20, size, size), 235, np.uint8)
    for i in range(len(page)):
        for row in range(12, size, 14):
            words = "".join(rng.choice(list("abcdefghij klmnop qrstuv wxyz"), 30))
            cv2.putText(page[i], words, (4, row), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 20, 1)
    flat = np.full((5, size, size), 128, np.uint8)
    shaft = np.zeros_like(knees[:40])
    for i, k in enumerate(knees[:40]):
        band = k[: int(size * 0.4)]
        shaft[i] = cv2.resize(band, (size, size), interpolation=cv2.INTER_LINEAR)
    return {
        "knee upside down": knees[:, ::-1, :].copy(),
        "femur shaft only (joint cut off)": shaft,
        "uniform noise": noise,
        "smoothed noise": smooth,
        "a page of text": page,
        "flat gray": flat,
    }
