"""The number format the server runs its networks in: bfloat16 where the processor computes it natively.

``auto`` keeps float32 where bfloat16 would be emulated, with the grader's ResNet trunk in int8 where
the archive holds its quantisation table (`model.quantize`); ``$KOA_PRECISION`` (``auto``, ``fp32``,
``bf16`` or ``int8``) overrides the choice. Why, and what stays in float32: docs/MODEL.md, "Number format".
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from model import quantize
from model.contract import InputContract
from model.registry import create_model
from model.settings import ONEDNN_FUSION, PRECISION

log = logging.getLogger(__name__)

ENV = PRECISION.name
CHOICES = ("auto", "fp32", "bf16", "int8")  # int8: float32, the grader's trunk in int8 (model.quantize)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (not emulated).

    oneDNN runs bfloat16 on any AVX-512 CPU, but only AVX512-BF16 or AMX instructions make it
    faster than float32: without them (an Ice Lake Xeon, say) the grader ran at 0.38 times its
    float32 speed, so the CPU's own instructions decide."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    has_instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and has_instructions


def _choice(choice: str | None) -> str:
    choice = (choice or PRECISION.get()).strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    return choice


def int8_trunk_wanted(device: torch.device, choice: str | None = None) -> bool:
    """Whether the grader's trunk should run in int8 on ``device``: asked for (``int8``), or ``auto`` on a CPU
    that serves float32 (bfloat16 is faster where it is native) and has torch's x86 int8 engine."""
    choice = _choice(choice)
    if choice == "int8":
        return device.type == "cpu"
    return choice == "auto" and device.type == "cpu" and not native_bf16(device) and quantize.supported()


def serving_dtype(device: torch.device, choice: str | None = None) -> torch.dtype:
    """The dtype to serve in on ``device``: ``choice`` (default ``$KOA_PRECISION``, else ``auto``)."""
    choice = _choice(choice)
    if choice == "int8":
        return torch.float32
    if choice == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if choice == "bf16" and not native_bf16(device):
        log.warning("bfloat16 asked for on %s, which emulates it: expect it to be slower than float32", device)
    return DTYPES[choice]


def onednn_fusion(device: torch.device, dtype: torch.dtype) -> bool:
    """Turn oneDNN Graph fusion on for the traced networks where it is wanted, off elsewhere; whether it is on.

    Wanted on a CPU serving float32, unless ``$KOA_ONEDNN_FUSION`` is 0. It is torch's process-wide switch
    (`torch.jit.enable_onednn_fusion`): a frozen trace then runs each convolution with its batch norm,
    activation and additions as one oneDNN kernel, compiled on the first calls with a new batch size
    (`handler.service.Predictor.warm_up`). The EfficientNet-Lite convolutions, with ReLU6 as a separate
    clamp, took most of the grader's time in float32 (docs/BENCHMARKS.md, "oneDNN Graph fusion").
    """
    on = device.type == "cpu" and dtype == torch.float32 and ONEDNN_FUSION.get().strip() != "0"
    torch.jit.enable_onednn_fusion(on)
    return on


def served_batch(n: int) -> int:
    """The batch size the networks run ``n`` inputs at: ``n`` itself, or with oneDNN Graph fusion on (its
    kernels are compiled and kept for each batch size) the next of 1, 2, 4, 8,
    then the next multiple of 8, so a worker compiles a few sizes rather than one per batch it meets."""
    if n <= 0 or not torch.jit.onednn_fusion_enabled():
        return n
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def padded(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, H, W) batch with blank images added up to `served_batch` of them; the first
    ``len(x)`` rows of a network's output on it are its outputs on ``x``."""
    extra = served_batch(len(x)) - len(x)
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)


class Cast(nn.Module):
    """A network in another dtype behind float32 doors: inputs cast in, outputs cast back to float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


class CastGated(Cast):
    """`Cast` for a grader that also returns its knee gate's score (``forward_with_gate``)."""

    def forward_with_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_with_gate(x.to(self.dtype)).float()


def compiled(net: nn.Module, example: torch.Tensor, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``net`` in ``dtype``, traced and frozen in channels-last memory on ``example``'s device.

    Traces ``forward`` and, when ``net`` has one, ``forward_with_gate``; a knee gate stays in float32.
    Returns the frozen module itself in float32, else it wrapped in `Cast` / `CastGated`.
    """
    net = copy.deepcopy(net).eval().to(device=example.device, dtype=dtype, memory_format=torch.channels_last)
    if hasattr(net, "knee_gate"):
        net.knee_gate.float()
    x = example.to(dtype).contiguous(memory_format=torch.channels_last)
    gated = hasattr(net, "forward_with_gate")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        if gated:
            traced = torch.jit.trace_module(net, {"forward": x, "forward_with_gate": x}, check_trace=False)
            frozen = torch.jit.freeze(traced, preserved_attrs=["forward_with_gate"])
        else:
            frozen = torch.jit.freeze(torch.jit.trace(net, x, check_trace=False))
    if dtype == torch.float32:
        return frozen
    return CastGated(frozen, dtype) if gated else Cast(frozen, dtype)


def served_models(
    scripted: nn.Module, contract: InputContract, device: torch.device, int8_table: dict | None = None
) -> tuple[nn.Module, nn.Module, torch.dtype]:
    """What the worker builds from an exported model: (the float32 eager model, for explanations; the
    model predictions run on, `compiled` in `serving_dtype`; that dtype). With ``int8_table`` (the
    archive's, `model.quantize`) the predictions' trunk runs in int8 where `int8_trunk_wanted`; a table
    that does not fit the weights is logged and float32 served. Sets `onednn_fusion` for the process."""
    eager = create_model(contract.model_name, num_classes=contract.num_classes, in_chans=contract.channels)
    eager.load_state_dict(scripted.state_dict())
    eager.to(device).eval()
    dtype = serving_dtype(device)
    onednn_fusion(device, dtype)
    example = torch.zeros(1, contract.channels, contract.input_size, contract.input_size, device=device)
    net = eager
    if int8_table is not None and int8_trunk_wanted(device):  # wanted only where float32 is served
        try:
            net = quantize.with_int8_trunk(eager, int8_table)
            log.info("the grader's trunk runs in int8 (model.quantize)")
        except quantize.TableError as exc:
            log.warning("int8 trunk not used, float32 served: %s", exc)
    return eager, compiled(net, example, dtype), dtype
