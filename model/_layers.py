"""Small layer helpers shared by the model families."""

from __future__ import annotations

from torch import nn


def set_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace the first 3-channel convolution of a randomly initialised model.

    torchvision's builders have no ``in_chans`` argument; gray radiographs have one channel.
    Nothing is pretrained here, so the new convolution is freshly initialised like the old.
    """
    if in_chans == 3:
        return model
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(
                    in_chans,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups if child.groups == 1 else in_chans,
                    child.bias is not None,
                )
                nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
                setattr(parent, child_name, new)
                return model
    raise RuntimeError(f"no 3-channel input convolution found in {type(model).__name__}")
