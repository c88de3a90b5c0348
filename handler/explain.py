"""Captum and CAM attributions for one radiograph, and the overlays a reader sees.

Each method of `METHODS` (``layercam`` by default) returns a (H, W) heat map in [0, 1] at the model's
input resolution. What each method hooks: docs/MODEL.md, "Explanations"; what each shows and costs:
docs/EXPLAIN.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency
from torch import nn

METHODS = ("layercam", "gradcam", "ig", "ig_blur", "smoothgrad", "occlusion")
DEFAULT_METHOD = "layercam"  # chosen by python -m ops.explain_eval (docs/EXPLAIN.md)
BLUR_SIGMA = 8.0  # px at the model's input: removes the joint-space edges, keeps the brightness
SMOOTHGRAD_SAMPLES = 8
SMOOTHGRAD_STDEV = 0.15  # in normalised input units (the input's std is about 1)
OCCLUSION_WINDOW, OCCLUSION_STRIDE = 48, 24  # px at 224: 8 x 8 patches


def cam_layer(net: nn.Module) -> nn.Module:
    """The layer Grad-CAM hooks: OA-MEN's named ``fusion`` layer, else the last convolution."""
    fusion = getattr(net, "fusion", None)
    if isinstance(fusion, nn.Module):
        return fusion
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(net).__name__} has no convolution to explain")
    return convs[-1]


def branch_stages(net: nn.Module) -> list[nn.Module]:
    """The stages of OA-MEN's parallel MobileNet-family branch (EfficientNet-Lite or MobileNet-v1), in order;
    empty for a model without one."""
    mobile = getattr(net, "mobile", None)
    blocks = getattr(getattr(mobile, "net", None), "blocks", None)  # LiteBranch wraps the timm-style net
    if blocks is None:
        blocks = getattr(mobile, "blocks", None)  # MobileBranch
    return list(blocks) if isinstance(blocks, nn.Sequential) else []


def _normalise(heat: np.ndarray, top: float) -> np.ndarray:
    heat = np.nan_to_num(heat.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.clip(heat, 0.0, None)
    return np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat)


def blurred(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(1, C, H, W) -> the same image Gaussian-blurred per channel: the baseline of ``ig_blur``,
    ``occlusion`` and the deletion and insertion curves."""
    arr = x.detach().cpu().numpy()[0]
    out = np.stack([cv2.GaussianBlur(c, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for c in arr])
    return torch.from_numpy(out)[None].to(x.device, x.dtype)


def layer_cams(
    net: nn.Module, x: torch.Tensor, target: int, layers: Sequence[nn.Module]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward and one backward pass; per layer the Grad-CAM and the LayerCAM map, (h_l, w_l) each.

    Grad-CAM weighs each channel by its mean gradient; LayerCAM weighs each location by its positive
    gradient, which keeps the fine layers' detail.
    """
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out)) for m in layers]
    try:
        with torch.enable_grad():
            logits = net(x.detach())
            grads = torch.autograd.grad(logits[0, target], acts)
    finally:
        for h in hooks:
            h.remove()
    gradcam = [F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))[0].detach() for a, g in zip(acts, grads, strict=True)]
    layercam = [F.relu((F.relu(g) * a).sum(1))[0].detach() for a, g in zip(acts, grads, strict=True)]
    return gradcam, layercam


def fused_stages(widths: Sequence[int], input_width: int) -> list[int]:
    """Which of a branch's stages ``layercam`` fuses, from their output widths: the last stage at output
    stride 8 and the last at stride 16 (finer ones are edge detectors, coarser ones blur the joint away);
    the last stage when none matches (e.g. a single `cam_layer`)."""
    chosen = []
    for stride in (8, 16):
        at = [i for i, width in enumerate(widths) if input_width / stride / 2 < width <= input_width / stride]
        if at:
            chosen.append(at[-1])
    return list(dict.fromkeys(chosen)) or [len(widths) - 1]


def fuse(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    """Per-layer maps, each scaled to its maximum, upsampled (bilinear) to ``size`` and summed; in [0, 1]."""
    total = torch.zeros(size)
    for m in maps:
        up = F.interpolate(m[None, None].float(), size, mode="bilinear", align_corners=False)[0, 0]
        top = float(up.max())
        if top > 0:
            total += up / top
    heat = total.cpu().numpy()
    return _normalise(heat, float(heat.max()))


def _gradient_heat(attr: torch.Tensor) -> np.ndarray:
    heat = attr.detach()[0].abs().sum(0).cpu().numpy()
    heat = cv2.GaussianBlur(heat, (0, 0), 2.0)  # pixel-noisy; smooth it to read as regions
    return _normalise(heat, float(np.percentile(heat, 99.5)))


def attribute(
    net: nn.Module, x: torch.Tensor, target: int, method: str = DEFAULT_METHOD, ig_steps: int = 16
) -> np.ndarray:
    """Heat map of how much each input pixel supports grade ``target``.

    Args:
        net: the eager model in eval mode (CAMs need module hooks, which TorchScript lacks).
        x: (1, C, H, W) model input.
        target: the class index to explain (its logit is attributed).
        method: one of `METHODS`.
        ig_steps: the steps of ``ig`` (``ig_blur`` takes half as many).
    Returns:
        (H, W) float32 heat map in [0, 1].
    """
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {METHODS}")
    h, w = x.shape[-2:]
    if method == "layercam":
        stages = branch_stages(net) or [cam_layer(net)]
        _, cams = layer_cams(net, x, target, stages)
        return fuse([cams[i] for i in fused_stages([c.shape[-1] for c in cams], w)], (h, w))
    with torch.enable_grad():
        if method == "gradcam":
            cam = LayerGradCam(net, cam_layer(net)).attribute(x, target=target, relu_attributions=True)
            up = LayerAttribution.interpolate(cam.detach(), (h, w), interpolate_mode="bilinear")
            heat = up[0].sum(0).cpu().numpy()
            return _normalise(heat, float(heat.max()))
        if method == "ig":
            return _gradient_heat(
                IntegratedGradients(net).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=ig_steps)
            )
        if method == "ig_blur":
            steps = max(2, ig_steps // 2)
            return _gradient_heat(
                IntegratedGradients(net).attribute(x, baselines=blurred(x), target=target, n_steps=steps)
            )
        if method == "smoothgrad":
            tunnel = NoiseTunnel(Saliency(net))
            attr = tunnel.attribute(
                x, nt_type="smoothgrad", nt_samples=SMOOTHGRAD_SAMPLES, stdevs=SMOOTHGRAD_STDEV, target=target, abs=True
            )
            return _gradient_heat(attr)
        window = max(2, round(OCCLUSION_WINDOW * h / 224)), max(2, round(OCCLUSION_WINDOW * w / 224))
        stride = max(1, round(OCCLUSION_STRIDE * h / 224)), max(1, round(OCCLUSION_STRIDE * w / 224))
        with torch.no_grad():
            attr = Occlusion(net).attribute(
                x,
                sliding_window_shapes=(x.shape[1], *window),
                strides=(x.shape[1], *stride),
                baselines=blurred(x),
                target=target,
                perturbations_per_eval=16,
            )
        heat = attr[0].sum(0).cpu().numpy()
        return _normalise(heat, float(heat.max()))


def heat_grid(heat: np.ndarray, size: int = 16) -> list[list[float]]:
    """The heat map averaged onto a ``size`` x ``size`` grid (row-major, values in [0, 1])."""
    small = cv2.resize(heat, (size, size), interpolation=cv2.INTER_AREA)
    return np.round(small.astype(np.float64), 3).tolist()  # float64: 0.481, not float32's 0.48100000619888306


def unletterbox(heat: np.ndarray, shape: tuple[int, int], fit: str = "letterbox") -> np.ndarray:
    """A (S, S) heat map at the model's input back onto the (h, w) image it was prepared from
    (`model.preprocess.fit_to_square` undone): the letterbox's padding cut off, the rest resized.
    With ``center_crop`` the strips the model never saw stay 0."""
    h, w = shape
    s = heat.shape[0]
    if fit == "resize":
        return cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    if fit not in ("letterbox", "center_crop"):
        raise ValueError(f"unknown fit {fit!r}")
    scale = s / max(h, w) if fit == "letterbox" else s / min(h, w)
    ih, iw = max(1, round(h * scale)), max(1, round(w * scale))
    if fit == "letterbox":
        top, left = (s - ih) // 2, (s - iw) // 2
        return cv2.resize(heat[top : top + ih, left : left + iw], (w, h), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((h, w), np.float32)  # center_crop: the model saw the central s x s of the (ih, iw) image
    ch, cw = round(s / scale), round(s / scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    out[top : top + ch, left : left + cw] = cv2.resize(heat, (cw, ch), interpolation=cv2.INTER_LINEAR)
    return out


def _display(gray: np.ndarray) -> np.ndarray:
    """A decoded (H, W) gray image (float in [0, 1] or uint8) as 8-bit BGR."""
    img = gray if gray.dtype == np.uint8 else np.round(np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


def _blend(bgr: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    colour = cv2.applyColorMap(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(colour, alpha, bgr, 1 - alpha, 0.0)


def _png(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("could not encode the overlay PNG")
    return buf.tobytes()


def overlay_png(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """PNG bytes of the heat map (JET colours) blended over the (H, W) radiograph, at the radiograph's size.

    Args:
        image: the image as sent (decoded float in [0, 1]) or as the model saw it (uint8); same shape as ``heat``.
        heat: (H, W) heat map in [0, 1] (`unletterbox` brings the model's map to the image's size).
    """
    if image.shape != heat.shape:
        raise ValueError(f"the heat map {heat.shape} and the image {image.shape} differ in size")
    return _png(_blend(_display(image), heat, alpha))


def film_overlay_png(
    film: np.ndarray,
    knees: Sequence[tuple[tuple[float, float, float, float], tuple[float, float, float, float], np.ndarray, str]],
    alpha: float = 0.45,
) -> bytes:
    """PNG bytes of a whole film at its native size with each explained knee's heat map in place.

    Args:
        film: (H, W) decoded film (float in [0, 1]).
        knees: per knee, (the square it was cut from, `model.localize.crop_box`; the knee's box as the
            answer gives it; its (S, S) heat map at the model's input; a label such as ``"KL2"``). Each
            map is resized to its square and blended inside it; the box is drawn and labelled.
    """
    h, w = film.shape
    out = _display(film)
    thick = max(1, round(max(h, w) / 400))
    for (x0, y0, x1, _y1), box, heat, label in knees:
        side = max(1, round(x1 - x0))
        ox, oy = round(x0), round(y0)
        heat_full = cv2.resize(heat, (side, side), interpolation=cv2.INTER_LINEAR)
        # the part of the square inside the film
        fx0, fy0, fx1, fy1 = max(0, ox), max(0, oy), min(w, ox + side), min(h, oy + side)
        if fx1 <= fx0 or fy1 <= fy0:
            continue
        part = heat_full[fy0 - oy : fy1 - oy, fx0 - ox : fx1 - ox]
        out[fy0:fy1, fx0:fx1] = _blend(out[fy0:fy1, fx0:fx1], part, alpha)
        bx0, by0, bx1, by1 = (round(v) for v in box)
        cv2.rectangle(out, (bx0, by0), (bx1, by1), (255, 255, 255), thick)
        scale = max(0.5, thick * 0.6)
        cv2.putText(out, label, (bx0, max(0, by0 - 2 * thick)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick)
    return _png(out)
