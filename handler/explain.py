"""Captum attributions for one radiograph: Grad-CAM on the fused feature layer, or Integrated Gradients.

Both return a (H, W) heat map in [0, 1] at the model's input resolution; `heat_grid` shrinks
it to a small grid for machines and `overlay_png` blends it over the preprocessed radiograph
(the image the model actually saw) for people.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from torch import nn

METHODS = ("gradcam", "ig")


def cam_layer(net: nn.Module) -> nn.Module:
    """The layer Grad-CAM hooks: OA-MEN's named ``fusion`` layer, else the last convolution."""
    fusion = getattr(net, "fusion", None)
    if isinstance(fusion, nn.Module):
        return fusion
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(net).__name__} has no convolution to explain")
    return convs[-1]


def _normalise(heat: np.ndarray, top: float) -> np.ndarray:
    heat = np.nan_to_num(heat.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.clip(heat, 0.0, None)
    return np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat)


def attribute(net: nn.Module, x: torch.Tensor, target: int, method: str = "gradcam", ig_steps: int = 16) -> np.ndarray:
    """Heat map of how much each input pixel supports grade ``target``.

    Args:
        net: the eager model in eval mode (Grad-CAM needs module hooks, which TorchScript lacks).
        x: (1, C, H, W) model input.
        target: the class index to explain.
        method: ``gradcam`` (one forward and one backward) or ``ig`` (``ig_steps`` of them).
    Returns:
        (H, W) float32 heat map in [0, 1].
    """
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {METHODS}")
    h, w = x.shape[-2:]
    with torch.enable_grad():
        if method == "gradcam":
            cam = LayerGradCam(net, cam_layer(net)).attribute(x, target=target, relu_attributions=True)
            up = LayerAttribution.interpolate(cam.detach(), (h, w), interpolate_mode="bilinear")
            heat = up[0].sum(0).cpu().numpy()
            return _normalise(heat, float(heat.max()))
        ig = IntegratedGradients(net).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=ig_steps)
        heat = ig.detach()[0].abs().sum(0).cpu().numpy()
        heat = cv2.GaussianBlur(heat, (0, 0), 2.0)  # IG is pixel-noisy; smooth it to read as regions
        return _normalise(heat, float(np.percentile(heat, 99.5)))


def heat_grid(heat: np.ndarray, size: int = 16) -> list[list[float]]:
    """The heat map averaged onto a ``size`` x ``size`` grid (row-major, values in [0, 1])."""
    small = cv2.resize(heat, (size, size), interpolation=cv2.INTER_AREA)
    return np.round(small.astype(np.float64), 3).tolist()  # float64: 0.481, not float32's 0.48100000619888306


def overlay_png(prepared: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """PNG bytes of the heat map (JET colours) blended over the (H, W) uint8 radiograph."""
    gray = cv2.cvtColor(prepared, cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(colour, alpha, gray, 1 - alpha, 0.0)
    ok, buf = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("could not encode the overlay PNG")
    return buf.tobytes()
