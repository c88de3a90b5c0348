"""The knee gate: is this image a knee radiograph like the ones the grader learnt from?

A class-conditional Mahalanobis score on the grader's own pooled features (Lee et al., "A
Simple Unified Framework for Detecting Out-of-Distribution Samples", NeurIPS 2018): one mean
per KL grade and one shared covariance, fitted on training knees (`train.calibrate`). The score
of an image is its smallest squared distance to a grade's mean; far from every grade means not a
knee crop. The refusal threshold lives in the contract (``postprocess.gate_threshold``).

The gate is a module with buffers only, so it travels inside the checkpoint and the exported
TorchScript file with the weights it was fitted to.
"""

from __future__ import annotations

import torch
from torch import nn


class KneeGate(nn.Module):
    """(B, D) features -> (B,) squared Mahalanobis distance to the nearest class mean.

    Args:
        num_features: D.
        num_classes: number of class means.
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, num_features))
        self.register_buffer("precision", torch.eye(num_features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

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
        self.fitted.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        # (B, K, D) differences; D is ~1.3k and K 5, so this is a few MFLOP an image.
        diff = f[:, None, :] - self.means[None, :, :]
        d2 = ((diff @ self.precision) * diff).sum(-1)
        return d2.min(dim=1).values
