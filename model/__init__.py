"""KOA-Serve model package: architectures, registry, input contract, decoding, preprocessing.

This is the ground floor: it imports nothing else of the project.
"""

# OA-MEN and EfficientNet-Lite0 register here; the baselines when first asked for (model.registry).
from model import efficientnet_lite, oamen  # noqa: F401  (register builders)
from model.contract import InputContract, PreprocessConfig
from model.registry import create_model, list_models, register_model

__all__ = ["InputContract", "PreprocessConfig", "create_model", "list_models", "register_model"]
