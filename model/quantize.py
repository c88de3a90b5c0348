"""The grader's ResNet trunk in int8, on CPUs where bfloat16 is not native (docs/MODEL.md, "Number format").

Static post-training quantisation (torch.ao FX, the ``x86`` engine: int8 weights per channel, 7-bit
activations) of the trunk and its fusion only; the EfficientNet-Lite branch, the head and the knee
gate stay in float32. The branch did not survive int8 (docs/MODEL.md, "The trunk in int8"), the
trunk does: on val, site2, the non-knee radiographs and the leg films every answer was unchanged
(docs/results/int8_trunk.json).

The activation ranges are measured once on training knees (`make int8-trunk`, `ops.int8_trunk`) and committed as a small
table bound to the trunk's weights (`weights/oamen.int8.json`); the worker rebuilds the int8 trunk
from the float weights and that table, without data. A table made for other weights, or for another
graph, is refused: the worker then serves float32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.oamen import OAMEN, Trunk

log = logging.getLogger(__name__)

ENGINE = "x86"
FORMAT = "int8-trunk-v1"
TABLE = "int8_trunk.json"  # its name in the archive
COMMITTED = "weights/oamen.int8.json"  # what make archive packs as TABLE (make int8-trunk measures it)


class TableError(ValueError):
    """A quantisation table that does not fit the model it is given with."""


def load_table(path: str | Path) -> dict[str, Any] | None:
    """A quantisation table (the archive's ``int8_trunk.json``), or None (and a warning) when it is missing
    or unreadable: the server then serves float32."""
    path = Path(path)
    if not path.is_file():
        log.warning("no %s: the grader's trunk stays in float32", path)
        return None
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable, the grader's trunk stays in float32: %s", path, exc)
        return None
    return table


def supported() -> bool:
    """Whether this torch build runs int8 convolutions on this CPU with the ``x86`` engine."""
    return ENGINE in torch.backends.quantized.supported_engines


def trunk_digest(net: OAMEN) -> str:
    """sha256 over the trunk's float weights and buffers (names and bytes, in order): what a table is bound to."""
    h = hashlib.sha256()
    for name, t in Trunk(net).state_dict().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes())
    return h.hexdigest()


def _qconfig(calibrating: bool):
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver

    mapping = get_default_qconfig_mapping(ENGINE)
    if calibrating:  # histograms: ranges that minimise the quantisation error
        return mapping
    # rebuilding: the measured ranges are set on plain min/max observers (same dtype and range)
    weight = mapping.global_qconfig.weight
    return mapping.set_global(QConfig(activation=MinMaxObserver.with_args(reduce_range=True), weight=weight))


def _observers(prepared: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.quantization.observer import ObserverBase

    return {n: m for n, m in prepared.named_modules() if isinstance(m, ObserverBase) and n}


def _prepare(net: OAMEN, calibrating: bool, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = ENGINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # a copy of the trunk alone: prepare_fx fuses its layers in place
        return prepare_fx(copy.deepcopy(Trunk(net)).eval().float(), _qconfig(calibrating), (example,))


def calibrate(net: OAMEN, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """The table: each activation's int8 range, measured on ``batches`` of model inputs (float32, NCHW)."""
    batches = list(batches)
    prepared = _prepare(net, True, batches[0][:1])
    with torch.inference_mode():
        for x in batches:
            prepared(x)
    ranges = {}
    for name, obs in _observers(prepared).items():
        if obs.dtype != torch.quint8:  # the weights' observers run at conversion, from the weights
            continue
        scale, zero = (float(v.reshape(-1)[0]) for v in obs.calculate_qparams())
        # the range whose min/max qparams are exactly these: [(qmin - z) s, (qmax - z) s]
        ranges[name] = [(obs.quant_min - zero) * scale, (obs.quant_max - zero) * scale]
    return {
        "format": FORMAT,
        "engine": ENGINE,
        "trunk_sha256": trunk_digest(net),
        "images": int(sum(len(x) for x in batches)),
        "ranges": ranges,
    }


def with_int8_trunk(net: OAMEN, table: dict[str, Any]) -> OAMEN:
    """A copy of ``net`` (float32, eval) whose trunk runs in int8 with ``table``'s ranges.

    Raises `TableError` when the table was made for other weights or another graph."""
    from torch.ao.quantization.quantize_fx import convert_fx

    if not isinstance(net, OAMEN):
        raise TableError(f"only OA-MEN's trunk is quantised, not {type(net).__name__}'s")
    if table.get("format") != FORMAT or table.get("engine") != ENGINE:
        raise TableError(f"not an {FORMAT} table for the {ENGINE} engine")
    if table.get("trunk_sha256") != trunk_digest(net):
        raise TableError("the table was measured for other trunk weights")
    if not supported():
        raise TableError(f"this torch build has no {ENGINE} quantized engine")
    example = torch.zeros(1, net.cfg.in_chans, 32, 32)
    prepared = _prepare(net, False, example)
    observers = {n: o for n, o in _observers(prepared).items() if o.dtype == torch.quint8}
    if set(observers) != set(table["ranges"]):
        raise TableError("the table's activations are not this graph's (another torch version?)")
    for name, obs in observers.items():
        lo, hi = table["ranges"][name]
        obs.min_val = torch.tensor(lo)
        obs.max_val = torch.tensor(hi)
    served = copy.deepcopy(net).eval().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.ao's deprecation notices, once per start
        served.int8_trunk = convert_fx(prepared)
    return served
