"""The knee gate: is this image a knee radiograph like the ones the grader learnt from?

Class-conditional Mahalanobis scores over several layers (Lee et al., NeurIPS 2018), standardised on
the tune fold; the threshold lives in the contract. A module with buffers only, so it travels with the
weights it was fitted to. The score in full: docs/MODEL.md, "The knee gate".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MahalanobisScore(nn.Module):
    """(B, D) features -> (B,) squared Mahalanobis distance to the nearest class mean.

    Args:
        num_features: D.
        num_classes: number of class means.
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, num_features))
        self.register_buffer("precision", torch.eye(num_features))

    @torch.no_grad()
    def set_statistics(self, means: torch.Tensor, precision: torch.Tensor) -> None:
        """Install fitted means (K, D) and the shared precision matrix (D, D)."""
        if means.shape != self.means.shape or precision.shape != self.precision.shape:
            raise ValueError(
                f"gate statistics of shapes {tuple(means.shape)}, {tuple(precision.shape)} do not fit "
                f"{tuple(self.means.shape)}, {tuple(self.precision.shape)}"
            )
        self.means.copy_(means)
        self.precision.copy_(precision)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        # (B, K, D) differences; D is at most 1280 and K 5, so this is a few MFLOP an image.
        diff = f[:, None, :] - self.means[None, :, :]
        d2 = ((diff @ self.precision) * diff).sum(-1)
        return d2.min(dim=1).values


class KneeGate(nn.Module):
    """L layers' (B, D_l) pooled features -> (B,) largest standardised Mahalanobis score.

    Until fitted, every layer scores 0 and the gate refuses nothing.

    Args:
        layer_dims: D_l of each layer the gate reads, in the order ``forward`` receives them.
        num_classes: number of class means per layer.
    """

    def __init__(self, layer_dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not layer_dims:
            raise ValueError("the knee gate needs at least one feature layer")
        self.layer_dims = tuple(int(d) for d in layer_dims)
        self.layers = nn.ModuleList(MahalanobisScore(d, num_classes) for d in self.layer_dims)
        n = len(self.layer_dims)
        self.register_buffer("loc", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def set_statistics(self, layer: int, means: torch.Tensor, precision: torch.Tensor) -> None:
        """Install one layer's fitted class means (K, D_l) and shared precision (D_l, D_l)."""
        self.layers[layer].set_statistics(means, precision)

    @torch.no_grad()
    def set_standardisation(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Install each layer's (L,) reference mean and standard deviation; marks the gate fitted."""
        if loc.shape != self.loc.shape or scale.shape != self.scale.shape:
            n = len(self.layer_dims)
            raise ValueError(f"expected ({n},) loc and scale, got {tuple(loc.shape)}, {tuple(scale.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError(f"scales must be positive, got {scale.tolist()}")
        self.loc.copy_(loc)
        self.scale.copy_(scale)
        self.fitted.fill_(True)

    def layer_scores(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, L) raw squared Mahalanobis distances, one column per layer."""
        if len(features) != len(self.layers):
            raise ValueError(f"the gate reads {len(self.layers)} feature layers, got {len(features)}")
        return torch.stack([m(f) for m, f in zip(self.layers, features)], dim=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        z = (self.layer_scores(features) - self.loc) / self.scale
        # An unfitted gate scores 0 (and its contract has none). The flag is cast: a frozen TorchScript
        # module folds the buffer into a constant, and multiplying by a boolean constant does not compile.
        return z.max(dim=1).values * self.fitted.to(z.dtype)
