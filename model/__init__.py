"""KOA-Serve model package: architectures, registry, input contract, decoding, preprocessing.

This is the ground floor: it imports nothing else of the project.
"""

from model import densenet, efficientnet_lite, mobilenet, oamen, resnet, timm_baselines  # noqa: F401  (register builders)
from model.contract import InputContract, PreprocessConfig
from model.registry import create_model, list_models, register_model

__all__ = ["InputContract", "PreprocessConfig", "create_model", "list_models", "register_model"]
