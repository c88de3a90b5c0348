"""Xception and NASNet baselines, built by timm with random weights (nothing is downloaded).

- ``xception``: timm's ``legacy_xception``, the original Xception of Chollet (2017).
- ``nasnet``: timm's ``nasnetalarge`` (NASNet-A Large). The OA-MEN paper does not say which
  NASNet it used; timm has no NASNet-A Mobile, and the large one is what can be had. It is
  by far the heaviest model here (~85 M parameters).
"""

from __future__ import annotations

import timm
from torch import nn

from model.registry import register_model


@register_model
def xception(num_classes: int = 5, in_chans: int = 1) -> nn.Module:
    return timm.create_model("legacy_xception", pretrained=False, num_classes=num_classes, in_chans=in_chans)


@register_model
def nasnet(num_classes: int = 5, in_chans: int = 1) -> nn.Module:
    return timm.create_model("nasnetalarge", pretrained=False, num_classes=num_classes, in_chans=in_chans)
