"""MobileNet baselines (torchvision v2 and v3-large), random init, 5-class head, gray input."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from model._layers import set_in_chans
from model.registry import register_model


@register_model
def mobilenet_v2(num_classes: int = 5, in_chans: int = 1) -> nn.Module:
    return set_in_chans(tvm.mobilenet_v2(weights=None, num_classes=num_classes), in_chans)


@register_model
def mobilenet_v3(num_classes: int = 5, in_chans: int = 1) -> nn.Module:
    return set_in_chans(tvm.mobilenet_v3_large(weights=None, num_classes=num_classes), in_chans)
