"""ResNet baselines (torchvision), random init, 5-class head, gray input."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from model._layers import set_in_chans
from model.registry import register_model


def _resnet(builder, num_classes: int = 5, in_chans: int = 1) -> nn.Module:
    return set_in_chans(builder(weights=None, num_classes=num_classes), in_chans)


@register_model
def resnet18(**kw) -> nn.Module:
    return _resnet(tvm.resnet18, **kw)


@register_model
def resnet34(**kw) -> nn.Module:
    return _resnet(tvm.resnet34, **kw)


@register_model
def resnet50(**kw) -> nn.Module:
    return _resnet(tvm.resnet50, **kw)
