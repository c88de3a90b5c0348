"""Checkpoints and TorchScript files that carry their input contract.

A checkpoint is a plain dict of tensors and JSON strings, loadable with
``torch.load(weights_only=True)`` (no pickle of arbitrary objects). The TorchScript file
stores the contract as an ``_extra_files`` entry. Both the trainer (`train/`) and the server
(`handler/`) read these files, so the format lives here, in the ground floor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.contract import InputContract
from model.registry import create_model

CONTRACT_FILE = "contract.json"


def save_checkpoint(path: str | Path, model: nn.Module, contract: InputContract, **extra: Any) -> Path:
    """Write weights + contract atomically.

    ``extra`` entries (optimizer state, epoch, config as JSON text, ...) must be plain
    containers of tensors, numbers and strings so that ``weights_only=True`` can read them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**extra, "model": model.state_dict(), "contract": contract.to_json()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check it carries a contract.

    Returns the raw dict with ``contract`` parsed into an `InputContract`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a KOA-Serve checkpoint (no 'model' entry)")
    if "contract" not in state:
        raise ValueError(
            f"{path} has no input contract: it cannot be served or evaluated safely. "
            "Re-export it from train.fit, which always saves the contract."
        )
    state["contract"] = InputContract.from_json(state["contract"])
    return state


def load_weights(net: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights (`load_checkpoint`'s dict, read from ``path``) into ``net``, built for
    its contract. Checkpoints from before the knee gate existed load with an unfitted gate (it refuses
    nothing until `train.calibrate` fits it); anything else missing or unexpected is an error."""
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    if "knee_gate.means" in weights:  # the single-layer gate of oamen_pt 1.0.0 and before
        if bool(weights["knee_gate.fitted"]):
            raise RuntimeError(
                f"{path} carries a knee gate fitted for the old single-layer format: re-fit it with "
                "`python -m train.calibrate --run RUN --out OUT` (make promote RUN=...)"
            )
        weights = {k: v for k, v in weights.items() if not k.startswith("knee_gate.")}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("knee_gate.")]
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not fit {type(net).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def model_from_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, InputContract]:
    """Rebuild the registered architecture named by the contract and load its weights (eval mode)."""
    state = load_checkpoint(path, map_location)
    contract: InputContract = state["contract"]
    net = create_model(contract.model_name, num_classes=contract.num_classes, in_chans=contract.channels)
    load_weights(net, state, path)
    return net.to(map_location).eval(), contract


def load_torchscript(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, InputContract]:
    """Load an exported TorchScript model and the contract embedded in it."""
    files = {CONTRACT_FILE: ""}
    module = torch.jit.load(str(path), map_location=map_location, _extra_files=files)
    if not files[CONTRACT_FILE]:
        raise ValueError(f"{path} has no embedded {CONTRACT_FILE}; export it with train.export")
    return module.eval(), InputContract.from_json(files[CONTRACT_FILE])
