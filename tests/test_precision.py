"""model.precision: the number format the server picks, and the frozen traces it predicts with."""

from __future__ import annotations

import pytest
import torch

from model import create_model
from model.checkpoint import model_from_checkpoint
from model.paths import ROOT
from model.precision import ENV, Cast, CastGated, compiled, native_bf16, serving_dtype

CPU = torch.device("cpu")


def test_the_choice_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "fp32")
    assert serving_dtype(CPU) == torch.float32
    monkeypatch.setenv(ENV, "bf16")
    assert serving_dtype(CPU) == torch.bfloat16
    monkeypatch.delenv(ENV)
    assert serving_dtype(CPU) == (torch.bfloat16 if native_bf16(CPU) else torch.float32)
    with pytest.raises(ValueError, match="choose one of auto, fp32, bf16"):
        serving_dtype(CPU, "half")


def test_the_float32_trace_answers_as_the_eager_model_gate_included() -> None:
    """The shipped weights with their fitted knee gate: a frozen trace gives the same logits and score."""
    net, contract = model_from_checkpoint(ROOT / "weights" / "oamen.ckpt")
    x = torch.randn(3, 1, contract.input_size, contract.input_size).contiguous(memory_format=torch.channels_last)
    fast = compiled(net, x[:1])
    assert isinstance(fast, torch.jit.ScriptModule)
    with torch.inference_mode():
        expected, got = net.forward_with_gate(x), fast.forward_with_gate(x)
    assert float(expected[:, -1].abs().min()) > 0  # the gate is fitted: its score is not the unfitted 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_stays_close_and_answers_in_float32() -> None:
    torch.manual_seed(0)
    gated = create_model("oamen_lite").eval()
    plain = create_model("resnet18").eval()
    x = torch.randn(4, 1, 64, 64)
    fast_gated, fast_plain = compiled(gated, x[:1], torch.bfloat16), compiled(plain, x[:1], torch.bfloat16)
    assert type(fast_gated) is CastGated and type(fast_plain) is Cast and not hasattr(fast_plain, "forward_with_gate")
    with torch.inference_mode():
        for fast, ref in ((fast_gated.forward_with_gate, gated.forward_with_gate), (fast_plain, plain)):
            got, expected = fast(x), ref(x)
            assert got.dtype == torch.float32
            assert float((got - expected).abs().max()) < 0.1 * float(expected.abs().max())
            assert not torch.equal(got, expected)  # it did run in bfloat16
    assert next(gated.parameters()).dtype == torch.float32  # the model it was made from is left as it was


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, False), (True, False, True), (False, True, True)],
)
def test_bfloat16_is_native_only_with_the_cpus_own_instructions(monkeypatch, avx512_bf16, amx, expected):
    # oneDNN says yes on any AVX-512 CPU, where it emulates bfloat16 at 0.38x float32's speed
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16(CPU) is expected
    assert serving_dtype(CPU, "auto") == (torch.bfloat16 if expected else torch.float32)
