"""KOA-Serve model package: architectures, registry, input contract, decoding, preprocessing.

This is the ground floor: it imports nothing else of the project. Importing it does not import torch:
the architectures register when the registry is first asked (`model.registry`), so torch-free processes
(``ops.server``, the drain in ``handler.drain``) can read `model.settings` and `model.paths`.
"""

from model.contract import InputContract, PreprocessConfig
from model.registry import create_model, list_models, register_model

__all__ = ["InputContract", "PreprocessConfig", "create_model", "list_models", "register_model"]
