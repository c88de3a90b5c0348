"""Find the knee joints in a whole film and cut each out as the training crops were cut.

`KneeFinder` (a CenterNet-style head on EfficientNet-Lite0's first stages) gives `Joint` boxes
(`find_joints`); `crop_joint` cuts the square the training data would have shown. The head, the crop
and the box convention: docs/MODEL.md, "The knee-joint finder".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.efficientnet_lite import BN_EPS, create_lite0
from model.precision import compiled, padded

# The dataset's crops, measured by eye on a grid (train.annotate): the joint spans 83-97% of the
# crop's width (mean 0.89) and the joint line lies at 52-59% of its height (mean 0.555).
CROP_PER_JOINT_WIDTH = 1.12
JOINT_WIDTH_IN_CROP = 1.0 / CROP_PER_JOINT_WIDTH
JOINT_LINE_IN_CROP = 0.555
VIEWS = ("ap", "other")  # "other": lateral or oblique, which KL grading does not define
STRIDE = 8


@dataclass(frozen=True)
class FinderConfig:
    """How the finder's output becomes joints and decisions; saved with its weights."""

    input_size: int = 256
    score_threshold: float = 0.3  # a heatmap peak at least this high is a joint
    crop_min_share: float = 0.5  # a joint at least this share of the image's width: the image is a crop already
    min_joint_px: int = 56  # narrower joints (source pixels) are refused: resolution_too_low
    max_joints: int = 4
    version: str = "0.0.0"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinderConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Joint:
    """One knee joint found in a film. ``box`` is [x0, y0, x1, y1] in source pixels."""

    box: tuple[float, float, float, float]
    view: str
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def side(self, image_width: int) -> str:
        """Which side of the image (as displayed) the joint is on."""
        return "left" if self.centre[0] < image_width / 2 else "right"


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS), nn.ReLU(inplace=True)
    )


class KneeFinder(nn.Module):
    """(B, 1, S, S) film in [-1, 1] -> (B, 5, S/8, S/8): two view heatmap logits, log joint width
    (as a share of S), and the centre's offset inside its cell (logits of a [0, 1] share)."""

    def __init__(self, pretrained: bool = False, width: int = 64) -> None:
        super().__init__()
        lite = create_lite0(num_classes=0, in_chans=1, pretrained=pretrained)
        self.stem = nn.Sequential(lite.conv_stem, lite.bn1, lite.act)
        self.to8 = lite.blocks[:3]  # stride 8, 40 channels
        self.to16 = lite.blocks[3:5]  # stride 16, 112 channels
        self.lat8 = _conv_bn_relu(40, width, 1)
        self.lat16 = _conv_bn_relu(112, width, 1)
        self.mix = nn.Sequential(_conv_bn_relu(width, width, 3), _conv_bn_relu(width, width, 3))
        self.head = nn.Conv2d(width, len(VIEWS) + 3, 1)
        nn.init.constant_(self.head.bias[: len(VIEWS)], -4.0)  # rare positives: start near 0.02

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ImageNet layers (kept as they are in training): stride-8 and stride-16 features."""
        f8 = self.to8(self.stem(x))
        return f8, self.to16(f8)

    def detect(self, f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        """The trained part: both scales merged at stride 8, then the heatmaps and regressions."""
        up = F.interpolate(self.lat16(f16), size=f8.shape[-2:], mode="nearest")
        return self.head(self.mix(self.lat8(f8) + up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detect(*self.backbone(x))


@dataclass(frozen=True)
class Letterbox:
    """Where the film sits in the finder's square input: input = source * scale + (left, top)."""

    scale: float
    left: int
    top: int


def finder_input(gray: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """A decoded gray film (uint8, uint16 or float [0, 1]) -> (size, size) float32 in [-1, 1].

    Letterboxed (aspect kept), brightness equalised so that another scanner's contrast looks like
    ours, padded with black."""
    img = gray
    if img.dtype != np.uint8:
        f = img.astype(np.float32)
        lo, hi = float(f.min()), float(f.max())
        img = ((f - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(f)).astype(np.uint8)
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    small = cv2.equalizeHist(small)
    canvas = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = small
    return canvas.astype(np.float32) / 127.5 - 1.0, Letterbox(scale, left, top)


def decode_output(out: np.ndarray, cfg: FinderConfig) -> list[tuple[float, float, float, int, float]]:
    """(5, G, G) finder output -> peaks as (cx, cy, width, view index, score) in input pixels,
    best first; one peak per place (the stronger view wins), at most ``cfg.max_joints``."""
    heat = 1.0 / (1.0 + np.exp(-out[: len(VIEWS)]))
    best = heat.max(0)
    view = heat.argmax(0)
    pooled = F.max_pool2d(torch.from_numpy(best)[None, None], 3, 1, 1)[0, 0].numpy()
    ys, xs = np.nonzero((best >= pooled) & (best >= cfg.score_threshold))
    order = np.argsort(-best[ys, xs])
    peaks: list[tuple[float, float, float, int, float]] = []
    size = out.shape[-1] * STRIDE
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        off = 1.0 / (1.0 + np.exp(-out[len(VIEWS) + 1 : len(VIEWS) + 3, y, x]))
        cx, cy = float(x + off[0]) * STRIDE, float(y + off[1]) * STRIDE
        width = float(np.exp(out[len(VIEWS), y, x])) * size
        # a second peak inside a stronger joint is the same joint
        if any(abs(cx - p[0]) < 0.5 * max(width, p[2]) and abs(cy - p[1]) < 0.5 * max(width, p[2]) for p in peaks):
            continue
        peaks.append((cx, cy, width, int(view[y, x]), float(best[y, x])))
        if len(peaks) == cfg.max_joints:
            break
    return peaks


def to_source(peak: tuple[float, float, float, int, float], lb: Letterbox) -> Joint:
    cx, cy, width, view, score = peak
    sx, sy, sw = (cx - lb.left) / lb.scale, (cy - lb.top) / lb.scale, width / lb.scale
    return Joint((sx - sw / 2, sy - sw / 2, sx + sw / 2, sy + sw / 2), VIEWS[view], score)


@torch.inference_mode()
def find_joints(
    net: nn.Module, cfg: FinderConfig, grays: list[np.ndarray], device: torch.device | str = "cpu"
) -> list[list[Joint]]:
    """The knee joints of each film, best first, in each film's own pixels (one batched forward on
    ``device``, where ``net`` lives)."""
    if not grays:
        return []
    inputs, boxes = zip(*(finder_input(g, cfg.input_size) for g in grays), strict=True)
    x = torch.from_numpy(np.stack(inputs))[:, None].to(device).contiguous(memory_format=torch.channels_last)
    out = net(padded(x)).float().cpu().numpy()[: len(grays)]  # padded: a batch size compiled for
    return [[to_source(p, lb) for p in decode_output(o, cfg)] for o, lb in zip(out, boxes, strict=True)]


def is_crop(joints: list[Joint], image_width: int, cfg: FinderConfig) -> bool:
    """The image is a joint crop already (the dataset's framing, tighter or wider) when its
    strongest AP joint spans at least ``cfg.crop_min_share`` of its width."""
    ap = [j for j in joints if j.view == "ap"]
    return bool(ap) and ap[0].width >= cfg.crop_min_share * image_width


def crop_box(joint: Joint) -> tuple[float, float, float, float]:
    """The square, in source pixels, that the training data would have shown around ``joint``."""
    cx, cy = joint.centre
    side = joint.width * CROP_PER_JOINT_WIDTH
    top = cy - JOINT_LINE_IN_CROP * side
    return cx - side / 2, top, cx + side / 2, top + side


def crop_joint(gray: np.ndarray, joint: Joint) -> np.ndarray:
    """Cut `crop_box` out of the film at its own resolution (black beyond the film's edge)."""
    x0, y0, x1, y1 = crop_box(joint)
    side = max(1, round(x1 - x0))
    m = np.float32([[1, 0, -x0], [0, 1, -y0]])
    return cv2.warpAffine(gray, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def save_finder(path: str | Path, net: KneeFinder, cfg: FinderConfig, **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": net.state_dict(), "config": json.dumps(asdict(cfg)), **extra}, tmp)
    tmp.replace(path)
    return path


def serving_finder(
    net: KneeFinder, size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The finder as the server runs it: traced and frozen, in channels-last memory, on ``device``, in
    ``dtype`` (`model.precision`).

    Same outputs as the eager module in float32 (tests/test_localize.py); on the 2 CPU cores of these
    machines about 1.8 times the images per second at batch 1 and 2.6 times at batch 8, and bfloat16
    doubles that again (docs/BENCHMARKS.md).
    """
    return compiled(net, torch.zeros(1, 1, size, size, device=device), dtype)


def load_serving_finder(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, FinderConfig] | None:
    """The server's finder from its weights file (`serving_finder`) in ``dtype`` (the handler passes the
    grader's serving dtype, `model.precision.serving_dtype`), or None when there is none."""
    if not Path(path).is_file():
        return None
    net, cfg = load_finder(path)
    return serving_finder(net, cfg.input_size, device, dtype), cfg


def load_finder(path: str | Path) -> tuple[KneeFinder, FinderConfig]:
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    net = KneeFinder(pretrained=False)
    net.load_state_dict(state["model"])
    net.eval()
    return net, FinderConfig.from_dict(json.loads(state["config"]))


@dataclass(frozen=True)
class Plan:
    """What to do with one image: grade it as it is (``crop``; ``joints`` holds its strongest AP joint),
    grade the joints cut out of it (``film``), or refuse it (``refuse``, with ``error`` the refusal type).
    ``skipped`` are joints found in a film that are not graded, each with its reason."""

    kind: str
    joints: tuple[Joint, ...] = ()
    skipped: tuple[tuple[Joint, str], ...] = ()
    error: str | None = None
    message: str = ""


def plan(joints: list[Joint], image_shape: tuple[int, int], cfg: FinderConfig) -> Plan:
    """The decision for an image from the joints the finder saw in it (best first)."""
    h, w = image_shape
    ap = [j for j in joints if j.view == "ap"]
    if is_crop(joints, w, cfg):
        return Plan("crop", (ap[0],))
    sharp = [j for j in ap if j.width >= cfg.min_joint_px]
    small = [(j, "resolution_too_low") for j in ap if j.width < cfg.min_joint_px]
    other = [(j, "unsupported_view") for j in joints if j.view != "ap"]
    if sharp:
        return Plan("film", tuple(sorted(sharp, key=lambda j: j.centre[0])), tuple(small + other))
    if small:
        widest = max(j.width for j, _ in small)
        return Plan(
            "refuse", skipped=tuple(small + other), error="resolution_too_low",
            message=f"the knee joint spans {widest:.0f} pixels of this {w}x{h} image; at least {cfg.min_joint_px} "
            "are needed to grade it: send the film at its full resolution",
        )  # fmt: skip
    if other:
        return Plan(
            "refuse", skipped=tuple(other), error="unsupported_view",
            message="this looks like a lateral or oblique view of the knee: Kellgren-Lawrence grading is defined on "
            "AP/PA views; send the AP/PA film",
        )  # fmt: skip
    return Plan("refuse", error="not_a_knee", message="no knee joint was found in this image")


# How a joint crop is read: ``whole`` (letterboxed as it is: the default), or ``joint``: cut around its
# joint as a film's knee is (`crop_joint`), at the scale the training crops show. A site profile may
# choose ``joint`` for a site that frames its crops otherwise (docs/SITES.md, "Reading a site's crops").
WHOLE = "whole"
READINGS = (WHOLE, "joint")


def crop_view(gray: np.ndarray, p: Plan, reading: str = WHOLE) -> np.ndarray:
    """The image graded for a ``crop`` plan: ``gray`` itself, or with ``reading="joint"`` its joint cut out
    (`crop_joint`); ``gray`` when the plan holds no joint (no finder)."""
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    return crop_joint(gray, p.joints[0]) if reading == "joint" and p.joints else gray
