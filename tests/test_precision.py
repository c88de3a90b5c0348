"""model.precision: the number format the server picks, and the frozen traces it predicts with."""

from __future__ import annotations

import pytest
import torch

from model import create_model
from model.checkpoint import model_from_checkpoint
from model.paths import ROOT
from model.precision import (
    ENV,
    Cast,
    CastGated,
    compiled,
    native_bf16,
    onednn_fusion,
    padded,
    served_batch,
    serving_dtype,
)
from model.settings import ONEDNN_FUSION

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


def test_onednn_fusion_is_on_for_float32_on_a_cpu_and_can_be_turned_off(monkeypatch) -> None:
    """(tests/conftest.py puts the process-wide switch back after each test.)"""
    monkeypatch.delenv(ONEDNN_FUSION.name, raising=False)
    assert onednn_fusion(CPU, torch.float32) is True and torch.jit.onednn_fusion_enabled()
    assert onednn_fusion(CPU, torch.bfloat16) is False and not torch.jit.onednn_fusion_enabled()
    assert onednn_fusion(torch.device("cuda"), torch.float32) is False
    monkeypatch.setenv(ONEDNN_FUSION.name, "0")
    assert onednn_fusion(CPU, torch.float32) is False and not torch.jit.onednn_fusion_enabled()


def test_the_fused_float32_trace_answers_as_the_eager_model_at_each_batch_size(monkeypatch) -> None:
    """With oneDNN Graph fusion on, the shipped weights' frozen trace runs fused kernels at batch 1 and 3
    (compiled on their first calls) and gives the eager model's logits and knee gate score."""
    monkeypatch.delenv(ONEDNN_FUSION.name, raising=False)
    assert onednn_fusion(CPU, torch.float32)
    net, contract = model_from_checkpoint(ROOT / "weights" / "oamen.ckpt")
    x = torch.randn(3, 1, contract.input_size, contract.input_size).contiguous(memory_format=torch.channels_last)
    fast = compiled(net, x[:1])
    with torch.inference_mode():
        for n in (1, 3):
            for _ in range(3):
                got = fast.forward_with_gate(x[:n])
            assert "prim::oneDNNFusionGroup" in str(torch.jit.last_executed_optimized_graph())
            torch.testing.assert_close(got, net.forward_with_gate(x[:n]), atol=1e-4, rtol=1e-4)


def test_fused_networks_run_at_a_few_batch_sizes_and_padding_keeps_the_rows() -> None:
    torch.jit.enable_onednn_fusion(True)
    assert [served_batch(n) for n in range(1, 26)] == [1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8 + [24] * 8 + [32]
    x = torch.randn(3, 2, 5, 5).contiguous(memory_format=torch.channels_last)
    out = padded(x)
    assert out.shape == (4, 2, 5, 5) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:3], x) and not out[3].any()
    assert padded(out) is out
    torch.jit.enable_onednn_fusion(False)  # unfused, every batch runs at its own size
    assert [served_batch(n) for n in (1, 3, 5, 9)] == [1, 3, 5, 9] and padded(x) is x


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
