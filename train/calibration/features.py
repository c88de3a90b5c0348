"""The grader's pooled features and head logits of prepared knees, cached on disk between calibrations.

Calibration reads the same few thousand knees through the same weights each time it runs; on a CPU
that is most of its time, so the features are kept, keyed by the weights, the images and what is computed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.contract import InputContract
from model.preprocess import to_model_input


@torch.inference_mode()
def pooled_features(
    net: torch.nn.Module, images: np.ndarray, contract: InputContract, flip: bool = False, batch_size: int = 32
) -> np.ndarray:
    """(N, S, S) prepared uint8 images -> (N, D) pooled features (of the mirrored images if ``flip``)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="features" + (" (mirrored)" if flip else ""), leave=False):
        chunk = images[i : i + batch_size]
        if flip:
            chunk = chunk[:, :, ::-1]
        x = torch.from_numpy(np.stack([to_model_input(np.ascontiguousarray(im), contract) for im in chunk]))
        out.append(net.forward_features(x.contiguous(memory_format=torch.channels_last)).float().numpy())
    return np.concatenate(out)


class FeatureCache:
    """Features of prepared images on disk, keyed by the weights, the images and what is computed.

    Calibration reads the same few thousand knees through the same weights each time it runs;
    on a CPU that is most of its time.
    """

    def __init__(self, folder: str | None, checkpoint: Path, gate_layers: tuple[str, ...]) -> None:
        self.folder = Path(folder) if folder else None
        self.base = hashlib.sha1(checkpoint.read_bytes() + repr(gate_layers).encode()).hexdigest()

    def get(self, name: str, images: np.ndarray, compute) -> list[np.ndarray]:
        if self.folder is None:
            return compute()
        key = hashlib.sha1((self.base + name).encode() + images.tobytes()).hexdigest()[:16]
        path = self.folder / f"features-{name}-{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return [z[f"a{i}"] for i in range(len(z.files))]
        arrays = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"a{i}": a for i, a in enumerate(arrays)})
        tmp.replace(path)
        return arrays


@torch.inference_mode()
def head_logits(net: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    return net.forward_head(torch.from_numpy(features)).float().numpy()
