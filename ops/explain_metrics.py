"""Measures of an explanation, as pure functions: where the heat lies, whether it is faithful, whether it
depends on the weights. `ops.explain_eval` runs them over val knees; docs/EXPLAIN.md reports them.

- Localisation: the share of the heat inside the tibiofemoral joint region, found in each image from its
  row intensity profile (`joint_rows`: the dark gap between the femoral condyles and the tibial plateau,
  per compartment), with margins that hold the osteophytes and the sclerosis (`joint_mask`); and the share
  in the fixed rows 35-65% of the 16 x 16 grid that issue 34's targets use (`band_share`).
- Faithfulness: deletion and insertion curves (Petsiuk et al., RISE, BMVC 2018): the probability of the
  grade explained as the most-attributed cells are replaced by a blurred copy of the image (deletion), or
  restored onto that blurred copy (insertion); `auc` of each, against a random order of cells.
- Sanity check (Adebayo et al., NeurIPS 2018): the weights randomised layer group by layer group from the
  top (`cascade_groups`, `randomise`); the Spearman rank correlation (`spearman`) of each map with the
  trained model's must fall, or the map shows the image, not the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from train.data import scan

FRACTIONS = tuple(float(f) for f in np.linspace(0.0, 1.0, 6))  # of the cells removed or restored: 0, 20%, ..
JOINT_MARGIN = 0.12  # of the crop's height above and below the joint line: osteophytes, sclerosis
COMPARTMENTS = ((0.12, 0.42), (0.58, 0.88))  # columns (share of the width) read for each compartment's line
SEARCH_ROWS = (0.25, 0.8)  # where the joint line may lie (share of the height)
VALLEY_PX = 10  # how far above and below a row the bright bone that bounds the gap is looked for


def joint_rows(image: np.ndarray) -> tuple[int, int]:
    """The joint line's row in each compartment (left and right half, as displayed) of a knee crop.

    The joint space is a thin dark gap with bright bone above (condyle) and below (plateau): per
    compartment, the row of the column-averaged, smoothed profile whose darkness against the brightest
    rows within `VALLEY_PX` above and below is largest. Two lines further apart than `JOINT_MARGIN` of the
    height (one compartment misread) are both set to the stronger one's.

    Args:
        image: (H, W) gray crop, any dtype.
    """
    if image.ndim != 2 or min(image.shape) < 4 * VALLEY_PX:
        raise ValueError(f"expected a 2-D crop at least {4 * VALLEY_PX} px on each side, got shape {image.shape}")
    g = image.astype(np.float32)
    h, w = g.shape
    found: list[tuple[float, int]] = []
    for a, b in COMPARTMENTS:
        prof = g[:, int(a * w) : max(int(a * w) + 1, int(b * w))].mean(1)
        prof = np.convolve(np.pad(prof, 2, mode="edge"), np.ones(5) / 5, mode="valid")
        best, row = -np.inf, h // 2
        for r in range(int(SEARCH_ROWS[0] * h), int(SEARCH_ROWS[1] * h)):
            depth = min(prof[max(0, r - VALLEY_PX) : r].max(), prof[r + 1 : r + 1 + VALLEY_PX].max()) - prof[r]
            if depth > best:
                best, row = depth, r
        found.append((best, row))
    (d0, r0), (d1, r1) = found
    if abs(r0 - r1) > JOINT_MARGIN * h:
        r0 = r1 = r0 if d0 >= d1 else r1
    return r0, r1


def joint_mask(image: np.ndarray, margin: float = JOINT_MARGIN) -> np.ndarray:
    """(H, W) bool: the joint region of a knee crop, each half's joint line (`joint_rows`) +- ``margin`` x H,
    across the middle 90% of the width (the joint's margins hold the osteophytes)."""
    h, w = image.shape
    mask = np.zeros((h, w), bool)
    m = round(margin * h)
    for (a, b), r in zip(((0.05, 0.5), (0.5, 0.95)), joint_rows(image), strict=True):
        mask[max(0, r - m) : r + m + 1, int(a * w) : int(b * w)] = True
    return mask


def share(heat: np.ndarray, mask: np.ndarray) -> float:
    """The share of the heat inside ``mask`` (same shape); 0 for a map with no heat."""
    if heat.shape != mask.shape:
        raise ValueError(f"heat {heat.shape} and mask {mask.shape} differ in shape")
    total = float(np.clip(heat, 0, None).sum())
    return float(np.clip(heat, 0, None)[mask].sum()) / total if total > 0 else 0.0


def band_share(grid: np.ndarray | Sequence[Sequence[float]], lo: float = 0.35, hi: float = 0.65) -> float:
    """The share of a (n, n) grid's heat in rows ``int(lo n)`` to ``int(hi n)`` (rows 5-9 of 16 for 35-65%;
    a uniform map gives 5/16 = 0.31); ``lo=0, hi=0.15``: the top rows (2 of 16)."""
    g = np.clip(np.asarray(grid, dtype=np.float64), 0, None)
    if g.ndim != 2:
        raise ValueError(f"expected a 2-D grid, got shape {g.shape}")
    n = g.shape[0]
    total = g.sum()
    return float(g[int(lo * n) : int(hi * n)].sum() / total) if total > 0 else 0.0


def cell_order(heat: np.ndarray, cell: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Cells of ``cell`` x ``cell`` px, most-attributed first (mean heat per cell); a random order with ``rng``.
    Returns flat cell indices of the (H / cell, W / cell) grid."""
    h, w = heat.shape
    if h % cell or w % cell:
        raise ValueError(f"a {h}x{w} map does not divide into {cell} px cells")
    means = heat.reshape(h // cell, cell, w // cell, cell).mean((1, 3)).ravel()
    if rng is not None:
        return rng.permutation(means.size)
    return np.argsort(-means, kind="stable")


def perturbed(
    x: torch.Tensor, base: torch.Tensor, order: np.ndarray, cell: int, mode: str, fractions: Sequence[float] = FRACTIONS
) -> torch.Tensor:
    """The images of a deletion (``mode="deletion"``: cells in ``order`` replaced by ``base``) or insertion
    (``"insertion"``: cells restored onto ``base``) curve, one per fraction: (len(fractions), C, H, W)."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    _, _, h, w = x.shape
    gw = w // cell
    out = []
    for f in fractions:
        chosen = np.zeros((h // cell) * gw, bool)
        chosen[order[: round(f * len(order))]] = True
        mask = torch.from_numpy(np.kron(chosen.reshape(h // cell, gw), np.ones((cell, cell))).astype(np.float32))
        keep_x = 1 - mask if mode == "deletion" else mask
        out.append(x[0] * keep_x + base[0] * (1 - keep_x))
    return torch.stack(out)


def auc(values: Sequence[float], fractions: Sequence[float] = FRACTIONS) -> float:
    """Area under a curve sampled at ``fractions`` (trapezoids), for a curve in [0, 1] also in [0, 1]."""
    v, f = np.asarray(values, dtype=np.float64), np.asarray(fractions, dtype=np.float64)
    if v.shape != f.shape:
        raise ValueError(f"{v.size} values for {f.size} fractions")
    return float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(f)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape; 0 when either is constant."""
    if a.shape != b.shape:
        raise ValueError(f"maps {a.shape} and {b.shape} differ in shape")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def cascade_groups(net: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's layer groups from the output down, for cascading randomisation (Adebayo et al. 2018).

    OA-MEN: the head; the fusion layer and the branch's last stage; then trunk stage and branch stages of
    about the same depth together, down to the stems. Another model: its top-level children, last first.
    """
    stages = getattr(net, "stages", None)
    mobile = getattr(net, "mobile", None)
    branch = getattr(getattr(mobile, "net", None), "blocks", None) or getattr(mobile, "blocks", None)
    if not (hasattr(net, "head") and hasattr(net, "fusion") and stages is not None and branch is not None):
        return [(name, [m]) for name, m in reversed(list(net.named_children()))]
    b = list(branch)
    lite = getattr(mobile, "net", None)
    tail = [m for m in (getattr(lite, "conv_head", None), getattr(lite, "bn2", None)) if m is not None]
    head_of_stem = [m for m in (getattr(lite, "conv_stem", None), getattr(lite, "bn1", None)) if m is not None]
    n = len(b) - 1  # branch stages left below its last
    split = [b[round(n * 2 / 3) : n], b[round(n / 3) : round(n * 2 / 3)], b[: round(n / 3)]]
    return [
        ("head", [net.head]),
        ("fusion + branch's last stage", [net.fusion, b[-1], *tail]),
        ("trunk C5-C4 + branch's upper stages", [stages[3], stages[2], *split[0]]),
        ("trunk C3 + branch's middle stages", [stages[1], *split[1]]),
        ("trunk C2, stems + branch's first stages", [stages[0], net.stem, *split[2], *head_of_stem]),
    ]


def randomise(modules: Sequence[nn.Module], seed: int) -> None:
    """Re-initialise, in place, every convolution, linear and batch-norm layer inside ``modules`` with
    PyTorch's default initialisation (batch norms: identity affine and fresh running statistics)."""
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        for module in modules:
            for m in module.modules():
                if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
                    m.reset_parameters()


def sample_knees(root: Path, split: str, n: int, seed: int, num_classes: int) -> list[tuple[Path, int]]:
    """``n`` knees of ``split``, ``n / num_classes`` per grade (seeded), interleaved by grade so that any
    prefix is about as balanced as the whole."""
    if split == "test":
        raise ValueError("the test split is held back: measure explanations on val")
    samples = [s for s in scan(root, num_classes) if s.split == split]
    if not samples:
        raise FileNotFoundError(f"no {split} knees under {root}")
    rng = np.random.default_rng(seed)
    per = max(1, n // num_classes)
    by_grade = []
    for g in range(num_classes):
        files = sorted(s.path for s in samples if s.grade == g)
        by_grade.append([(files[i], g) for i in rng.permutation(len(files))[:per]])
    return [k for row in zip(*by_grade, strict=False) for k in row][:n]
