"""Model registry: builders registered by name, reached through `create_model` / `list_models`.

Modelled on timm's `_registry.py` and torchvision's `get_model`: a builder is a plain function
`name(**kw) -> nn.Module` decorated with `@register_model`; every builder accepts at least
``num_classes`` and ``in_chans``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED: set[str] = set()
# The paper's baselines register when first asked for: importing them pulls in torchvision's model
# zoo and timm, which the served OA-MEN needs neither of (a smaller, faster-starting worker).
# tests/test_models.py checks that each module registers exactly the names listed for it.
LAZY_MODULES: dict[str, tuple[str, ...]] = {
    "model.resnet": ("resnet18", "resnet34", "resnet50"),
    "model.densenet": ("densenet121",),
    "model.mobilenet": ("mobilenet_v2", "mobilenet_v3"),
    "model.timm_baselines": ("xception", "nasnet"),
}
_LAZY = {name: module for module, names in LAZY_MODULES.items() for name in names}
# OA-MEN and EfficientNet-Lite register when the registry is first asked, not when `model` is imported:
# they import torch, which the torch-free processes reading model.settings and model.paths must not.
CORE_MODULES = ("model.efficientnet_lite", "model.oamen")


def _load(name: str | None = None) -> None:
    """Import the served architectures, then the module of a lazily registered model ``name``."""
    for module in CORE_MODULES:
        importlib.import_module(module)  # deliberate lazy load of torch and the architectures
    if name is not None and name not in _MODELS and name in _LAZY:
        importlib.import_module(_LAZY[name])


def register_model(fn: Callable[..., nn.Module] | None = None, *, pretrained: bool = False):
    """Register ``fn`` under its own name; a second builder with the same name is an error.

    ``@register_model(pretrained=True)`` marks a builder that accepts ``pretrained=True`` and
    then starts from weights installed with the packages (nothing is downloaded).
    """

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _MODELS:
            raise RuntimeError(f"model {name!r} is registered twice")
        _MODELS[name] = f
        if pretrained:
            _PRETRAINED.add(name)
        return f

    return add(fn) if fn is not None else add


def has_pretrained(name: str) -> bool:
    """Whether the builder ``name`` can start from installed ImageNet weights."""
    _load(name)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return name in _PRETRAINED


def list_models() -> list[str]:
    """Names of all registered models (those registered lazily included), sorted."""
    _load()
    return sorted(set(_MODELS) | set(_LAZY))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model with random initial weights.

    Args:
        name: a name from `list_models()`.
        **kwargs: passed to the builder (``num_classes``, ``in_chans``, variant fields).
    """
    _load(name)
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None
    return builder(**kwargs)
